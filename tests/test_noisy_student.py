"""Noisy Student pseudo-label selection: the threshold, exact per-class
balancing (most confident kept, short classes duplicated), hard and soft
labels, determinism, and bad input."""

import numpy as np
import pytest

import recompute
from jaxrobust.data import pipeline
from jaxrobust.methods import noisy_student as ns
from jaxrobust.registry import RegistryError


def _probs(n=600, k=5, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, k)) * 2.0
  logits[: n // 2, 0] += 3.0  # class 0 is long, the others short
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True), logits


def _reference(probs, threshold, n):
  """A plain-loop port of the rule: per class, confident images sorted by
  confidence; keep the top n, or repeat all and top up with the most confident."""
  out = []
  for c in range(probs.shape[1]):
    cand = [i for i in range(len(probs))
            if probs[i].argmax() == c and probs[i].max() >= threshold]
    cand.sort(key=lambda i: (-probs[i].max(), i))
    if len(cand) >= n:
      out += cand[:n]
    elif cand:
      out += cand * (n // len(cand)) + cand[: n % len(cand)]
  return sorted(out)


def test_balanced_to_exactly_n_per_class_as_the_reference_rule():
  probs, _ = _probs()
  idx, labels = ns.select_pseudo_labels(probs, num_per_class=80)
  assert sorted(idx.tolist()) == _reference(probs, 0.3, 80)
  np.testing.assert_array_equal(labels, probs.argmax(1)[idx])
  stats = ns.selection_stats(probs, idx)
  assert stats["count"] == [80] * 5 and stats["empty_classes"] == []
  assert np.all(probs.max(1)[idx] >= 0.3)


def test_long_classes_keep_their_most_confident_and_short_ones_duplicate():
  probs, _ = _probs()
  idx, _ = ns.select_pseudo_labels(probs, num_per_class=40)
  conf, cls = probs.max(1), probs.argmax(1)
  eligible0 = np.flatnonzero((cls == 0) & (conf >= 0.3))
  assert len(eligible0) > 40
  kept0 = idx[cls[idx] == 0]
  assert len(set(kept0.tolist())) == 40
  assert conf[kept0].min() >= np.sort(conf[eligible0])[-40]
  idx, _ = ns.select_pseudo_labels(probs, num_per_class=500)
  assert len(idx) == 2500 and len(np.unique(idx)) < len(idx)


def test_soft_labels_are_the_tempered_softmax_of_the_logits():
  probs, logits = _probs()
  idx, soft = ns.select_pseudo_labels(probs, num_per_class=20, hard=False, temperature=2.0,
                                      logits=logits)
  z = logits[idx] / 2.0
  ref = np.exp(z - z.max(1, keepdims=True))
  np.testing.assert_allclose(soft, ref / ref.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
  # From probabilities alone at T = 1 the soft labels are the probabilities.
  idx, soft = ns.select_pseudo_labels(probs, num_per_class=20, hard=False)
  np.testing.assert_allclose(soft, probs[idx], rtol=1e-5, atol=1e-7)


def test_threshold_drops_classes_and_the_order_is_seeded():
  probs = np.full((6, 3), 1 / 3)
  probs[:3] = [0.8, 0.1, 0.1]
  idx, _ = ns.select_pseudo_labels(probs, num_per_class=4, threshold=0.5)
  assert sorted(idx.tolist()) == [0, 0, 1, 2] and ns.selection_stats(probs, idx)[
      "empty_classes"] == [1, 2]
  probs, _ = _probs()
  a, _ = ns.select_pseudo_labels(probs, num_per_class=30, seed=1)
  b, _ = ns.select_pseudo_labels(probs, num_per_class=30, seed=1)
  c, _ = ns.select_pseudo_labels(probs, num_per_class=30, seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and sorted(a.tolist()) == sorted(c.tolist())


@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": 1.5}, "threshold"), ({"num_per_class": 0}, "num_per_class"),
    ({"temperature": 0.0}, "temperature")])
def test_bad_options_are_named(kwargs, match):
  probs, _ = _probs(50)
  with pytest.raises(RegistryError, match=match):
    ns.select_pseudo_labels(probs, **{"num_per_class": 5, **kwargs})
  with pytest.raises(RegistryError, match="sum to 1"):
    ns.select_pseudo_labels(np.ones((4, 3)), num_per_class=2)


@pytest.mark.slow
@pytest.mark.parametrize("hard", [True, False])
def test_teacher_pseudo_labels_feed_a_student_stream(tmp_path, data_dir, hard):
  """teacher -> pseudo_label (digits:validation as the unlabeled set) ->
  student with a stream reading the artifacts; duplicates are in the index."""
  from jaxrobust import stages
  from tiny_config import tiny_config
  c = tiny_config(data_dir)
  c.stages = {
      "teacher": {"task": "train"},
      "pl": {"task": "pseudo_label", "checkpoint": "artifact:teacher/checkpoint",
             "split": "validation", "threshold": 0.0, "num_per_class": 30, "hard": hard,
             "exclude": "per_class(num_per_class=2)"},
      "student": {"task": "train", "config": {
          "streams": {"unlabeled": {"data": "digits", "split": "validation", "batch_size": 16,
                                    "index": "artifact:pl/indices",
                                    "labels": "artifact:pl/labels"}},
          "losses": {"unl": {"name": "cross_entropy", "stream": "unlabeled"}}}}}
  results = stages.run(c, str(tmp_path))
  idx = np.load(tmp_path / "pl" / "artifacts" / "indices.npz")["array"]
  labels = np.load(tmp_path / "pl" / "artifacts" / "labels.npz")["array"]
  # A 3-step teacher is unconfident and predicts few classes: 30 per class it predicts.
  assert results["pl/num_selected"] == len(idx) == 30 * (10 - results["pl/empty_classes"])
  assert results["pl/num_distinct"] == len(np.unique(idx)) <= 160
  # The 20 images a train stream with index per_class(2) would label are not candidates
  # (disjoint labelled and unlabelled pools, as Noisy Student).
  from jaxrobust.build import stream_seed
  from jaxrobust.data.streams import per_class, StreamData
  source = pipeline.load_split("digits", "validation", data_dir=str(data_dir))
  labelled = per_class(StreamData("train", source, 10, stream_seed(c.seed, "train"), None, ""), 2)
  assert results["pl/num_candidates"] == 160 and not set(idx) & set(labelled)
  assert labels.shape == ((180,) if hard else (180, 10))
  # The pseudo-labels' accuracy is that of the saved labels (the teacher's argmax,
  # hard or soft) of the selected images against digits:validation's labels.
  truth = pipeline.load_split("digits", "validation", data_dir=str(data_dir)).labels
  predicted = labels[idx] if hard else labels[idx].argmax(-1)
  assert results["pl/accuracy"] == pytest.approx(np.mean(predicted == truth[idx]), abs=1e-12)
  # The student's numbers are its checkpoint's, and the pseudo-labelled stream
  # changed its training: same seed and config as the teacher but for that stream.
  want = recompute.classification(stages.stage_configs(c)["student"][2], tmp_path / "student")
  assert results["student/test/accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
  assert results["student/test/nll"] == pytest.approx(want["nll"], rel=1e-6)
  assert abs(results["student/test/nll"] - results["teacher/test/nll"]) > 1e-3
