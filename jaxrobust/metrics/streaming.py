"""Streaming metric accumulators for jitted, sharded evaluation loops.

Each accumulator is a frozen (hashable, static) config object with
``init() -> state``, ``update(state, ...) -> state``, ``merge(a, b) ->
state`` and ``compute(state, ...)``. States are ``NamedTuple`` pytrees of
arrays: carry them through ``jax.jit`` / ``lax.scan``, shard them, and merge
them across devices and hosts. Nothing here imports flax.

* :class:`ExactOOD` keeps every score in fixed-capacity buffers (static shape,
  validity mask, write offset) and calls the exact metrics of
  :mod:`jaxrobust.metrics.ood`. Memory O(examples).
* :class:`OODHistogram` keeps per-bin counts over a declared score range.
  Memory O(bins), merged by addition (``lax.psum`` under ``shard_map``, a
  plain sum of states otherwise). Every metric comes with a guaranteed
  error bound or bracket relative to the exact metric.
* :class:`CalibrationHistogram` keeps per-bin count, correct count and sum of
  confidences over equal-width confidence bins: equal-width ECE (l1/l2/max)
  from it equals :func:`jaxrobust.metrics.calibration.expected_calibration_error`
  with the same number of bins (same bin edges, same combination), up to
  float rounding of the confidence sums (kept as compensated float pairs).

Input regimes follow the metrics: an eager ``update`` with NaN/inf scores (or
confidences outside [0, 1]) raises ``ValueError``; under ``jit`` such entries
are counted in the state and make ``compute`` return NaN. Buffer overflow of
:class:`ExactOOD` raises eagerly and makes ``compute`` NaN under ``jit``.

Across hosts: gather states with
``jax.experimental.multihost_utils.process_allgather(state)`` (adds a leading
process axis) and combine with ``merge_stacked`` (histograms: sum over that
axis; exact buffers: concatenation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxrobust.metrics import calibration, ood, ranking
from jaxrobust.metrics._validate import (
    as_1d, check_choice, check_scores, is_traced, mask_or_ones)

Array = jax.Array


def _concrete(*xs) -> bool:
  return not is_traced(*xs)


def _match(x: Array, ref: Array) -> Array:
  """Gives a batch array the sharding of the state under explicit sharding.

  With ``jax.make_mesh`` (Explicit axes by default) a batch sharded over
  ``'data'`` cannot be scattered or sliced into a replicated state
  implicitly; this all-gathers the (small) batch. No-op otherwise.
  """
  target = jax.typeof(ref).sharding
  if target.mesh.empty or jax.typeof(x).sharding == target:
    return x
  return jax.sharding.reshard(x, target)


def _batch(name: str, x, mask, ref: Array):
  x = _match(as_1d(name, x), ref)
  m = _match(mask_or_ones(name.replace("scores", "mask"), mask, x.shape), ref)
  if _concrete(x, m) and np.asarray(m).any():
    check_scores(name, x, m)
  return x, m


def _sides(fields: dict, ref: str, in_scores, out_scores, in_mask, out_mask):
  """Yields (side, scores, mask) for each side given, validated and sharded
  like ``fields[f"{side}_{ref}"]``."""
  for side, x, m in (("in", in_scores, in_mask), ("out", out_scores, out_mask)):
    if x is not None:
      yield (side, *_batch(f"{side}_scores", x, m, fields[f"{side}_{ref}"]))


def _sum_stacked(stacked):
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)


# ----------------------------------------------------------------------------
# Exact buffers.
# ----------------------------------------------------------------------------


class ExactOODState(NamedTuple):
  in_scores: Array   # (capacity_in,) float32
  in_valid: Array    # (capacity_in,) bool
  in_used: Array     # int32: slots written so far (the next write offset)
  out_scores: Array
  out_valid: Array
  out_used: Array
  overflow: Array    # bool: some batch did not fit


def _append(buf, valid, used, x, m):
  """Writes a batch at the offset ``used`` with ``dynamic_update_slice``.

  A batch that does not fit is not written (the slice at the clamped offset
  is rewritten with its own content) and reported as overflow.
  """
  size, cap = x.shape[0], buf.shape[0]
  if size > cap:
    raise ValueError(f"batch of {size} scores exceeds the buffer capacity {cap}.")
  fits = used + size <= cap
  start = jnp.minimum(used, cap - size)
  old_x = lax.dynamic_slice(buf, (start,), (size,))
  old_m = lax.dynamic_slice(valid, (start,), (size,))
  buf = lax.dynamic_update_slice(buf, jnp.where(fits, x.astype(buf.dtype), old_x), (start,))
  valid = lax.dynamic_update_slice(valid, jnp.where(fits, m, old_m), (start,))
  return buf, valid, jnp.where(fits, used + size, used), ~fits


def _compact(scores: Array, valid: Array) -> tuple[Array, Array, Array]:
  """Moves valid entries to the front (order kept); returns (scores, valid, n)."""
  v = valid.astype(jnp.int32)
  n = jnp.sum(v)
  pos = jnp.where(valid, jnp.cumsum(v) - 1, n + jnp.cumsum(1 - v) - 1)
  out = jnp.zeros_like(scores).at[pos].set(scores, unique_indices=True)
  return out, jnp.arange(scores.shape[0]) < n, n


@dataclasses.dataclass(frozen=True)
class ExactOOD:
  """Exact OOD metrics over a stream: scores kept in fixed-capacity buffers.

  Usage (inside or outside ``jax.jit``)::

    acc = ExactOOD(capacity_in=10_000, capacity_out=20_000)
    state = acc.init()
    for batch in id_batches:
      state = acc.update(state, in_scores=msp(batch), in_mask=batch_mask)
    for batch in ood_batches:
      state = acc.update(state, out_scores=msp(batch), out_mask=batch_mask)
    metrics = acc.compute(state, preset="hendrycks")

  Each update writes the whole (padded) batch and its mask at the write
  offset, so memory is sized in padded slots. Under global-view ``jit`` with
  sharded batches nothing else is needed (with an Explicit-axes mesh, run
  inside ``jax.set_mesh(mesh)``: the batch is gathered into the replicated
  buffer); with per-device states
  (``shard_map``) or per-host states, gather them (``lax.all_gather`` /
  ``process_allgather``) and call :meth:`merge_stacked`.
  """
  capacity_in: int
  capacity_out: int
  dtype: type = jnp.float32

  def init(self) -> ExactOODState:
    z = lambda c: (jnp.zeros((c,), self.dtype), jnp.zeros((c,), bool), jnp.zeros((), jnp.int32))
    return ExactOODState(*z(self.capacity_in), *z(self.capacity_out), jnp.zeros((), bool))

  def update(self, state: ExactOODState, in_scores=None, out_scores=None, *,
             in_mask=None, out_mask=None) -> ExactOODState:
    s = state._asdict()
    for side, x, m in _sides(s, "scores", in_scores, out_scores, in_mask, out_mask):
      buf, valid, used, over = _append(s[f"{side}_scores"], s[f"{side}_valid"],
                                       s[f"{side}_used"], x, m)
      s.update({f"{side}_scores": buf, f"{side}_valid": valid, f"{side}_used": used,
                "overflow": s["overflow"] | over})
    new = ExactOODState(**s)
    if _concrete(new.overflow) and bool(new.overflow):
      raise ValueError(
          f"ExactOOD buffer overflow: capacities (in={state.in_scores.shape[0]}, "
          f"out={state.out_scores.shape[0]}) are too small for the batches written.")
    return new

  @staticmethod
  def merge(a: ExactOODState, b: ExactOODState) -> ExactOODState:
    """Concatenates two states (capacity = sum); valid entries move first."""
    return ExactOOD.merge_stacked(_stack_exact(a, b))

  @staticmethod
  def merge_stacked(stacked: ExactOODState) -> ExactOODState:
    """Merges states stacked on a leading axis (from all_gather / allgather)."""
    stacked = jax.tree.map(ranking.replicated, stacked)
    fields = {}
    for side in ("in", "out"):
      scores = stacked._asdict()[f"{side}_scores"].reshape(-1)
      valid = stacked._asdict()[f"{side}_valid"].reshape(-1)
      scores, valid, n = _compact(scores, valid)
      fields.update({f"{side}_scores": scores, f"{side}_valid": valid, f"{side}_used": n})
    return ExactOODState(**fields, overflow=jnp.any(stacked.overflow))

  @staticmethod
  def compute(state: ExactOODState, preset: ood.Preset = "hendrycks") -> dict[str, Array]:
    """:func:`jaxrobust.metrics.ood.ood_metrics` on the buffered scores
    (NaN under jit if a batch overflowed; ValueError eagerly)."""
    if _concrete(state.overflow) and bool(state.overflow):
      raise ValueError("ExactOOD state overflowed; its metrics are undefined.")
    out = ood.ood_metrics(state.in_scores, state.out_scores, preset,
                          in_mask=state.in_valid, out_mask=state.out_valid)
    return {k: jnp.where(state.overflow, jnp.nan, v) for k, v in out.items()}


def _stack_exact(a: ExactOODState, b: ExactOODState) -> ExactOODState:
  """Two states as one stacked state of capacity a + b (1-D buffers)."""
  cat = lambda x, y: jnp.concatenate([x.reshape(-1), y.reshape(-1)])[None]
  return ExactOODState(
      cat(a.in_scores, b.in_scores), cat(a.in_valid, b.in_valid),
      a.in_used + b.in_used, cat(a.out_scores, b.out_scores),
      cat(a.out_valid, b.out_valid), a.out_used + b.out_used,
      jnp.stack([a.overflow, b.overflow]))


# ----------------------------------------------------------------------------
# OOD histogram.
# ----------------------------------------------------------------------------


class OODHistogramState(NamedTuple):
  in_counts: Array    # (num_bins,) int32, bin b covers [lo + b*w, lo + (b+1)*w)
  out_counts: Array
  in_clipped: Array   # (2,) int32: scores below lo / above hi (in end bins)
  out_clipped: Array
  nonfinite: Array    # int32: NaN/inf scores seen under jit (not binned)


@dataclasses.dataclass(frozen=True)
class OODHistogram:
  """OOD metrics from fixed-bin score histograms, with error bounds.

  Bins are equal-width over ``[lo, hi]``; scores outside are clipped into the
  end bins and counted (``clipped_in`` / ``clipped_out``). The bin map is
  monotone, so binning only merges scores of one bin into ties; relative to
  the exact metrics on the raw scores:

  * ``auroc``: AUROC of the binned scores (same-bin pairs count 1/2), and
    ``|auroc - exact| <= auroc_bound = 1/2 sum_b in_b out_b / (n_in n_out)``
    (each same-bin pair contributes 0, 1/2 or 1 exactly, 1/2 here).
  * ``fpr`` at ``tpr`` (``positive`` as in :func:`~jaxrobust.metrics.ood.fpr_at_tpr`): linear
    interpolation inside the bin where the TPR crosses ``tpr``, with a
    bracket ``[fpr_lower, fpr_upper]`` that contains the exact FPR of any
    curve point whose TPR is the nearest to, or the first >= ``tpr``
    (``select='nearest'`` / ``'first_ge'``, except points that sklearn's
    collinear-point dropping skips). Lower end: all of the crossing bin
    rejected; upper end: everything down to the next bin holding positives
    accepted.
  * ``aupr_in`` / ``aupr_out``: step-wise AP of the binned scores with a
    bracket valid for any order (or ties) of the scores inside each bin:
    the positives of a bin ranked after all its negatives (lower) or before
    them (upper); the lower end uses sum_j 1/(c+j) <= log1p(m/c).

  Pick ``[lo, hi]`` and ``num_bins`` from the score's range (e.g. MSP in
  [0, 1] with 10**4..10**6 bins); the returned bounds say whether the bins
  were fine enough. Counts are int32 (< 2**31 examples in all).
  """
  num_bins: int = 10_000
  lo: float = 0.0
  hi: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.num_bins, int) and self.num_bins >= 1):
      raise ValueError(f"num_bins must be a positive int, got {self.num_bins!r}.")
    if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
      raise ValueError(f"need finite lo < hi, got lo={self.lo}, hi={self.hi}.")

  def init(self) -> OODHistogramState:
    zb = jnp.zeros((self.num_bins,), jnp.int32)
    z2 = jnp.zeros((2,), jnp.int32)
    return OODHistogramState(zb, zb, z2, z2, jnp.zeros((), jnp.int32))

  def bin_index(self, x: Array) -> Array:
    """Monotone bin map: floor((x - lo) * num_bins / (hi - lo)), clipped."""
    scale = np.float32(self.num_bins / (self.hi - self.lo))
    t = jnp.floor((x.astype(jnp.float32) - np.float32(self.lo)) * scale)
    return jnp.clip(jnp.nan_to_num(t), 0, self.num_bins - 1).astype(jnp.int32)

  def update(self, state: OODHistogramState, in_scores=None, out_scores=None, *,
             in_mask=None, out_mask=None) -> OODHistogramState:
    s = state._asdict()
    for side, x, m in _sides(s, "counts", in_scores, out_scores, in_mask, out_mask):
      finite = jnp.isfinite(x)
      use = (m & finite).astype(jnp.int32)
      counts = s[f"{side}_counts"].at[self.bin_index(x)].add(use)
      clipped = jnp.stack([jnp.sum(use * (x < self.lo)), jnp.sum(use * (x > self.hi))])
      s.update({f"{side}_counts": counts,
                f"{side}_clipped": s[f"{side}_clipped"] + clipped.astype(jnp.int32),
                "nonfinite": s["nonfinite"] + jnp.sum(m & ~finite, dtype=jnp.int32)})
    return OODHistogramState(**s)

  @staticmethod
  def merge(a: OODHistogramState, b: OODHistogramState) -> OODHistogramState:
    """Addition (``lax.psum(state, axis)`` does the same across devices)."""
    return jax.tree.map(jnp.add, a, b)

  @staticmethod
  def merge_stacked(stacked: OODHistogramState) -> OODHistogramState:
    return _sum_stacked(stacked)

  def compute(self, state: OODHistogramState, tpr: float = 0.95, *,
              positive: ood.Positive = "in") -> dict[str, Array]:
    """Metrics with bounds (see the class docstring); NaN if a side is empty
    or non-finite scores were seen."""
    check_choice("positive", positive, ("in", "out"))
    return _hist_metrics(state, ranking.as_rate("tpr", tpr), positive)


def _oriented_counts(state: OODHistogramState, positive: str):
  """(pos, neg) bin counts ordered from the most to the least positive bin."""
  if positive == "in":
    return state.in_counts[::-1], state.out_counts[::-1]
  return state.out_counts, state.in_counts


@functools.partial(jax.jit, static_argnames=("rate", "positive"))
def _hist_metrics(state: OODHistogramState, rate: ranking.Rate, positive: str):
  f32 = lambda x: x.astype(jnp.float32)
  n_in, n_out = jnp.sum(state.in_counts), jnp.sum(state.out_counts)
  pairs = f32(n_in) * f32(n_out)
  below_out = f32(jnp.cumsum(state.out_counts) - state.out_counts)
  ties = f32(state.in_counts) * f32(state.out_counts)
  out = {
      "auroc": ranking.accurate_sum(f32(state.in_counts) * below_out + 0.5 * ties) / pairs,
      "auroc_bound": 0.5 * ranking.accurate_sum(ties) / pairs,
  }
  out.update(_hist_fpr(state, rate, positive))
  for side in ("in", "out"):
    for k, v in _hist_ap(*_oriented_counts(state, side)).items():
      out[f"aupr_{side}{k}"] = v
  ok = (n_in > 0) & (n_out > 0) & (state.nonfinite == 0)
  out = {k: jnp.where(ok, v, jnp.nan) for k, v in out.items()}
  out.update(n_in=n_in, n_out=n_out, clipped_in=jnp.sum(state.in_clipped),
             clipped_out=jnp.sum(state.out_clipped))
  return out


def _hist_fpr(state, rate, positive):
  pos, neg = _oriented_counts(state, positive)
  n_pos, n_neg = jnp.sum(pos), jnp.sum(neg)
  tp, fp = jnp.cumsum(pos), jnp.cumsum(neg)   # accepting bins 0..j
  fl, rem = ranking.scaled_rate(n_pos, rate)
  need = fl + (rem > 0)
  size = pos.shape[0]
  idx = jnp.arange(size)
  cross = jnp.min(jnp.where(tp >= need, idx, size - 1))
  nxt = jnp.min(jnp.where((idx > cross) & (pos > 0), idx, size))
  lower = fp[cross] - neg[cross]
  upper = jnp.where(nxt < size, fp[jnp.minimum(nxt, size - 1)], fp[cross])
  tp_before = tp[cross] - pos[cross]
  frac = ((rate.value * n_pos.astype(jnp.float32) - tp_before.astype(jnp.float32))
          / jnp.maximum(pos[cross], 1).astype(jnp.float32))
  est = lower.astype(jnp.float32) + jnp.clip(frac, 0, 1) * neg[cross].astype(jnp.float32)
  nf = n_neg.astype(jnp.float32)
  return {"fpr": est / nf, "fpr_lower": lower.astype(jnp.float32) / nf,
          "fpr_upper": upper.astype(jnp.float32) / nf}


def _hist_ap(pos: Array, neg: Array) -> dict[str, Array]:
  """Step-wise AP of binned scores, with bounds over within-bin orders."""
  f32 = lambda x: x.astype(jnp.float32)
  m, k = f32(pos), f32(neg)
  tp_a = f32(jnp.cumsum(pos) - pos)   # positives in strictly better bins
  fp_a = f32(jnp.cumsum(neg) - neg)
  safe = lambda d: jnp.where(d > 0, d, 1.0)
  value = m * (tp_a + m) / safe(tp_a + m + fp_a + k)
  upper = m * (tp_a + m) / safe(tp_a + m + fp_a)
  f = fp_a + k
  c = tp_a + f
  lower = jnp.where(c > 0, m - f * jnp.log1p(m / safe(c)), m)
  n = ranking.accurate_sum(m)
  return {"": ranking.accurate_sum(value) / n,
          "_lower": ranking.accurate_sum(jnp.maximum(lower, 0.0)) / n,
          "_upper": ranking.accurate_sum(upper) / n}


# ----------------------------------------------------------------------------
# Calibration histogram.
# ----------------------------------------------------------------------------


class CalibrationState(NamedTuple):
  count: Array      # (num_bins,) int32
  correct: Array    # (num_bins,) int32
  conf_hi: Array    # (num_bins,) float32; sum of confidences = conf_hi + conf_lo
  conf_lo: Array
  invalid: Array    # int32: confidences outside [0, 1] or NaN seen under jit


_CONF_STEP = 2.0**-12   # confidences split into a multiple of this + a remainder
_MAX_CAL_BATCH = 2**19  # keeps the integer part of per-batch sums in int32


def _df_add(hi: Array, lo: Array, x: Array) -> tuple[Array, Array]:
  s, e = ranking.two_sum(hi, x)
  return ranking.two_sum(s, lo + e)


@dataclasses.dataclass(frozen=True)
class CalibrationHistogram:
  """Equal-width reliability histogram; ECE from it is exact for those bins.

  Bins and the l1/l2/max combination are those of
  :func:`jaxrobust.metrics.calibration.expected_calibration_error` with
  ``binning='width'`` (left-closed ``[k/M, (k+1)/M)``, last bin closed).
  Counts are int32; each bin's sum of confidences is a compensated float
  pair (an exact integer multiple of 2**-12 plus a small remainder per
  batch), so accumulating many batches or merging many devices does not
  drift. Merge by addition (``lax.psum(state, axis)``: the float pair is then
  added part-wise, relative error ~log2(devices) * 6e-8).
  """
  num_bins: int = 15

  def __post_init__(self):
    if not (isinstance(self.num_bins, int) and self.num_bins >= 1):
      raise ValueError(f"num_bins must be a positive int, got {self.num_bins!r}.")

  def init(self) -> CalibrationState:
    zi = jnp.zeros((self.num_bins,), jnp.int32)
    zf = jnp.zeros((self.num_bins,), jnp.float32)
    return CalibrationState(zi, zi, zf, zf, jnp.zeros((), jnp.int32))

  def update(self, state: CalibrationState, confidences, correct, *,
             mask=None) -> CalibrationState:
    conf = _match(as_1d("confidences", confidences).astype(jnp.float32), state.count)
    corr = jnp.asarray(correct)
    if corr.shape != conf.shape:
      raise ValueError(f"correct has shape {corr.shape}, confidences {conf.shape}.")
    if conf.shape[0] > _MAX_CAL_BATCH:
      raise ValueError(f"batches of at most {_MAX_CAL_BATCH} confidences, got {conf.shape[0]}.")
    corr = _match(corr, state.count)
    m = _match(mask_or_ones("mask", mask, conf.shape), state.count)
    ok = jnp.isfinite(conf) & (conf >= 0) & (conf <= 1)
    if _concrete(conf, m) and not bool(np.all(np.asarray(ok)[np.asarray(m)])):
      raise ValueError("confidences must be finite and lie in [0, 1].")
    use = m & ok
    bins = calibration._width_bin_ids(conf, self.num_bins)
    seg = lambda v: jax.ops.segment_sum(v, bins, num_segments=self.num_bins)
    steps = jnp.round(conf / _CONF_STEP)
    rest = conf - steps * _CONF_STEP                    # exact (Sterbenz)
    steps_sum = seg(jnp.where(use, steps.astype(jnp.int32), 0))
    hi, lo = state.conf_hi, state.conf_lo
    # int32 -> two exact float32 parts, scaled by 2**-12 (exact).
    hi, lo = _df_add(hi, lo, (steps_sum >> 16).astype(jnp.float32) * (65536 * _CONF_STEP))
    hi, lo = _df_add(hi, lo, (steps_sum & 0xFFFF).astype(jnp.float32) * _CONF_STEP)
    hi, lo = _df_add(hi, lo, seg(jnp.where(use, rest, 0.0)))
    corr_i = jnp.where(use, (corr != 0).astype(jnp.int32), 0)
    return CalibrationState(state.count + seg(use.astype(jnp.int32)),
                            state.correct + seg(corr_i), hi, lo,
                            state.invalid + jnp.sum(m & ~ok, dtype=jnp.int32))

  @staticmethod
  def merge(a: CalibrationState, b: CalibrationState) -> CalibrationState:
    hi, lo = _df_add(a.conf_hi, a.conf_lo + b.conf_lo, b.conf_hi)
    return CalibrationState(a.count + b.count, a.correct + b.correct, hi, lo,
                            a.invalid + b.invalid)

  @staticmethod
  def merge_stacked(stacked: CalibrationState) -> CalibrationState:
    first = jax.tree.map(lambda x: x[0], stacked)
    rest = jax.tree.map(lambda x: x[1:], stacked)
    return lax.fori_loop(
        0, rest.count.shape[0],
        lambda i, acc: CalibrationHistogram.merge(acc, jax.tree.map(lambda x: x[i], rest)),
        first)

  @staticmethod
  def compute(state: CalibrationState, norm: str = "l1") -> Array:
    """Equal-width ECE (``norm`` 'l1' = ECE, 'l2' = RMS, 'max' = MCE)."""
    check_choice("norm", norm, ("l1", "l2", "max"))
    value = calibration._binned_error(state.count, state.conf_hi + state.conf_lo,
                                      state.correct.astype(jnp.float32), norm)
    ok = (jnp.sum(state.count) > 0) & (state.invalid == 0)
    return jnp.where(ok, value, jnp.nan)

  @staticmethod
  def reliability(state: CalibrationState) -> dict[str, Array]:
    """Per-bin count, mean confidence and accuracy (NaN for empty bins)."""
    cnt = state.count.astype(jnp.float32)
    safe = jnp.where(state.count > 0, cnt, jnp.nan)
    return {"count": state.count, "confidence": (state.conf_hi + state.conf_lo) / safe,
            "accuracy": state.correct.astype(jnp.float32) / safe}
