"""The ``verification`` evaluator: pairs, the LFW 10-fold protocol against a
port of insightface's ``verification.py``, the ``pp`` option and padded
batches, and errors raised before compilation."""

import numpy as np
import pytest

import reference_verification as ref
from jaxrobust.evaluators import verification as ver


def _embeddings(rng, n, d=16, noise=0.8):
  """Pairs of normalised embeddings: same pairs share a centre."""
  issame = rng.random(n) < 0.5
  a = rng.normal(size=(n, d))
  b = np.where(issame[:, None], a + noise * rng.normal(size=(n, d)), rng.normal(size=(n, d)))
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  return norm(a), norm(b), issame


@pytest.mark.parametrize("n, noise", [(600, 0.8), (613, 0.5), (2000, 1.2)])
def test_protocol_matches_insightface(n, noise):
  rng = np.random.default_rng(n)
  e1, e2, issame = _embeddings(rng, n, noise=noise)
  want_acc, want_val, want_std, want_far = ref.evaluate(e1, e2, issame)
  dist = np.sum((e1 - e2) ** 2, 1)
  acc = ver.roc_accuracy(dist, issame)
  np.testing.assert_array_equal(acc, want_acc)
  val, std, far = ver.tar_at_far(dist, issame)
  assert (val, std, far) == pytest.approx((want_val, want_std, want_far), abs=1e-12)
  got = ver.verification_metrics(dist, issame)
  assert got["verification_accuracy"] == pytest.approx(want_acc.mean())
  assert got["verification_accuracy_std"] == pytest.approx(want_acc.std())
  assert got["tar_at_far_1e-3"] == pytest.approx(want_val)
  assert 0.5 < got["verification_accuracy"] < 1.0  # neither trivial nor perfect


def test_pairs_balanced_seeded_and_valid():
  labels = np.repeat(np.arange(5), 7)
  labels[[3, 10]] = -1  # unlabelled: never paired
  pairs, issame = ver.make_pairs(labels, 301, seed=3)
  assert pairs.shape == (301, 2) and issame.sum() == 151
  assert np.all(pairs[:, 0] != pairs[:, 1])
  assert np.array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], issame)
  assert np.all(labels[pairs] >= 0)
  again, _ = ver.make_pairs(labels, 301, seed=3)
  other, _ = ver.make_pairs(labels, 301, seed=4)
  assert np.array_equal(pairs, again) and not np.array_equal(pairs, other)
  # both kinds in every fold (shuffled order)
  assert all(0 < issame[t].sum() < len(t) for _, t in ver.kfold(301, 10))
  with pytest.raises(ValueError, match="2 classes"):
    ver.make_pairs(np.zeros(10, int), 20, seed=0)


def test_far_name():
  assert ver.far_name(1e-3) == "1e-3" and ver.far_name(1e-4) == "1e-4"
  assert ver.far_name(0.005) == "0.005"


@pytest.mark.slow
def test_evaluator_on_digits_with_pp_and_padding(data_dir):
  """The evaluator on a split not a multiple of the batch (padded rows
  dropped): its numbers are the protocol's on the predicted features, and
  ``pp='downsample(4)'`` changes the inputs the module sees."""
  from test_evaluators import _build
  evs, state = _build(data_dir, v=dict(type="verification", data="digits:test",
                                       num_pairs=200),
                      lr=dict(type="verification", data="digits:test", num_pairs=200,
                              pp="downsample(4)", prefix="low"))
  res = evs["v"].evaluate(state)
  low = evs["lr"].evaluate(state)
  assert set(res) == {"test/verification_accuracy", "test/verification_accuracy_std",
                      "test/tar_at_far_1e-3", "test/far_at_far_1e-3", "test/num_pairs"}
  src = evs["v"].source
  assert len(src) % 64 != 0
  out = evs["v"].ctx.predictor(state.classifier.variables, src, fields=("features",))
  dist = ver.pair_distances(out["features"], evs["v"].pairs)
  want = ver.verification_metrics(dist, evs["v"].issame)
  assert res["test/verification_accuracy"] == pytest.approx(want["verification_accuracy"])
  assert low["low/verification_accuracy"] != res["test/verification_accuracy"]
  cls, _ = _build(data_dir, c=dict(type="classification", splits=("test",),
                                   pp="downsample(4)"))
  assert "test/accuracy" in cls["c"].evaluate(state)


def test_bad_options_fail_before_compilation(data_dir):
  from test_evaluators import _build
  with pytest.raises(ValueError, match="num_pairs"):
    _build(data_dir, v=dict(type="verification", data="digits:test", num_pairs=5))
  with pytest.raises(Exception, match="pp"):
    _build(data_dir, v=dict(type="verification", data="digits:test", pp="downsample(0)"))
  with pytest.raises(ValueError, match="far"):
    _build(data_dir, v=dict(type="verification", data="digits:test", far=0.0))
  with pytest.raises(ValueError, match="no split"):
    _build(data_dir, v=dict(type="verification", data="digits:nope"))
