"""Class imbalance: step-imbalanced subsets, cost-sensitive weights (against
scikit-learn and PyTorch's weighted cross-entropy), oversampling, and the
balanced / per-class accuracy of the classification evaluator."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_class_weight

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import losses
from jaxrobust.data import pipeline, streams
from jaxrobust.evaluators.classification import summarize
from jaxrobust.methods import imbalance
from jaxrobust.registry import RegistryError


def _labels(n_per_class=100, k=10):
  return np.repeat(np.arange(k), n_per_class).astype(np.int32)


def _stream(index="", labels="dataset", sampler="shuffle", batch=32, n_per_class=40, k=5):
  y = _labels(n_per_class, k)
  images = np.zeros((len(y), 4, 4, 1), np.uint8)
  spec = {**streams.stream_defaults(), "batch_size": batch, "index": index, "labels": labels,
          "sampler": sampler}
  return streams.build_stream("train", spec, pipeline.InMemorySource(images, y), num_classes=k,
                              seed=0, artifacts=artifacts_lib.Artifacts())


def test_step_imbalance_has_ratio_and_minority_fraction():
  y = _labels(100, 10)
  idx = imbalance.imbalanced_subset(y, 10, ratio=10, minority_fraction=0.3, seed=1)
  counts = np.bincount(y[idx], minlength=10)
  assert sorted(counts.tolist()) == [10] * 3 + [100] * 7
  assert len(np.unique(idx)) == len(idx)
  again = imbalance.imbalanced_subset(y, 10, ratio=10, minority_fraction=0.3, seed=1)
  other = imbalance.imbalanced_subset(y, 10, ratio=10, minority_fraction=0.3, seed=2)
  np.testing.assert_array_equal(idx, again)
  assert not np.array_equal(idx, other)


def test_every_minority_class_keeps_an_example():
  y = _labels(5, 4)
  counts = np.bincount(y[imbalance.imbalanced_subset(y, 4, ratio=100, minority_fraction=1.0)])
  assert counts.tolist() == [1, 1, 1, 1]


def test_class_weights_match_sklearn_balanced():
  y = np.array([0] * 50 + [1] * 5 + [2] * 20)
  expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
  np.testing.assert_allclose(imbalance.class_weights(np.bincount(y)), expected, rtol=1e-12)


def test_cost_sensitive_loss_equals_weighted_cross_entropy_reference():
  """PyTorch's ``CrossEntropyLoss(weight=w)``: ``Σ w[y_i] l_i / Σ w[y_i]``."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(12, 3)).astype(np.float32)
  labels = rng.integers(0, 3, 12).astype(np.int32)
  w = np.array([0.5, 2.0, 1.5], np.float32)
  mask = np.arange(12) < 10  # two padded rows
  inputs = losses.LossInputs(
      outputs={"train": {"logits": jnp.asarray(logits)}},
      batch={"train": {"label": jnp.asarray(labels), "mask": jnp.asarray(mask),
                       "weight": jnp.asarray(w[labels])}},
      num_classes=3, params=None, rng=None, step=0)
  z = logits.astype(np.float64)
  nll = np.log(np.exp(z).sum(1)) - z[np.arange(12), labels]
  ref = (w[labels] * nll)[:10].sum() / w[labels][:10].sum()
  np.testing.assert_allclose(float(losses.cross_entropy(inputs)[0]), ref, rtol=1e-5)


def test_index_and_label_source_in_a_stream():
  s = _stream(index="imbalanced(ratio=4, minority_fraction=0.4, seed=0)",
              labels="class_weighted")
  counts = np.bincount(s.data.labels[s.data.population], minlength=5)
  assert sorted(counts.tolist()) == [10, 10, 40, 40, 40]
  b = next(s)
  expected = imbalance.class_weights(counts)[b["label"]]
  np.testing.assert_allclose(b["weight"], expected, rtol=1e-6)
  assert set(b["index"].tolist()) <= set(s.data.population.tolist())


def test_oversampling_draws_classes_equally_often():
  s = _stream(index="imbalanced(ratio=10, minority_fraction=0.4, seed=0)",
              sampler="class_balanced(num_per_epoch=20000)", batch=20000)
  counts = np.bincount(next(s)["label"], minlength=5)
  np.testing.assert_allclose(counts / counts.sum(), 0.2, atol=0.015)


@pytest.mark.parametrize("spec,msg", [("imbalanced(ratio=0.5)", "ratio"),
                                      ("imbalanced(minority_fraction=1.5)", "minority_fraction")])
def test_bad_imbalance_options_fail_naming_the_key(spec, msg):
  with pytest.raises(RegistryError, match=rf"config.streams.train.index.*{msg}"):
    _stream(index=spec)


def test_balanced_and_per_class_accuracy_match_sklearn():
  rng = np.random.default_rng(1)
  labels = np.array([0] * 30 + [1] * 5 + [2] * 15)
  logits = rng.normal(size=(50, 3)) + 2 * np.eye(3)[labels] * (rng.random(50) > 0.3)[:, None]
  out = summarize(logits, labels, bin_size=10, per_class=True)
  pred = logits.argmax(1)
  assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
  for c in range(3):
    assert out[f"class_accuracy/{c}"] == pytest.approx((pred[labels == c] == c).mean())
  assert "class_accuracy/0" not in summarize(logits, labels, bin_size=10)
