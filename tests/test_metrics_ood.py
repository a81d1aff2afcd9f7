"""OOD metrics against scikit-learn and numpy ports of the reference code."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

import reference_ood as ref
from jaxrobust.metrics import ood, ranking

TOL = 1e-6
PAD = 48  # every random case is padded to this length, so each core compiles once


def _pad(x, fill):
  m = np.arange(PAD) < len(x)
  return np.pad(np.asarray(x, np.float32), (0, PAD - len(x)), constant_values=fill), m


def _references(xi, xo):
  """Every reference number for ID scores xi and OOD scores xo (higher = ID)."""
  h = ref.hendrycks_measures(-xo, -xi)   # HPT/OE: OOD positive, anomaly scores
  e = ref.hendrycks_measures(xi, xo)     # energy_ood: ID positive
  o = ref.openood_metrics(xi, xo)
  lee = ref.lee_metrics(xi, xo)
  return {
      "hendrycks": {"auroc": h[0], "aupr_out": h[1], "fpr95": h[2]},
      "energy": {"auroc": e[0], "aupr_in": e[1], "fpr95": e[2]},
      "openood": {"auroc": o[0], "aupr_in": o[1], "aupr_out": o[2], "fpr95": o[3]},
      "lee": {"tnr95": lee["TNR"], "auroc": lee["AUROC"],
              "detection_accuracy": lee["DTACC"], "aupr_in": lee["AUIN"],
              "aupr_out": lee["AUOUT"]},
  }


def _assert_presets(xi, xo, fill_in=np.nan, fill_out=-1e30):
  """All presets on inputs padded to PAD (garbage in the padding)."""
  want = _references(xi, xo)
  (pi, mi), (po, mo) = _pad(xi, fill_in), _pad(xo, fill_out)
  for preset, ref_vals in want.items():
    got = ood.ood_metrics(pi, po, preset, in_mask=mi, out_mask=mo)
    assert set(got) == set(ref_vals), preset
    for k, v in ref_vals.items():
      assert abs(float(got[k]) - v) <= TOL, (preset, k, float(got[k]), v, xi, xo)


def _tied_case(rng):
  n_in, n_out = (int(v) for v in rng.integers(1, PAD + 1, 2))
  if rng.random() < 0.3:  # n_in a multiple of 10: exercises float64 tie-breaks
    n_in = int(rng.choice([10, 20, 30, 40]))
  levels = int(rng.integers(1, 7))
  xi = rng.integers(0, levels, n_in).astype(np.float32)
  xo = rng.integers(0, levels, n_out).astype(np.float32) - rng.integers(0, 2)
  return xi, xo


def test_presets_match_references_on_tied_padded_inputs():
  rng = np.random.default_rng(0)
  for _ in range(60):
    _assert_presets(*_tied_case(rng))


@pytest.mark.slow
def test_presets_match_references_at_scale():
  # Both sides > 1024 entries: the windowed search over sorted queries runs.
  rng = np.random.default_rng(8)
  xi = np.round(1 - 0.9 * rng.beta(0.5, 8, 1500), 3).astype(np.float32)
  xi[rng.random(1500) < 0.3] = 1.0
  xo = np.round(1 - 0.9 * rng.beta(1, 3, 1200), 3).astype(np.float32)
  want = _references(xi, xo)
  mi, mo = np.arange(1600) < 1500, np.arange(1300) < 1200
  pi, po = np.pad(xi, (0, 100), constant_values=7.0), np.pad(xo, (0, 100))
  for preset, ref_vals in want.items():
    got = ood.ood_metrics(pi, po, preset, in_mask=mi, out_mask=mo)
    for k, v in ref_vals.items():
      assert abs(float(got[k]) - v) <= TOL, (preset, k)
  assert abs(float(ood.auroc(xo, xi)) - (1 - want["energy"]["auroc"])) <= TOL


@pytest.mark.slow
def test_single_metrics_match_sklearn_and_ports():
  rng = np.random.default_rng(1)
  for _ in range(40):
    xi, xo = _tied_case(rng)
    (pi, mi), (po, mo) = _pad(xi, 0.0), _pad(xo, 0.0)
    kw = dict(in_mask=mi, out_mask=mo)
    y = np.r_[np.ones(len(xi)), np.zeros(len(xo))]
    s = np.r_[xi, xo].astype(np.float64)
    p_in, r_in, _ = skm.precision_recall_curve(y, s)
    p_out, r_out, _ = skm.precision_recall_curve(1 - y, -s)
    fpr_c, tpr_c, _ = skm.roc_curve(y, s)
    lee = ref.lee_metrics(xi, xo)
    pairs = [
        (ood.auroc(pi, po, **kw), skm.roc_auc_score(y, s)),
        (ood.aupr_in(pi, po, **kw), skm.average_precision_score(y, s)),
        (ood.aupr_out(pi, po, **kw), skm.average_precision_score(1 - y, -s)),
        (ood.aupr_in(pi, po, method="trapezoid", **kw), skm.auc(r_in, p_in)),
        (ood.aupr_out(pi, po, method="trapezoid", **kw), skm.auc(r_out, p_out)),
        (ood.fpr_at_tpr(pi, po, **kw), ref.hendrycks_fpr_at_recall(y, s)),
        (ood.fpr_at_tpr(pi, po, positive="out", **kw),
         ref.hendrycks_fpr_at_recall(1 - y, -s)),
        (ood.fpr_at_tpr(pi, po, select="first_ge", **kw),
         fpr_c[np.argmax(tpr_c >= 0.95)]),
        (ood.fpr_at_tpr(pi, po, 0.9, positive="out", select="first_ge", **kw),
         ref.openood_metrics(xi, xo, 0.9)[3]),
        (ood.fpr_at_tpr(pi, po, 0.8, **kw), ref.hendrycks_fpr_at_recall(y, s, 0.8)),
        (ood.tnr_at_tpr(pi, po, **kw), lee["TNR"]),
        (ood.detection_accuracy(pi, po, **kw), lee["DTACC"]),
    ]
    for i, (got, want) in enumerate(pairs):
      assert abs(float(got) - want) <= TOL, (i, float(got), want, xi, xo)


def _collinear_case(rng):
  """Scores 0..L-1 whose (#OOD, #ID) per value often repeats: straight runs
  of equal steps, which sklearn's roc_curve drops (drop_intermediate)."""
  steps = [(1, 1), (2, 1), (1, 2), (0, 1), (1, 0), (2, 2)]
  cur, a, b = steps[0], [], []
  for _ in range(int(rng.integers(3, 15))):
    if rng.random() < 0.3:
      cur = steps[rng.integers(len(steps))]
    a.append(cur[0])
    b.append(cur[1])
  levels = np.arange(len(a), dtype=np.float32)
  xi, xo = np.repeat(levels, b), np.repeat(levels, a)
  return (xi if xi.size else np.array([0.5], np.float32),
          xo if xo.size else np.array([0.5], np.float32))


@pytest.mark.slow
def test_first_ge_follows_roc_curve_point_dropping():
  rng = np.random.default_rng(7)
  dropped = 0
  for _ in range(25):
    xi, xo = _collinear_case(rng)
    (pi, mi), (po, mo) = _pad(xi, 0.0), _pad(xo, 0.0)
    for positive in ("in", "out"):
      sign = 1.0 if positive == "in" else -1.0
      y = np.r_[np.ones(len(xi)), np.zeros(len(xo))]
      y = y if positive == "in" else 1 - y
      fpr_c, tpr_c, _ = skm.roc_curve(y, sign * np.r_[xi, xo])
      fpr_all, tpr_all, _ = skm.roc_curve(y, sign * np.r_[xi, xo], drop_intermediate=False)
      for tpr in (0.5, 0.95):
        want = fpr_c[np.argmax(tpr_c >= tpr)]
        dropped += want != fpr_all[np.argmax(tpr_all >= tpr)]
        got = ood.fpr_at_tpr(pi, po, tpr, positive=positive, select="first_ge",
                             in_mask=mi, out_mask=mo)
        assert abs(float(got) - want) <= TOL, (xi, xo, positive, tpr)
    _assert_presets(xi, xo)
  assert dropped >= 10  # the quirk was exercised


@pytest.mark.parametrize("xi, xo", [
    (np.full(7, 0.3), np.full(5, 0.3)),            # all scores equal
    (np.array([0.7]), np.array([0.2])),            # one example per side
    (np.array([0.2]), np.array([0.7])),
    (np.array([0.5]), np.array([0.5])),
    (np.arange(20.0), np.arange(20.0)),            # one ID and one OOD per value
    (np.r_[np.ones(19), 0.0], np.r_[1.0, np.zeros(9)]),  # n_in=20: tie at 0.95
])
def test_degenerate_inputs(xi, xo):
  _assert_presets(np.asarray(xi, np.float32), np.asarray(xo, np.float32))


def test_float64_tie_break_of_nearest_recall():
  # n_in = 20 ID scores, recall jumps from 18/20 to 20/20: both 0.05 from 0.95
  # in exact arithmetic, but float64 makes 0.9 the nearer one.
  xi = np.r_[np.full(18, 2.0), np.full(2, 1.0)].astype(np.float32)
  xo = np.array([0.0, 1.0, 1.5, 3.0], np.float32)
  y = np.r_[np.ones(20), np.zeros(4)]
  want = ref.hendrycks_fpr_at_recall(y, np.r_[xi, xo])
  assert want == 0.5  # the 18/20 point: OOD 1.5 and 3.0 accepted
  assert float(ood.fpr_at_tpr(xi, xo)) == want
  assert float(ood.ood_metrics(xi, xo, "energy")["fpr95"]) == want


def test_tie_break_rule_against_numpy_float64():
  rng = np.random.default_rng(2)
  for value in (0.95, 0.99, 0.6):
    rate = ranking.as_rate("tpr", value)
    n = np.r_[np.arange(1, 400), rng.integers(400, 2**30, 600)].astype(np.int64)
    target = n * rate.p / rate.q
    k_lo = np.floor(target).astype(np.int64) - rng.integers(0, 3, n.size)
    k_hi = np.ceil(target).astype(np.int64) + rng.integers(0, 3, n.size)
    # exact ties in distance, wherever 2 * target is an integer
    tie = (2 * n * rate.p) % rate.q == 0
    half = (2 * n * rate.p) // rate.q
    k_lo = np.where(tie, np.floor(target) - (k_hi - np.ceil(target)), k_lo).astype(np.int64)
    k_hi = np.where(tie, half - k_lo, k_hi)
    ok = (k_lo >= 0) & (k_hi <= n) & (k_lo <= k_hi)
    k_lo, k_hi, n = (np.where(ok, v, fallback) for v, fallback in
                     ((k_lo, 0), (k_hi, 1), (n, 1)))  # fixed length: one compile
    want = ~(np.abs(k_lo / n - value) < np.abs(k_hi / n - value))
    got = ranking.nearest_picks_upper(jnp.asarray(k_lo, jnp.int32),
                                      jnp.asarray(k_hi, jnp.int32),
                                      jnp.asarray(n, jnp.int32), rate)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(value))
    if value == 0.95:  # some exact ties do go to the lower recall in float64
      assert (tie & ok & ~want).any() and (tie & ok & want).any()


def test_scores_one_ulp_apart_and_negative_zero():
  base = np.float32(0.75)
  up = np.nextafter(base, np.float32(1))
  xi = np.array([up, up, base, -0.0], np.float32)
  xo = np.array([base, base, 0.0, np.nextafter(base, np.float32(0))], np.float32)
  _assert_presets(xi, xo)
  assert float(ood.auroc(xi, xo)) == pytest.approx(
      skm.roc_auc_score(np.r_[np.ones(4), np.zeros(4)], np.r_[xi, xo]), abs=TOL)


@pytest.mark.slow
def test_extreme_imbalance():
  rng = np.random.default_rng(3)
  xo = np.round(rng.normal(size=100_000), 2).astype(np.float32)
  xi = np.array([0.5], np.float32)
  y = np.r_[1.0, np.zeros(xo.size)]
  s = np.r_[xi, xo]
  h = ref.hendrycks_measures(-xo, -xi)
  got = ood.ood_metrics(xi, xo, "hendrycks")
  assert abs(float(got["auroc"]) - skm.roc_auc_score(y, s)) <= TOL
  assert abs(float(got["aupr_out"]) - h[1]) <= TOL
  assert abs(float(got["fpr95"]) - h[2]) <= TOL
  assert abs(float(ood.aupr_in(xi, xo)) - skm.average_precision_score(y, s)) <= TOL
  assert abs(float(ood.fpr_at_tpr(xi, xo)) - ref.hendrycks_fpr_at_recall(y, s)) <= TOL


@pytest.mark.slow
def test_counts_beyond_float32_integer_range():
  n_in = 2**24 + 5  # per-side counts and sums no longer exact in float32
  xi = np.zeros(n_in, np.float32)
  xi[:3] = 2.0
  xi[3:10] = 1.0
  xo = np.array([1.0, -1.0, 3.0], np.float32)
  # in > out pairs: 3*2 + 7*1 + (n_in - 10); ties: 7 (score 1); pairs 3*n_in
  want = (13 + (n_in - 10) + 0.5 * 7) / (3 * n_in)
  assert float(ood.auroc(xi, xo)) == pytest.approx(want, abs=1e-7)
  # ID positive: recall jumps from 10/n_in to 1 at score 0 -> FPR = 2/3.
  assert float(ood.fpr_at_tpr(xi, xo)) == pytest.approx(2 / 3, abs=1e-7)
  ones = jnp.full((2**25 + 3,), 0.1, jnp.float32)
  assert float(ranking.accurate_sum(ones)) == pytest.approx(0.1 * (2**25 + 3), rel=2e-7)


@pytest.mark.slow
def test_masks_drop_padding_exactly():
  rng = np.random.default_rng(4)
  xi, xo = rng.random(30).astype(np.float32), rng.random(17).astype(np.float32)
  full = ood.ood_metrics(xi, xo, "openood")
  pi = np.r_[xi, np.nan, np.inf, -5.0].astype(np.float32)
  po = np.r_[9.0, xo, 9.0].astype(np.float32)
  mi = np.r_[np.ones(30), 0, 0, 0]
  mo = np.r_[False, np.ones(17, bool), False]
  padded = ood.ood_metrics(pi, po, "openood", in_mask=mi, out_mask=mo)
  for k in full:
    assert float(padded[k]) == float(full[k]), k


def test_jit_and_nan_instead_of_wrong_numbers():
  xi, xo = np.array([0.9, 0.8, 0.1], np.float32), np.array([0.3, 0.2], np.float32)
  assert float(jax.jit(ood.auroc)(xi, xo)) == pytest.approx(4 / 6)
  f = jax.jit(lambda a, b, m: ood.ood_metrics(a, b, "lee", in_mask=m))
  got = f(xi, xo, np.ones(3, bool))
  assert all(np.isfinite(float(v)) for v in got.values())
  want = _references(xi, xo)["lee"]  # under jit, the reference's numbers
  assert {k: float(got[k]) for k in want} == pytest.approx(want, abs=TOL)
  bad = xi.copy()
  bad[1] = np.nan
  assert all(np.isnan(float(v)) for v in f(bad, xo, np.ones(3, bool)).values())
  assert all(np.isnan(float(v)) for v in f(xi, xo, np.zeros(3, bool)).values())
  g = jax.jit(lambda a, b: ood.fpr_at_tpr(a, b, select="first_ge"))
  assert np.isnan(float(g(xi, np.array([np.inf, 0.2], np.float32))))


@pytest.mark.parametrize("call, match", [
    (lambda: ood.auroc(np.ones((2, 2)), np.ones(3)), "1-D"),
    (lambda: ood.auroc(np.ones(3), np.ones(3), in_mask=np.ones(2)), "shape"),
    (lambda: ood.auroc(np.ones(3), np.ones(3), out_mask=np.zeros(3)), "empty"),
    (lambda: ood.auroc(np.array([1.0, np.nan]), np.ones(3)), "NaN"),
    (lambda: ood.aupr_in(np.ones(3), np.ones(3), method="interp"), "method"),
    (lambda: ood.fpr_at_tpr(np.ones(3), np.ones(3), positive="ood"), "positive"),
    (lambda: ood.fpr_at_tpr(np.ones(3), np.ones(3), select="last"), "select"),
    (lambda: ood.fpr_at_tpr(np.ones(3), np.ones(3), tpr=1.5), "tpr"),
    (lambda: ood.fpr_at_tpr(np.ones(3), np.ones(3), tpr=0.123456789), "fraction"),
    (lambda: ood.ood_metrics(np.ones(3), np.ones(3), "odin"), "preset"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.slow
def test_low_precision_inputs_are_upcast_exactly():
  rng = np.random.default_rng(5)
  xi = rng.random(40).astype(np.float32)
  xo = rng.random(25).astype(np.float32)
  for dt in (jnp.float16, jnp.bfloat16):
    a, b = jnp.asarray(xi, dt), jnp.asarray(xo, dt)
    want = ood.ood_metrics(np.asarray(a.astype(jnp.float32)),
                           np.asarray(b.astype(jnp.float32)), "energy")
    got = ood.ood_metrics(a, b, "energy")
    assert all(float(got[k]) == float(want[k]) for k in want)


@pytest.mark.slow
def test_orientation_identities():
  rng = np.random.default_rng(6)
  xi = rng.integers(0, 5, PAD).astype(np.float32)
  xo = rng.integers(0, 5, PAD).astype(np.float32)
  assert float(ood.auroc(xi, xo)) == pytest.approx(1 - float(ood.auroc(xo, xi)), abs=TOL)
  for method in ("ap", "trapezoid"):
    assert float(ood.aupr_out(xi, xo, method=method)) == pytest.approx(
        float(ood.aupr_in(-xo, -xi, method=method)), abs=TOL)
  for select in ("nearest", "first_ge"):
    assert float(ood.fpr_at_tpr(xi, xo, positive="out", select=select)) == pytest.approx(
        float(ood.fpr_at_tpr(-xo, -xi, positive="in", select=select)), abs=TOL)


def test_import_needs_no_flax_or_tensorflow():
  code = ("import sys, jaxrobust.metrics.ood, jaxrobust.metrics.streaming; "
          "bad = [m for m in ('flax', 'tensorflow', 'tensorflow_datasets') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
