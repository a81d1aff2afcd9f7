"""Calibration metrics and temperature scaling against numpy ports of the
reference code (tests/reference_calibration.py), scikit-learn and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar
import sklearn.metrics as skm

from jaxrobust.metrics import calibration as cal
from jaxrobust.metrics.temperature import fit_temperature
import reference_calibration as ref

TOL = dict(rtol=1e-6, atol=1e-6)


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _model(n, num_classes=10, scale=2.0, sharpen=1.5, seed=0):
  """Logits, probabilities and labels drawn from softmax(logits / sharpen):
  an overconfident model, so bin gaps take both signs."""
  rng = np.random.default_rng(seed)
  z = (rng.normal(size=(n, num_classes)) * scale).astype(np.float32)
  p_true = _softmax(z.astype(np.float64) / sharpen)
  labels = (p_true.cumsum(1) > rng.random((n, 1))).argmax(1)
  return z, _softmax(z).astype(np.float32), labels


def _conf_correct(n, seed=0):
  _, probs, labels = _model(n, seed=seed)
  conf, correct = cal.confidences_and_correct(probs, labels)
  return np.asarray(conf), np.asarray(correct)


def _padded(*arrays, pad=13, seed=1):
  """Appends garbage rows (NaN / out-of-range) and shuffles; returns the
  padded arrays and the mask of the original rows."""
  rng = np.random.default_rng(seed)
  n = len(arrays[0])
  perm = rng.permutation(n + pad)
  out = []
  for a in arrays:
    a = np.asarray(a)
    filler = np.full((pad,) + a.shape[1:], 7 if a.dtype.kind in "iu" else np.nan, a.dtype)
    out.append(np.concatenate([a, filler])[perm])
  return out, (np.arange(n + pad) < n)[perm]


# ---------------------------------------------------------------------------
# confidences_and_correct
# ---------------------------------------------------------------------------

def test_confidences_and_correct_matches_numpy_and_breaks_ties_to_first_index():
  _, probs, labels = _model(64)
  conf, correct = cal.confidences_and_correct(probs, labels)
  np.testing.assert_array_equal(conf, probs.max(1))
  np.testing.assert_array_equal(correct, (probs.argmax(1) == labels).astype(np.float32))
  tied = np.array([[0.4, 0.4, 0.2], [0.25, 0.25, 0.5]], np.float32)
  _, correct = cal.confidences_and_correct(tied, np.array([0, 1]))
  np.testing.assert_array_equal(correct, [1.0, 0.0])
  _, correct = cal.confidences_and_correct(tied, np.array([1, 2]))
  np.testing.assert_array_equal(correct, [0.0, 1.0])


# ---------------------------------------------------------------------------
# Hendrycks adaptive bins
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,bin_size", [(100, 100), (250, 100), (1037, 100), (300, 10), (37, 10)])
@pytest.mark.parametrize("drop_last_bin", [False, True])
def test_rms_mad_max_match_hendrycks_calib_err(n, bin_size, drop_last_bin):
  conf, correct = _conf_correct(n, seed=n)
  for norm, p in (("l2", "2"), ("l1", "1"), ("max", "infty")):
    got = cal.rms_calibration_error(conf, correct, bin_size=bin_size,
                                    drop_last_bin=drop_last_bin, norm=norm)
    want = ref.hendrycks_calib_err(conf, correct, p=p, beta=bin_size,
                                   count_last_bin=not drop_last_bin)
    np.testing.assert_allclose(got, want, **TOL, err_msg=norm)
  np.testing.assert_allclose(
      cal.mad_calibration_error(conf, correct, bin_size=bin_size, drop_last_bin=drop_last_bin),
      ref.hendrycks_calib_err(conf, correct, p="1", beta=bin_size,
                              count_last_bin=not drop_last_bin), **TOL)


def test_drop_last_bin_changes_the_value_by_the_top_bin():
  conf, correct = _conf_correct(1000)
  full = float(cal.rms_calibration_error(conf, correct))
  quirk = float(cal.rms_calibration_error(conf, correct, drop_last_bin=True))
  top = np.argsort(conf, kind="stable")[-100:]
  gap = abs(conf[top].mean() - correct[top].mean())
  np.testing.assert_allclose(full ** 2 - quirk ** 2, 0.1 * gap ** 2, rtol=1e-4)
  assert quirk < full


def test_rms_with_fewer_examples_than_bin_size_is_one_bin():
  conf, correct = _conf_correct(37)
  single = abs(conf.mean() - correct.mean())
  np.testing.assert_allclose(cal.rms_calibration_error(conf, correct), single, **TOL)
  np.testing.assert_allclose(
      cal.rms_calibration_error(conf, correct),
      ref.hendrycks_calib_err(conf, correct, beta=37, count_last_bin=True), **TOL)
  # The quirk drops the only bin, as the reference does for 100 <= N < 200.
  assert float(cal.rms_calibration_error(conf, correct, drop_last_bin=True)) == 0.0
  conf150, correct150 = _conf_correct(150)
  assert ref.hendrycks_calib_err(conf150, correct150) == 0.0
  assert float(cal.rms_calibration_error(conf150, correct150, drop_last_bin=True)) == 0.0


def test_one_example_and_all_equal_confidences():
  np.testing.assert_allclose(cal.rms_calibration_error([0.7], [1.0]), 0.3, **TOL)
  np.testing.assert_allclose(cal.expected_calibration_error([0.7], [0.0]), 0.7, **TOL)
  rng = np.random.default_rng(3)
  conf = np.full(250, 0.8, np.float32)
  correct = (rng.random(250) < 0.5).astype(np.float32)
  for drop in (False, True):
    np.testing.assert_allclose(
        cal.rms_calibration_error(conf, correct, drop_last_bin=drop),
        ref.hendrycks_calib_err(conf, correct, count_last_bin=not drop), **TOL)
  np.testing.assert_allclose(cal.expected_calibration_error(conf, correct),
                             abs(0.8 - correct.mean()), **TOL)


# ---------------------------------------------------------------------------
# ECE / MCE / RMS-CE with equal-width and equal-mass bins
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_bins", [15, 10])
def test_ece_width_matches_robustness_metrics_and_torchmetrics(num_bins):
  conf, correct = _conf_correct(1000, seed=num_bins)
  assert conf.max() < 1  # torchmetrics differs only for confidence exactly 1.
  np.testing.assert_allclose(cal.expected_calibration_error(conf, correct, num_bins=num_bins),
                             ref.rm_ece(conf, correct, num_bins), **TOL)
  for norm in ("l1", "l2", "max"):
    np.testing.assert_allclose(
        cal.expected_calibration_error(conf, correct, num_bins=num_bins, norm=norm),
        ref.torchmetrics_ce(conf, correct, num_bins, norm), **TOL, err_msg=norm)


@pytest.mark.parametrize("num_bins", [15, 10, 4])
def test_confidences_on_bin_edges(num_bins):
  edges = (np.arange(num_bins + 1) / num_bins).astype(np.float32)
  conf = np.concatenate([edges, edges[1:-1]])
  correct = (np.arange(conf.size) % 3 == 0).astype(np.float32)
  data = cal.reliability_diagram_data(conf, correct, num_bins=num_bins)
  # k/M opens bin k; 0 is in the first bin and 1 in the last.
  want = np.full(num_bins, 2)
  want[0], want[-1] = 1, 3
  np.testing.assert_array_equal(data["bin_count"], want)
  np.testing.assert_array_equal(data["bin_edges"], edges)
  np.testing.assert_allclose(cal.expected_calibration_error(conf, correct, num_bins=num_bins),
                             ref.rm_ece(conf, correct, num_bins), **TOL)


@pytest.mark.parametrize("n,num_bins", [(1000, 10), (1003, 15), (7, 10), (10, 10)])
def test_ece_mass_matches_torch_uncertainty_adaptive(n, num_bins):
  conf, correct = _conf_correct(n, seed=n)
  for norm in ("l1", "l2", "max"):
    np.testing.assert_allclose(
        cal.expected_calibration_error(conf, correct, num_bins=num_bins, norm=norm,
                                       binning="mass"),
        ref.tu_adaptive_ce(conf, correct, num_bins, norm), **TOL, err_msg=norm)


def test_ece_mass_with_bin_size_bins_equals_hendrycks_when_sizes_match():
  conf, correct = _conf_correct(1000)
  np.testing.assert_allclose(
      cal.expected_calibration_error(conf, correct, num_bins=10, norm="l2", binning="mass"),
      cal.rms_calibration_error(conf, correct, bin_size=100), **TOL)


def test_reliability_data_reproduces_ece():
  conf, correct = _conf_correct(500)
  data = {k: np.asarray(v) for k, v in cal.reliability_diagram_data(conf, correct).items()}
  assert data["bin_count"].sum() == 500
  full = data["bin_count"] > 0
  for b in np.flatnonzero(full):
    inside = (conf >= data["bin_edges"][b]) & (conf < data["bin_edges"][b + 1])
    np.testing.assert_allclose(data["bin_confidence"][b], conf[inside].mean(), **TOL)
    np.testing.assert_allclose(data["bin_accuracy"][b], correct[inside].mean(), **TOL)
  assert np.all(np.isnan(data["bin_accuracy"][~full]))
  ece = np.sum(data["bin_count"][full] * np.abs(
      data["bin_confidence"][full] - data["bin_accuracy"][full])) / 500
  np.testing.assert_allclose(ece, cal.expected_calibration_error(conf, correct), **TOL)


def test_classwise_ece_matches_robustness_metrics_sce():
  _, probs, labels = _model(400, num_classes=5)
  assert probs.min() > 0 and probs.max() < 1
  np.testing.assert_allclose(cal.classwise_ece(probs, labels),
                             ref.rm_sce(labels, probs, 15), **TOL)


def test_half_precision_inputs_are_accumulated_in_float32():
  conf, correct = _conf_correct(1000)
  c16 = jnp.asarray(conf, jnp.bfloat16)
  c32 = np.asarray(c16.astype(jnp.float32))
  for fn in (cal.expected_calibration_error, cal.rms_calibration_error):
    got = fn(c16, correct.astype(bool))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, fn(c32, correct), **TOL)
  z, _, labels = _model(50)
  np.testing.assert_allclose(cal.nll_from_logits(jnp.asarray(z, jnp.float16), labels),
                             cal.nll_from_logits(z.astype(np.float16).astype(np.float32), labels),
                             **TOL)


# ---------------------------------------------------------------------------
# NLL, Brier, soft F1
# ---------------------------------------------------------------------------

def test_nll_matches_sklearn_log_loss_and_logits_agree_with_probs():
  z, probs, labels = _model(300, scale=1.0)
  p64 = probs.astype(np.float64)
  want = skm.log_loss(labels, p64 / p64.sum(1, keepdims=True), labels=list(range(10)))
  np.testing.assert_allclose(cal.nll_from_probs(probs, labels), want, rtol=1e-5)
  np.testing.assert_allclose(cal.nll_from_logits(z, labels), want, rtol=1e-5)
  np.testing.assert_allclose(cal.negative_log_likelihood(z, labels, from_logits=True),
                             cal.nll_from_logits(z, labels), **TOL)
  np.testing.assert_allclose(cal.negative_log_likelihood(probs, labels, from_logits=False),
                             cal.nll_from_probs(probs, labels), **TOL)
  # Logits stay finite where the probability underflows to zero.
  big = np.array([[0.0, 200.0]], np.float32)
  np.testing.assert_allclose(cal.nll_from_logits(big, np.array([0])), 200.0, rtol=1e-6)
  assert np.isinf(cal.nll_from_probs(np.array([[0.0, 1.0]]), np.array([0])))
  with pytest.raises(TypeError):
    cal.negative_log_likelihood(z, labels)  # from_logits is required


def test_brier_matches_sklearn_multiclass_and_twice_binary():
  _, probs, labels = _model(300, num_classes=6)
  np.testing.assert_allclose(cal.brier_score(probs, labels),
                             skm.brier_score_loss(labels, probs, labels=list(range(6))), **TOL)
  _, probs2, labels2 = _model(300, num_classes=2, seed=4)
  np.testing.assert_allclose(cal.brier_score(probs2, labels2),
                             2 * skm.brier_score_loss(labels2, probs2[:, 1]), **TOL)


def test_soft_f1_matches_hendrycks():
  conf, correct = _conf_correct(300)
  np.testing.assert_allclose(cal.soft_f1(conf, correct), ref.hendrycks_soft_f1(conf, correct),
                             **TOL)


# ---------------------------------------------------------------------------
# Masks: padded == unpadded, eagerly and under jit.
# ---------------------------------------------------------------------------

_PAIR_METRICS = {
    "rms": lambda c, k, m: cal.rms_calibration_error(c, k, bin_size=20, mask=m),
    "rms_quirk": lambda c, k, m: cal.rms_calibration_error(c, k, bin_size=20,
                                                           drop_last_bin=True, mask=m),
    "ece": lambda c, k, m: cal.expected_calibration_error(c, k, mask=m),
    "mce_mass": lambda c, k, m: cal.expected_calibration_error(c, k, norm="max",
                                                               binning="mass", mask=m),
    "soft_f1": lambda c, k, m: cal.soft_f1(c, k, mask=m),
}
_JIT_PAIR = {name: jax.jit(fn) for name, fn in _PAIR_METRICS.items()}
_PROB_METRICS = {
    "nll_logits": cal.nll_from_logits,
    "nll_probs": cal.nll_from_probs,
    "brier": cal.brier_score,
    "classwise_ece": cal.classwise_ece,
}
_JIT_PROB = {name: jax.jit(lambda x, y, m, fn=fn: fn(x, y, mask=m))
             for name, fn in _PROB_METRICS.items()}


def _padded_pair():
  conf, correct = _conf_correct(203)
  (pc, pk), mask = _padded(conf, correct)
  return conf, correct, pc, pk, mask


def _padded_model():
  z, probs, labels = _model(97, num_classes=4)
  (pz, pp, pl), mask = _padded(z, probs, labels)
  return (z, probs, labels), (pz, pp, pl, mask)


@pytest.mark.parametrize("name", sorted(_PAIR_METRICS))
def test_padded_pair_metrics_equal_unpadded(name):
  fn = _PAIR_METRICS[name]
  conf, correct, pc, pk, mask = _padded_pair()
  want = fn(conf, correct, None)
  np.testing.assert_allclose(fn(pc, pk, mask), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_JIT_PAIR[name](pc, pk, mask), want, rtol=1e-6, atol=1e-7)


def test_padded_reliability_counts_are_exact():
  conf, correct, pc, pk, mask = _padded_pair()
  want = cal.reliability_diagram_data(conf, correct)
  got = jax.jit(lambda c, k, m: cal.reliability_diagram_data(c, k, mask=m))(pc, pk, mask)
  np.testing.assert_array_equal(got["bin_count"], want["bin_count"])
  np.testing.assert_allclose(got["bin_accuracy"], want["bin_accuracy"], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(_PROB_METRICS))
def test_padded_probability_metrics_equal_unpadded(name):
  (z, probs, labels), (pz, pp, pl, mask) = _padded_model()
  x, px = (z, pz) if name == "nll_logits" else (probs, pp)
  want = _PROB_METRICS[name](x, labels)
  np.testing.assert_allclose(_JIT_PROB[name](px, pl, mask), want, rtol=1e-6)


def test_padded_confidences_and_correct():
  _, (_, pp, pl, mask) = _padded_model()
  conf, correct = cal.confidences_and_correct(pp, pl, mask=mask)
  np.testing.assert_array_equal(np.asarray(conf)[mask], pp[mask].max(1))
  np.testing.assert_array_equal(np.asarray(correct)[mask], pp[mask].argmax(1) == pl[mask])


# ---------------------------------------------------------------------------
# Bad input: ValueError eagerly, NaN under jit.
# ---------------------------------------------------------------------------

def test_eager_bad_input_raises_value_error():
  conf, correct = _conf_correct(20)
  _, probs, labels = _model(20, num_classes=3)
  cases = {
      "empty": lambda: cal.rms_calibration_error(np.zeros(0), np.zeros(0)),
      "all masked": lambda: cal.expected_calibration_error(conf, correct, mask=np.zeros(20, bool)),
      "shape mismatch": lambda: cal.expected_calibration_error(conf, correct[:5]),
      "2-D confidences": lambda: cal.rms_calibration_error(probs, correct),
      "mask shape": lambda: cal.soft_f1(conf, correct, mask=np.ones(3, bool)),
      "nan": lambda: cal.expected_calibration_error(np.where(np.arange(20) == 3, np.nan, conf),
                                                    correct),
      "inf": lambda: cal.rms_calibration_error(np.where(np.arange(20) == 3, np.inf, conf), correct),
      "logits as confidences": lambda: cal.expected_calibration_error(conf * 5, correct),
      "correct outside [0,1]": lambda: cal.expected_calibration_error(conf, correct * 2),
      "rows do not sum to one": lambda: cal.confidences_and_correct(probs * 1.1, labels),
      "logits as probs": lambda: cal.brier_score(np.log(probs), labels),
      "label out of range": lambda: cal.classwise_ece(probs, labels + 3),
      "negative label": lambda: cal.nll_from_logits(probs, labels - 1),
      "float labels": lambda: cal.nll_from_probs(probs, labels.astype(np.float32)),
      "labels length": lambda: cal.brier_score(probs, labels[:4]),
      "unknown norm": lambda: cal.expected_calibration_error(conf, correct, norm="l3"),
      "unknown binning": lambda: cal.expected_calibration_error(conf, correct, binning="quantile"),
      "bin_size": lambda: cal.rms_calibration_error(conf, correct, bin_size=0),
      "num_bins": lambda: cal.reliability_diagram_data(conf, correct, num_bins=1.5),
      "from_logits type": lambda: cal.negative_log_likelihood(probs, labels, from_logits="yes"),
  }
  for name, call in cases.items():
    with pytest.raises(ValueError):
      call()
      pytest.fail(f"no ValueError for {name}")


def test_jit_bad_values_give_nan():
  _, _, pc, pk, mask = _padded_pair()
  first = np.flatnonzero(mask)[0]
  nan_conf = pc.copy()
  nan_conf[first] = np.nan
  for fn in _JIT_PAIR.values():
    assert np.isnan(fn(nan_conf, pk, mask))
    assert np.isnan(fn(np.where(mask, pc * 3, pc), pk, mask))  # out of [0, 1]
    assert np.isnan(fn(pc, pk, np.zeros_like(mask)))  # nothing valid
    assert not np.isnan(fn(nan_conf, pk, mask & (np.arange(mask.size) != first)))
  _, (pz, pp, pl, mask) = _padded_model()
  bad_labels = np.where(np.arange(pl.size) == np.flatnonzero(mask)[0], 4, pl)
  for name, fn in _JIT_PROB.items():
    x = pz if name == "nll_logits" else pp
    assert np.isnan(fn(x, bad_labels, mask))
    assert not np.isnan(fn(x, pl, mask))
    if name != "nll_logits":
      assert np.isnan(fn(pp * 1.1, pl, mask))  # rows do not sum to one
  conf_j, correct_j = jax.jit(cal.confidences_and_correct)(pp * 1.1, pl)
  assert np.all(np.isnan(conf_j[mask])) and np.all(np.isnan(correct_j[mask]))
  data = jax.jit(cal.reliability_diagram_data)(nan_conf, pk)
  assert np.all(np.isnan(data["bin_accuracy"]))


# ---------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale,sharpen", [(2.0, 1.5), (1.0, 0.5), (4.0, 3.0)])
def test_fit_temperature_matches_scipy(scale, sharpen):
  z, _, labels = _model(400, scale=scale, sharpen=sharpen, seed=7)
  t = float(fit_temperature(z, labels))
  best = minimize_scalar(lambda s: ref.nll_of_temperature(z, labels, s), bounds=(0.01, 100.0),
                         method="bounded", options=dict(xatol=1e-9))
  np.testing.assert_allclose(t, best.x, rtol=1e-4)
  # Hendrycks' bisection on [0.2, 5] lands within its 1e-4 interval width.
  t_box = float(fit_temperature(z, labels, min_temperature=0.2, max_temperature=5.0))
  assert abs(t_box - ref.hendrycks_tune_temp(z, labels)) <= 1.5e-4


def test_fit_temperature_invariances():
  z, _, labels = _model(20000, num_classes=10, scale=2.0, sharpen=1.0, seed=11)
  # Labels drawn from softmax(z): the maximum-likelihood T is close to 1.
  assert abs(float(fit_temperature(z, labels)) - 1.0) < 0.05
  z2, _, labels2 = _model(500, sharpen=2.0, seed=12)
  t = float(fit_temperature(z2, labels2))
  for c in (0.5, 3.0):
    np.testing.assert_allclose(float(fit_temperature(c * z2, labels2)), c * t, rtol=1e-4)


def test_fit_temperature_mask_jit_and_bracket_ends():
  z, _, labels = _model(90, seed=5)
  (pz, pl), mask = _padded(z, labels)
  want = fit_temperature(z, labels)
  np.testing.assert_allclose(jax.jit(lambda a, b, m: fit_temperature(a, b, mask=m))(pz, pl, mask),
                             want, rtol=1e-5)
  # Every example correct: NLL decreases as T -> 0, so the lower end is returned.
  eye = 3 * np.eye(4, dtype=np.float32)
  np.testing.assert_allclose(fit_temperature(eye, np.arange(4), min_temperature=0.1), 0.1,
                             rtol=1e-6)
  # Labels never the argmax: NLL decreases as T -> inf.
  np.testing.assert_allclose(
      fit_temperature(eye, (np.arange(4) + 1) % 4, max_temperature=50.0), 50.0, rtol=1e-6)
  bad = labels.copy()
  bad[0] = 10
  assert np.isnan(jax.jit(fit_temperature)(z, bad))
  with pytest.raises(ValueError):
    fit_temperature(z, bad)
  with pytest.raises(ValueError):
    fit_temperature(np.where(np.arange(90)[:, None] == 2, np.nan, z), labels)
  with pytest.raises(ValueError):
    fit_temperature(z, labels, min_temperature=2.0, max_temperature=1.0)


@pytest.mark.parametrize("n", [360, 1037])
def test_classification_summary_reports_both_rms_conventions(n):
  """``rms_calibration_error`` counts every bin; ``rms_calibration_error_hpt``
  is HPT's calib_err (last bin never counted)."""
  from jaxrobust.evaluators.classification import summarize
  logits, probs, labels = _model(n, seed=n)
  out = summarize(logits, labels, bin_size=100)
  conf = probs.astype(np.float64).max(1)
  correct = (probs.argmax(1) == labels).astype(np.float64)
  np.testing.assert_allclose(out["rms_calibration_error"],
                             ref.hendrycks_calib_err(conf, correct, count_last_bin=True), **TOL)
  np.testing.assert_allclose(out["rms_calibration_error_hpt"],
                             ref.hendrycks_calib_err(conf, correct, count_last_bin=False), **TOL)
  assert out["rms_calibration_error"] != out["rms_calibration_error_hpt"]
