"""Streaming accumulators: batches, merges, sharding, and histogram bounds."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from jaxrobust.metrics import calibration, ood
from jaxrobust.metrics.streaming import (
    CalibrationHistogram, ExactOOD, OODHistogram)

BATCH = 16


def _batches(x, size=BATCH):
  """Padded batches (garbage in the padding) with their masks."""
  for i in range(0, len(x), size):
    chunk = x[i:i + size]
    mask = np.arange(size) < len(chunk)
    yield np.pad(chunk, (0, size - len(chunk)), constant_values=np.nan), mask


def _data(seed, n_in=70, n_out=45):
  rng = np.random.default_rng(seed)
  xi = np.round(rng.beta(6, 2, n_in), 2).astype(np.float32)
  xo = np.round(rng.beta(3, 3, n_out), 2).astype(np.float32)
  return xi, xo


def _assert_same(a, b, tol=0.0):
  assert set(a) == set(b)
  for k in a:
    assert abs(float(a[k]) - float(b[k])) <= tol, (k, float(a[k]), float(b[k]))


# ----------------------------------------------------------------------------
# ExactOOD.
# ----------------------------------------------------------------------------


def _fill(acc, state, xi, xo, update):
  for x, m in _batches(xi):
    state = update(state, x, m, None, None)
  for x, m in _batches(xo):
    state = update(state, None, None, x, m)
  return state


@pytest.mark.slow
def test_exact_padded_batches_equal_one_shot_under_jit():
  xi, xo = _data(0)
  acc = ExactOOD(capacity_in=96, capacity_out=64)

  @jax.jit
  def upd_in(state, x, m):
    return acc.update(state, in_scores=x, in_mask=m)

  @jax.jit
  def upd_out(state, x, m):
    return acc.update(state, out_scores=x, out_mask=m)

  state = acc.init()
  for x, m in _batches(xi):
    state = upd_in(state, x, m)
  for x, m in _batches(xo):
    state = upd_out(state, x, m)
  pi, po = np.pad(xi, (0, 26)), np.pad(xo, (0, 19))
  masks = dict(in_mask=np.arange(96) < 70, out_mask=np.arange(64) < 45)
  for preset in ("hendrycks", "lee"):
    _assert_same(acc.compute(state, preset), ood.ood_metrics(pi, po, preset, **masks))
  _assert_same(acc.compute(state, "openood"), ood.ood_metrics(xi, xo, "openood"))


def test_exact_overflow_raises_eagerly_and_gives_nan_under_jit():
  acc = ExactOOD(capacity_in=20, capacity_out=20)
  state = acc.update(acc.init(), in_scores=np.ones(16), out_scores=np.zeros(16))
  with pytest.raises(ValueError, match="overflow"):
    acc.update(state, in_scores=np.ones(16))
  jitted = jax.jit(lambda s, x: acc.update(s, in_scores=x))(state, jnp.ones(16))
  assert bool(jitted.overflow)
  # The rejected batch was not written over the stored scores.
  np.testing.assert_array_equal(np.asarray(jitted.in_scores), np.asarray(state.in_scores))
  out = jax.jit(acc.compute)(jitted)
  assert all(np.isnan(float(v)) for v in out.values())


@pytest.mark.slow
def test_exact_merge_is_associative_and_commutative():
  xi, xo = _data(1)
  acc = ExactOOD(capacity_in=48, capacity_out=32)
  parts = []
  for lo, hi in ((0, 30), (30, 50), (50, 70)):
    s = acc.update(acc.init(), in_scores=np.pad(xi[lo:hi], (0, 48 - (hi - lo))),
                   in_mask=np.arange(48) < hi - lo)
    parts.append(acc.update(s, out_scores=np.pad(xo[lo // 2:hi // 2], (0, 32 - (hi - lo) // 2)),
                            out_mask=np.arange(32) < (hi - lo) // 2))
  a, b, c = parts
  left = acc.merge(acc.merge(a, b), c)
  right = acc.merge(a, acc.merge(c, b))
  want = ood.ood_metrics(xi, xo[:35], "lee")
  _assert_same(acc.compute(left, "lee"), want)
  _assert_same(acc.compute(right, "lee"), want)
  assert int(left.in_used) == 70 and left.in_scores.shape == (144,)


def _mesh():
  return jax.make_mesh((8,), ("data",))


def _run_sharded(local, *xs):
  """jit(shard_map(local)) over 8 devices, inputs split along 'data'."""
  mesh = _mesh()
  xs = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * len(xs),
                               out_specs=P()))(*xs)


@pytest.mark.slow
def test_accumulators_with_batches_sharded_over_8_devices():
  xi, xo = _data(2, n_in=128, n_out=64)
  conf, correct = _calibration_data(7, n=128)
  mesh = _mesh()  # Explicit axes (jax.make_mesh default)
  sharded = NamedSharding(mesh, P("data"))
  put = lambda x: jax.device_put(x, sharded)
  acc, hist, cal = ExactOOD(128, 64), OODHistogram(40), CalibrationHistogram(15)
  with jax.set_mesh(mesh):
    step = jax.jit(lambda s, h, c, x, m, k: (
        acc.update(s, in_scores=x, in_mask=m), hist.update(h, in_scores=x, in_mask=m),
        cal.update(c, x, k, mask=m)))
    state, hstate, cstate = acc.init(), hist.init(), cal.init()
    for (x, m), (k, _) in zip(_batches(xi, 32), _batches(correct.astype(np.float32), 32)):
      state, hstate, cstate = step(state, hstate, cstate, put(np.nan_to_num(x)), put(m),
                                   put(k > 0))
    state = acc.update(state, out_scores=put(xo))
    hstate = hist.update(hstate, out_scores=put(xo))
    _assert_same(jax.jit(acc.compute)(state), ood.ood_metrics(xi, xo))
    assert float(jax.jit(ood.auroc)(put(xi), put(xo))) == pytest.approx(
        float(ood.auroc(xi, xo)), abs=1e-7)
  want = hist.update(hist.init(), xi, xo)
  for u, v in zip(jax.tree.leaves(hstate), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert float(cal.compute(cstate)) == pytest.approx(
      float(calibration.expected_calibration_error(xi, correct, num_bins=15)), abs=1e-7)


@pytest.mark.slow
def test_exact_per_device_states_merged_after_shard_map():
  xi, xo = _data(3, n_in=128, n_out=64)
  mesh = _mesh()
  acc = ExactOOD(capacity_in=16, capacity_out=8)

  def local(x_in, x_out):
    s = acc.update(acc.init(), in_scores=x_in, out_scores=x_out)
    return jax.tree.map(lambda v: v[None], s)

  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  stacked = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=P("data")))(put(xi), put(xo))
  assert stacked.in_scores.shape == (8, 16)
  _assert_same(acc.compute(acc.merge_stacked(stacked), "openood"),
               ood.ood_metrics(xi, xo, "openood"))


# ----------------------------------------------------------------------------
# OODHistogram.
# ----------------------------------------------------------------------------


HIST_PAD = 48  # exact references padded like tests/test_metrics_ood.py: shared compiles


def _exact(xi, xo):
  pad = lambda x: (np.pad(x, (0, HIST_PAD - len(x))), np.arange(HIST_PAD) < len(x))
  (pi, mi), (po, mo) = pad(xi), pad(xo)
  kw = dict(in_mask=mi, out_mask=mo)
  return {
      "auroc": float(ood.auroc(pi, po, **kw)),
      "aupr_in": float(ood.aupr_in(pi, po, **kw)),
      "aupr_out": float(ood.aupr_out(pi, po, **kw)),
      "fpr": {(p, s): float(ood.fpr_at_tpr(pi, po, positive=p, select=s, **kw))
              for p in ("in", "out") for s in ("nearest", "first_ge")},
  }


def _assert_bounds_hold(hist, xi, xo):
  state = hist.update(hist.init(), xi, xo)
  exact = _exact(xi, xo)
  eps = 1e-6
  by_pos = {p: hist.compute(state, positive=p) for p in ("in", "out")}
  got = by_pos["in"]
  assert abs(float(got["auroc"]) - exact["auroc"]) <= float(got["auroc_bound"]) + eps
  for side in ("in", "out"):
    lo, hi = float(got[f"aupr_{side}_lower"]), float(got[f"aupr_{side}_upper"])
    assert lo - eps <= exact[f"aupr_{side}"] <= hi + eps, side
    assert lo - eps <= float(got[f"aupr_{side}"]) <= hi + eps
  for (p, s), v in exact["fpr"].items():
    r = by_pos[p]
    assert float(r["fpr_lower"]) - eps <= v <= float(r["fpr_upper"]) + eps, (p, s)
    assert float(r["fpr_lower"]) - eps <= float(r["fpr"]) <= float(r["fpr_upper"]) + eps
  return got, exact


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_histogram_bounds_hold_on_random_inputs(seed):
  rng = np.random.default_rng(seed)
  xi = rng.beta(5, 2, 45).astype(np.float32)
  xo = rng.beta(2, 3, 33).astype(np.float32)
  if seed % 2:  # heavy ties shared across sides
    xi, xo = np.round(xi, 2), np.round(xo, 2)
  _assert_bounds_hold(OODHistogram(num_bins=10), xi, xo)


@pytest.mark.slow
def test_histogram_auroc_bound_is_attained():
  # In every bin all ID scores sit above all OOD scores: exact - hist = bound.
  centers = np.arange(10) / 10
  xi = np.repeat(centers + 0.09, 4).astype(np.float32)
  xo = np.repeat(centers + 0.01, 3).astype(np.float32)
  got, exact = _assert_bounds_hold(OODHistogram(num_bins=10), xi, xo)
  assert exact["auroc"] - float(got["auroc"]) == pytest.approx(float(got["auroc_bound"]), abs=1e-7)
  got2, exact2 = _assert_bounds_hold(OODHistogram(num_bins=10), xo, xi)  # OOD above ID
  assert float(got2["auroc"]) - exact2["auroc"] == pytest.approx(float(got2["auroc_bound"]), abs=1e-7)
  fine = OODHistogram(num_bins=1000)
  r = fine.compute(fine.update(fine.init(), xi, xo))
  assert float(r["auroc_bound"]) == 0.0 and float(r["auroc"]) == pytest.approx(exact["auroc"])


def test_histogram_clips_and_counts_out_of_range_scores():
  xi = np.array([-3.0, 0.2, 0.9, 1.7], np.float32)
  xo = np.array([-1.0, 0.1, 0.5], np.float32)
  hist = OODHistogram(num_bins=10)
  state = hist.update(hist.init(), xi, xo)
  np.testing.assert_array_equal(np.asarray(state.in_counts), [1, 0, 1, 0, 0, 0, 0, 0, 0, 2])
  np.testing.assert_array_equal(np.asarray(state.in_clipped), [1, 1])
  r = hist.compute(state)
  assert int(r["clipped_in"]) == 2 and int(r["clipped_out"]) == 1
  _assert_bounds_hold(hist, xi, xo)


@pytest.mark.slow
def test_histogram_merge_psum_and_nan_under_jit():
  xi, xo = _data(4, n_in=128, n_out=64)
  hist = OODHistogram(num_bins=10)
  one_shot = hist.update(hist.init(), xi, xo)
  a = hist.update(hist.init(), xi[:40], xo[:10])
  b = hist.update(hist.init(), xi[40:], xo[10:])
  merged = hist.merge(b, a)
  for u, v in zip(jax.tree.leaves(merged), jax.tree.leaves(one_shot)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))

  def local(x_in, x_out):
    s = hist.update(hist.init(), x_in, x_out)
    return jax.tree.map(lambda v: lax.psum(v, "data"), s)

  summed = _run_sharded(local, xi, xo)
  for u, v in zip(jax.tree.leaves(summed), jax.tree.leaves(one_shot)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  bad = jax.jit(lambda s, x: hist.update(s, in_scores=x))(one_shot, jnp.array([np.nan, 0.5]))
  assert int(bad.nonfinite) == 1
  assert np.isnan(float(hist.compute(bad)["auroc"]))
  with pytest.raises(ValueError, match="NaN"):
    hist.update(one_shot, in_scores=np.array([np.nan, 0.5]))


# ----------------------------------------------------------------------------
# CalibrationHistogram.
# ----------------------------------------------------------------------------


def _calibration_data(seed, n=203):
  rng = np.random.default_rng(seed)
  conf = rng.random(n).astype(np.float32)
  conf[:5] = [0.0, 1.0, 1 / 15, 2 / 15, 14 / 15]  # bin edges
  correct = rng.random(n) < conf
  return conf, correct


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_calibration_histogram_equals_ece(norm):
  conf, correct = _calibration_data(5)
  cal = CalibrationHistogram(num_bins=15)
  update = jax.jit(lambda s, c, k, m: cal.update(s, c, k, mask=m))
  state = cal.init()
  for (c, m), (k, _) in zip(_batches(conf, 32), _batches(correct.astype(np.float32), 32)):
    state = update(state, np.nan_to_num(c), np.nan_to_num(k).astype(bool), m)
  want = calibration.expected_calibration_error(conf, correct, num_bins=15, norm=norm)
  assert float(cal.compute(state, norm)) == pytest.approx(float(want), abs=1e-7)


@pytest.mark.slow
def test_calibration_merge_and_psum_match_one_shot():
  conf, correct = _calibration_data(6, n=256)
  cal = CalibrationHistogram(num_bins=10)
  want = float(calibration.expected_calibration_error(conf, correct, num_bins=10))
  parts = [cal.update(cal.init(), conf[i::3], correct[i::3]) for i in range(3)]
  merged = cal.merge(cal.merge(parts[0], parts[1]), parts[2])
  assert float(cal.compute(merged)) == pytest.approx(want, abs=1e-7)
  assert int(jnp.sum(merged.count)) == 256

  def local(c, k):
    s = cal.update(cal.init(), c, k)
    return jax.tree.map(lambda v: lax.psum(v, "data"), s)

  summed = _run_sharded(local, conf, correct)
  assert float(cal.compute(summed)) == pytest.approx(want, abs=1e-7)
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *parts)
  assert float(cal.compute(cal.merge_stacked(stacked))) == pytest.approx(want, abs=1e-7)


def test_calibration_rejects_bad_confidences():
  cal = CalibrationHistogram()
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    cal.update(cal.init(), np.array([0.5, 1.2]), np.array([True, False]))
  state = jax.jit(cal.update)(cal.init(), jnp.array([0.5, 1.2]), jnp.array([True, False]))
  assert np.isnan(float(cal.compute(state)))
