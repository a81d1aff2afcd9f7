"""Loss composition and the cross-entropy term against numpy references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrobust import losses


def _inputs(logits, labels, mask):
  return losses.LossInputs(
      outputs={"train": {"logits": jnp.asarray(logits), "features": None}},
      batch={"train": {"label": jnp.asarray(labels), "mask": jnp.asarray(mask)}},
      num_classes=logits.shape[1], params={}, rng=jax.random.PRNGKey(0), step=jnp.int32(0))


def _np_ce(logits, labels, smoothing=0.0, weights=None, mask=None):
  """PyTorch CrossEntropyLoss(weight=w, label_smoothing=s) with mean reduction."""
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  k = logits.shape[1]
  q = np.full_like(logits, smoothing / k)
  q[np.arange(len(labels)), labels] += 1 - smoothing
  per = -(q * logp).sum(1)
  w = np.ones(len(labels)) if weights is None else np.asarray(weights)[labels]
  if mask is not None:
    w = w * mask
  return (per * w).sum() / w.sum()


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(12, 5)).astype(np.float32) * 3
LABELS = RNG.integers(0, 5, 12).astype(np.int32)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weights", [None, (1.0, 2.0, 0.5, 3.0, 1.0)])
def test_cross_entropy_matches_pytorch_definition(smoothing, weights):
  loss, metrics = losses.cross_entropy(_inputs(LOGITS, LABELS, np.ones(12, bool)),
                                       label_smoothing=smoothing, class_weights=weights)
  np.testing.assert_allclose(loss, _np_ce(LOGITS.astype(np.float64), LABELS, smoothing, weights),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["train/accuracy"], np.mean(LOGITS.argmax(1) == LABELS))


def test_padded_examples_do_not_count():
  mask = np.arange(12) < 7
  padded = LOGITS.copy()
  padded[7:] = 1e4  # garbage in the padding
  loss, _ = losses.cross_entropy(_inputs(padded, LABELS, mask))
  np.testing.assert_allclose(loss, _np_ce(LOGITS[:7].astype(np.float64), LABELS[:7]), rtol=1e-5)


def test_build_loss_sums_weighted_terms_and_checks_options():
  cfg = ml_collections.ConfigDict({
      "cross_entropy": {"weight": 1.0, "label_smoothing": 0.0},
      "smoothed": {"name": "cross_entropy", "weight": 0.5, "label_smoothing": 0.2}})
  total, metrics = losses.build_loss(cfg)(_inputs(LOGITS, LABELS, np.ones(12, bool)))
  np.testing.assert_allclose(total, metrics["loss/cross_entropy"] + 0.5 * metrics["loss/smoothed"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['label_smothing'\]"):
    losses.build_loss({"cross_entropy": {"label_smothing": 0.1}})
  with pytest.raises(ValueError, match="unknown loss term 'cross_entropi'.*cross_entropy"):
    losses.build_loss({"cross_entropi": {}})
  with pytest.raises(ValueError, match="cross_entropy: class_weights has 2 entries for 5 classes"):
    losses.build_loss({"cross_entropy": {"class_weights": (1.0, 2.0)}}, num_classes=5)
  with pytest.raises(ValueError, match=r"stream='outliers': there is no such stream"):
    losses.build_loss({"cross_entropy": {"stream": "outliers"}}, streams=["train"])


def test_soft_labels_and_per_example_weights():
  rng = np.random.default_rng(1)
  soft = rng.dirichlet(np.ones(5), size=12).astype(np.float32)
  w = rng.uniform(0.1, 2.0, 12).astype(np.float32)
  inputs = _inputs(LOGITS, LABELS, np.ones(12, bool))
  batch = dict(inputs.batch["train"], soft_label=jnp.asarray(soft), weight=jnp.asarray(w))
  inputs = losses.LossInputs(**{**inputs.__dict__, "batch": {"train": batch}})
  loss, _ = losses.cross_entropy(inputs)
  z = LOGITS.astype(np.float64)
  logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
  per = -(soft * logp).sum(1)
  np.testing.assert_allclose(loss, (per * w).sum() / w.sum(), rtol=1e-5)


def test_normalize_by_rescales_a_term_to_anothers_magnitude():
  """Zoph et al.'s loss normalisation: the normalised term contributes with the
  other term's value, and its gradient is the term's own gradient scaled by
  sg(L_other / L)."""
  cfg = {"cross_entropy": {}, "smoothed": {"name": "cross_entropy", "label_smoothing": 0.5,
                                           "normalize_by": "cross_entropy", "weight": 2.0}}
  fn = losses.build_loss(cfg)
  inputs = _inputs(LOGITS, LABELS, np.ones(12, bool))
  total, m = fn(inputs)
  np.testing.assert_allclose(total, 3.0 * m["loss/cross_entropy"], rtol=1e-6)
  np.testing.assert_allclose(m["loss/smoothed/scale"], m["loss/cross_entropy"] / m["loss/smoothed"],
                             rtol=1e-6)

  def grad_of(f, scale=1.0):
    def loss(z):
      i = losses.LossInputs(**{**inputs.__dict__,
                               "outputs": {"train": {"logits": z, "features": None}}})
      return f(i)[0] * scale
    return jax.grad(loss)(jnp.asarray(LOGITS))
  smoothed = lambda i: losses.cross_entropy(i, label_smoothing=0.5)
  g = grad_of(fn)
  expected = grad_of(lambda i: losses.cross_entropy(i)) + 2.0 * m["loss/smoothed/scale"] * grad_of(smoothed)
  np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="normalize_by='other' is not a term"):
    losses.build_loss({"cross_entropy": {"normalize_by": "other"}})


def test_constant_shapes_are_checked_before_compilation():
  # Its own name: tests/test_stages.py registers another `_test_uses_matrix`.
  if "_test_sums_matrix" not in losses.LOSSES:
    @losses.LOSSES.register("_test_sums_matrix",
                            info={"constants": lambda o, k: {o["matrix"]: (k, k)}})
    def _uses(inputs, *, matrix="C"):
      return jnp.sum(inputs.constants[matrix]), {}
  ok = losses.build_loss({"_test_sums_matrix": {}}, num_classes=3,
                         constants={"C": np.eye(3)})
  # The built loss reads the constant it names from the step's inputs.
  matrix = np.arange(9.0).reshape(3, 3)
  inputs = losses.LossInputs(**{**_inputs(LOGITS[:, :3], LABELS % 3, np.ones(12, bool)).__dict__,
                                "constants": {"C": jnp.asarray(matrix)}})
  total, metrics = ok(inputs)
  assert float(total) == float(metrics["loss/_test_sums_matrix"]) == matrix.sum() == 36.0
  with pytest.raises(ValueError, match=r"constant 'C' has shape \(4, 4\); this term needs \(3, 3\)"):
    losses.build_loss({"_test_sums_matrix": {}}, num_classes=3, constants={"C": np.eye(4)})
  with pytest.raises(ValueError, match="needs constant 'D'"):
    losses.build_loss({"_test_sums_matrix": {"matrix": "D"}}, num_classes=3,
                      constants={"C": np.eye(3)})
