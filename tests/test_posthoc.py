"""Post-hoc OOD detectors against numpy ports of their reference code
(tests/reference_posthoc.py), options, masks, ties and bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import scores
from jaxrobust.methods import posthoc, posthoc_activation, posthoc_base, posthoc_distance
from jaxrobust.registry import RegistryError
from tests import reference_posthoc as ref

D, K = 16, 5


def _data(n_train=300, n_test=40, seed=0):
  rng = np.random.default_rng(seed)
  means = np.abs(rng.normal(0, 2, (K, D)))
  y = rng.integers(0, K, n_train)
  relu = lambda x: np.maximum(x, 0)  # post-ReLU features: many exact zeros (ties)
  train = relu(means[y] + rng.normal(size=(n_train, D))).astype(np.float32)
  yt = rng.integers(0, K, n_test)
  test = relu(means[yt] + 1.5 * rng.normal(size=(n_test, D))).astype(np.float32)
  # Nearest class mean, halved, plus noise: a fair classifier with moderate logits.
  kernel = (means.T / 2 + 0.05 * rng.normal(size=(D, K))).astype(np.float32)
  bias = (-(means ** 2).sum(1) / 4 + rng.normal(0, 0.1, K)).astype(np.float32)
  return train, y, test, kernel, bias


TRAIN, Y, TEST, KERNEL, BIAS = _data()
W = KERNEL.T.astype(np.float64)
B = BIAS.astype(np.float64)
T64, F64 = TRAIN.astype(np.float64), TEST.astype(np.float64)

REFERENCE = {
    "react": lambda: ref.react(F64, W, B, ref.react_threshold(TRAIN, 90)),
    "ash_p": lambda: ref.ash(F64, W, B, "p", 65),
    "ash_b": lambda: ref.ash(F64, W, B, "b", 65),
    "ash_s": lambda: ref.ash(F64, W, B, "s", 65),
    "scale": lambda: ref.scale(F64, W, B, 65),
    "dice": lambda: ref.dice(F64, W, B, TRAIN, 90),
    "gradnorm": lambda: ref.gradnorm(F64, W, B),
    # float32 as the reference's tensors: p ** 0.1 of probabilities float32 flushes to 0.
    "gen": lambda: ref.gen(TEST, KERNEL.T, BIAS, 0.1, 100),
    "kl_matching": lambda: ref.kl_matching(F64, W, B, T64),
    "vim": lambda: ref.vim(F64, W, B, T64, D // 2),
    "residual": lambda: ref.residual(F64, W, B, T64, D // 2),
    "knn": lambda: ref.knn(F64, T64, 50),
    "relative_mahalanobis": lambda: ref.relative_mahalanobis(F64, T64, Y, K),
    "she": lambda: ref.she(F64, W, B, T64, Y),
    "nnguide": lambda: ref.nnguide(F64, W, B, T64, 10),
    "fdbd": lambda: ref.fdbd(F64, W, B, T64),
}


def _run(name, train=TRAIN, labels=Y, test=TEST, **options):
  state = posthoc.fit(name, train, labels, kernel=KERNEL, bias=BIAS, **options)
  return state, np.asarray(posthoc.score(name, test, state, kernel=KERNEL, bias=BIAS, **options))


def test_every_detector_has_a_reference():
  assert set(REFERENCE) == set(posthoc.names()) and len(REFERENCE) == 16
  for name in posthoc.names():
    assert isinstance(scores.build(name), scores.ScoreMethod)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_detector_matches_its_reference_port(name):
  state, got = _run(name)
  assert (state is None) == (posthoc.DETECTORS[name].fit is None)
  want = REFERENCE[name]()
  assert got.shape == (len(TEST),) and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_options_change_the_scores_as_the_reference():
  _, got = _run("react", percentile=70.0)
  np.testing.assert_allclose(got, ref.react(F64, W, B, ref.react_threshold(TRAIN, 70)),
                             rtol=1e-4)
  _, got = _run("ash_b", percentile=80)
  np.testing.assert_allclose(got, ref.ash(F64, W, B, "b", 80), rtol=1e-4)
  _, got = _run("dice", sparsity=0.5)
  np.testing.assert_allclose(got, ref.dice(F64, W, B, TRAIN, 50), rtol=1e-4)
  _, got = _run("gen", gamma=0.5, top_m=3)
  np.testing.assert_allclose(got, ref.gen(TEST, KERNEL.T, BIAS, 0.5, 3), rtol=1e-4)
  _, got = _run("knn", k=7)
  np.testing.assert_allclose(got, ref.knn(F64, T64, 7), rtol=1e-4, atol=1e-5)
  _, got = _run("vim", dim=4)
  np.testing.assert_allclose(got, ref.vim(F64, W, B, T64, 4), rtol=1e-4, atol=1e-4)


def test_ash_ties_keep_the_lower_index_and_round_half_to_even():
  x = np.array([[1.0, 0, 0, 2, 0, 0, 0, 0]], np.float32)  # k = 8 - round(8 * 0.5) = 4
  got = np.asarray(posthoc_activation.ash(jnp.asarray(x), "b", 50))
  np.testing.assert_allclose(got, [[0.75, 0.75, 0.75, 0.75, 0, 0, 0, 0]])
  np.testing.assert_allclose(got, ref.ash_b(x.astype(np.float64), 50))
  # 10 * 0.25 = 2.5 rounds to 2 (half to even): k = 8 kept.
  assert posthoc_activation.kept(10, 25, "t") == 8


def test_knn_search_is_chunked_and_exact():
  state = posthoc_distance.to_bank(np.asarray(posthoc_distance.normalize(TRAIN)), chunk=64)
  assert state["bank"].shape == (5, 64, D) and state["valid"].sum() == len(TRAIN)
  got = -posthoc_distance.kth_distance(posthoc_distance.normalize(TEST), state, 50)
  np.testing.assert_allclose(got, ref.knn(F64, T64, 50), rtol=1e-4, atol=1e-5)
  # Query chunks in the public score (lax.map over padded chunks) change nothing.
  full = posthoc.fit("knn", TRAIN, kernel=KERNEL, bias=BIAS)
  many = np.concatenate([TEST] * 30)  # 1200 rows > one query chunk
  np.testing.assert_allclose(posthoc.score("knn", many, full, kernel=KERNEL, bias=BIAS),
                             np.concatenate([ref.knn(F64, T64, 50)] * 30), rtol=1e-4, atol=1e-5)


def test_masks_and_negative_labels_leave_rows_out_of_the_fit():
  keep = np.arange(len(TRAIN)) % 3 != 0
  labels = np.where(np.arange(len(TRAIN)) % 5 == 0, -1, Y)
  both = keep & (labels >= 0)
  for name in ("knn", "vim", "relative_mahalanobis", "she", "react"):
    masked = posthoc.fit(name, TRAIN, labels, kernel=KERNEL, bias=BIAS, mask=keep)
    subset = posthoc.fit(name, TRAIN[both], Y[both], kernel=KERNEL, bias=BIAS)
    for key in masked:
      a, b = np.asarray(masked[key]), np.asarray(subset[key])
      if key == "residual":  # a basis: compare the projectors
        a, b = a @ a.T, b @ b.T
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name}/{key}")
  state = posthoc.fit("fdbd", TRAIN, Y, kernel=KERNEL, bias=BIAS)
  mask = np.arange(len(TEST)) < 30
  got = np.asarray(posthoc.score("fdbd", TEST, state, kernel=KERNEL, bias=BIAS, mask=mask))
  assert np.all(got[30:] == 0) and np.all(got[:30] > 0)
  np.testing.assert_allclose(got[:30], ref.fdbd(F64, W, B, T64)[:30], rtol=1e-4)


def test_streamed_fit_equals_one_shot_fit():
  """Small padded chunks (as the evaluator's batches) give the same statistics."""
  for name in ("vim", "relative_mahalanobis", "kl_matching", "dice", "she"):
    det = posthoc.DETECTORS[name]
    opts = {k: det.options[k] for k in det.fit_options}
    if "dim" in opts:
      opts["dim"] = D // 2
    one = det.fit(posthoc_base.ArraySource(TRAIN, Y), KERNEL, BIAS, **opts)
    streamed = det.fit(posthoc_base.ArraySource(TRAIN, Y, chunk=37), KERNEL, BIAS, **opts)
    for key in one:
      a, b = np.asarray(one[key]), np.asarray(streamed[key])
      if name in ("vim",) and key == "residual":  # a basis: compare the projector
        a, b = a @ a.T, b @ b.T
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name}/{key}")


def test_bad_input_names_the_option():
  with pytest.raises(ValueError, match="kernel has shape"):
    posthoc.score("gen", TEST, None, kernel=KERNEL[:-1], bias=BIAS)
  with pytest.raises(ValueError, match="bias has shape"):
    posthoc.score("gen", TEST, None, kernel=KERNEL, bias=BIAS[:-1])
  for bad in (0, 100, -5, 150):
    with pytest.raises(RegistryError, match=r"percentile must be in \(0, 100\)"):
      posthoc.fit("react", TRAIN, Y, kernel=KERNEL, bias=BIAS, percentile=bad)
    with pytest.raises(RegistryError, match="percentile"):
      scores.build(f"ash_s(percentile={bad})")
  with pytest.raises(RegistryError, match="prunes all 16"):
    posthoc.score("ash_p", TEST, None, kernel=KERNEL, bias=BIAS, percentile=99)
  with pytest.raises(RegistryError, match=r"sparsity must be in \[0, 1\)"):
    posthoc.fit("dice", TRAIN, Y, kernel=KERNEL, bias=BIAS, sparsity=1.0)
  with pytest.raises(RegistryError, match="k=301 is larger than the training bank"):
    posthoc.fit("knn", TRAIN, Y, kernel=KERNEL, bias=BIAS, k=301)
  state = posthoc.fit("nnguide", TRAIN[:20], Y[:20], kernel=KERNEL, bias=BIAS)
  with pytest.raises(RegistryError, match="k=21 is larger than the training bank"):
    posthoc.score("nnguide", TEST, state, kernel=KERNEL, bias=BIAS, k=21)
  for name in ("vim", "residual"):
    with pytest.raises(RegistryError, match="dim=16 .* smaller than the feature dimension 16"):
      posthoc.fit(name, TRAIN, Y, kernel=KERNEL, bias=BIAS, dim=16)
  with pytest.raises(RegistryError, match="fit on an empty set"):
    posthoc.fit("she", TRAIN, Y, kernel=KERNEL, bias=BIAS, mask=np.zeros(len(TRAIN), bool))
  with pytest.raises(RegistryError, match="fit on an empty set"):
    posthoc.fit("knn", TRAIN[:0], Y[:0], kernel=KERNEL, bias=BIAS)
  with pytest.raises(RegistryError, match="needs the state"):
    posthoc.score("vim", TEST, None, kernel=KERNEL, bias=BIAS)
  with pytest.raises(RegistryError, match="unknown option"):
    posthoc.fit("knn", TRAIN, Y, kernel=KERNEL, bias=BIAS, K=5)


def test_higher_is_in_distribution():
  """Training-like features outscore far-away ones with every detector."""
  rng = np.random.default_rng(3)
  far = np.abs(rng.normal(0, 1, (40, D))).astype(np.float32) * 0.2
  far[:, :3] += 25.0  # large activations in a few directions: off the training manifold
  for name in ("knn", "vim", "residual", "relative_mahalanobis", "fdbd", "react"):
    state = posthoc.fit(name, TRAIN, Y, kernel=KERNEL, bias=BIAS)
    s_in = np.asarray(posthoc.score(name, TRAIN[:40], state, kernel=KERNEL, bias=BIAS))
    s_out = np.asarray(posthoc.score(name, far, state, kernel=KERNEL, bias=BIAS))
    assert np.median(s_in) > np.median(s_out), name


def test_registered_scores_share_fits_and_are_tunable():
  a, b = scores.build("knn(k=5)"), scores.build("knn(k=50)")
  assert a.fit is not None and a.fit_key == b.fit_key and a.key != b.key
  assert scores.build("vim(dim=4)").fit_key != scores.build("vim(dim=8)").fit_key
  assert scores.build("gen").fit_key == scores.build("ash_b").fit_key  # the head only
  from jaxrobust.methods import tuning
  assert tuning.GRIDS["react"] == {"percentile": (85, 90, 95, 99)}
  assert set(posthoc.GRIDS) <= set(tuning.GRIDS)


@pytest.mark.slow
def test_ood_evaluator_runs_detectors_by_name(data_dir):
  """The OOD evaluator fits KNN and ViM on the training split (the head from
  the module's params) and scores with them; the result equals the public
  fit/score on the same features."""
  import test_evaluators as te
  from jaxrobust import evaluators as ev
  evs, state = te._build(data_dir, ood={
      "type": "ood", "sets": {"blobs": "blobs/gray:validation"}, "fraction": 0.2, "draws": 1,
      "scores": ("knn(k=5)", "vim", "msp")})
  results = ev.run(evs, state)
  for name in ("knn", "vim", "msp"):
    assert 0.0 <= results[f"ood/{name}/blobs/auroc"] <= 1.0
  e = evs["ood"]
  got = e._scores(state, e.in_source)
  variables = state.classifier.variables
  head = posthoc_base.head_params(variables, "test")
  train = e.ctx.load(e.ctx.data.name, e.ctx.data.train_split, key="fit")
  predictor = e.ctx.predictor
  tr = predictor(variables, train, fields=("features", "label"))
  ins = predictor(variables, e.in_source, fields=("features",))["features"]
  # ViM's subspace of an untrained model's features has small eigen-gaps: the
  # evaluator's float32 sums per batch of 64 and the one-shot fit's per 8192
  # rows move it slightly (KNN's bank is the same rows, exactly).
  for name, opts, rtol in (("knn", {"k": 5}, 1e-5), ("vim", {}, 3e-3)):
    st = posthoc.fit(name, tr["features"], tr["label"], **head, **opts)
    want = posthoc.score(name, ins, st, **head, **opts)
    np.testing.assert_allclose(got[name], want, rtol=rtol, atol=1e-5, err_msg=name)
  assert np.corrcoef(got["vim"], want)[0, 1] > 0.999
