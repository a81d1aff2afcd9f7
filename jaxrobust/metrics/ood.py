"""Exact, jittable OOD-detection metrics: AUROC, AUPR, FPR@TPR, TNR, DTACC.

**Score convention (everywhere): higher = more in-distribution** (MSP, max
logit, negative energy ``T * logsumexp(logits / T)``). Pass anomaly scores
negated.

Every metric is exact (no binning): the values agree with the reference
implementations to ~1e-7, including heavy ties, all-equal scores, one example
per side, extreme imbalance, float32 scores 1 ulp apart and more than 2**24
examples (counts are int32, float sums compensated; no x64 needed).
Each function is a thin wrapper that validates concrete inputs and calls a
jitted core with static shapes; ``in_mask`` / ``out_mask`` (boolean or 0/1)
drop padded entries exactly. Input regimes:

* eager call: wrong rank / mask shape, no valid entry, NaN or inf among the
  valid scores, or an unknown option raise ``ValueError`` naming it;
* under ``jax.jit``: shapes and options are still checked at trace time;
  NaN/inf among valid scores or an empty side make the result NaN (never a
  finite wrong number).

Conventions of the reference implementations, reproduced by
:func:`ood_metrics` (see ``jaxrobust/metrics/ranking.py`` for the algorithms):

=========  ==========  ==============================  ===========================  ==================
preset     positive    95% point (``fpr95``)           ties                         AUPR flavour
=========  ==========  ==============================  ===========================  ==================
hendrycks  OOD         nearest recall to 0.95          tied scores enter together;  step-wise AP
                       (``fpr_and_fdr_at_recall``)     AUROC ties count 1/2         (``aupr_out``)
energy     ID          nearest recall to 0.95          as hendrycks                 step-wise AP
                                                                                    (``aupr_in``)
openood    OOD         first ROC point with            as hendrycks; sklearn        trapezoid over the
                       TPR >= 0.95 (``roc_curve``,     ``roc_curve`` drops          PR curve (both
                       ``drop_intermediate=True``)     collinear points             ``aupr_in/out``)
lee        ID          TPR nearest 0.95 over a         ties split: tied ID scores   trapezoid with
                       sort-merge, TNR = 1 - FPR       are rejected before tied     sentinels (MH
                       (``tnr95``)                     OOD ones; AUROC ties: 0      ``AUIN/AUOUT``)
=========  ==========  ==============================  ===========================  ==================

Sources: hendrycks/outlier-exposure ``utils/display_results.py`` (HPT, OE;
``get_measures(out, in)`` on anomaly scores); wetliu/energy_ood
``CIFAR/test.py`` (same code, ID positive by default); Jingkang50/OpenOOD
v1.5 ``openood/evaluators/metrics.py::auc_and_fpr_recall``;
pokaxpoka/deep_Mahalanobis_detector ``calculate_log.py`` (Lee et al.).
All values are **fractions in [0, 1]** (the references print percentages).

"nearest" is ``argmin |recall - 0.95|`` over the curve (it may land below
0.95; an exact tie in distance is decided, as in the references, by their
float64 rounding -- reproduced bit-exactly for ``tpr >= 0.6``).
Among curve points with the chosen recall, the one with the most false
positives is used, as the references do.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrobust.metrics import ranking
from jaxrobust.metrics._validate import (
    as_1d, check_choice, check_scores, mask_or_ones, poison)
from jaxrobust.metrics.ranking import Rate, Side

Array = jax.Array
Positive = Literal["in", "out"]
Select = Literal["nearest", "first_ge"]
Method = Literal["ap", "trapezoid"]
Preset = Literal["hendrycks", "energy", "openood", "lee"]

PRESETS = ("hendrycks", "energy", "openood", "lee")


def _inputs(in_scores, out_scores, in_mask, out_mask):
  """Validates both sides; returns (x_in, m_in, x_out, m_out)."""
  out = []
  for name, x, m in (("in_scores", in_scores, in_mask),
                     ("out_scores", out_scores, out_mask)):
    x = as_1d(name, x)
    m = mask_or_ones(name.replace("scores", "mask"), m, x.shape)
    if x.shape[0] > ranking.MAX_PER_SIDE:
      raise ValueError(f"{name} has {x.shape[0]} entries; at most "
                       f"{ranking.MAX_PER_SIDE} per side are supported.")
    check_scores(name, x, m)
    out += [x, m]
  return tuple(out)


def _keys(x_in, m_in, x_out, m_out):
  return ranking.score_keys(x_in, m_in), ranking.score_keys(x_out, m_out)


def _ranked(x_in, m_in, x_out, m_out) -> tuple[Side, Side]:
  return ranking.rank_sides(*_keys(x_in, m_in, x_out, m_out))


def _core(*static_argnames: str):
  """Jits a metric body ``f(x_in, m_in, x_out, m_out, **static)``.

  Inputs are un-sharded first (explicit-sharding meshes), and every output
  leaf becomes NaN when a side is empty or has a NaN/inf valid score.
  """
  def wrap(body):
    @functools.partial(jax.jit, static_argnames=static_argnames)
    @functools.wraps(body)
    def core(x_in, m_in, x_out, m_out, **static):
      x_in, m_in, x_out, m_out = map(ranking.replicated, (x_in, m_in, x_out, m_out))
      out = body(x_in, m_in, x_out, m_out, **static)
      return jax.tree.map(lambda v: poison(v, (x_in, m_in), (x_out, m_out)), out)
    return core
  return wrap


# ----------------------------------------------------------------------------
# Metrics on ranked sides.
# ----------------------------------------------------------------------------


class _Oriented(NamedTuple):
  """Counts for each entry of the positive side, in its sorted order.

  ``tp_gt``/``tp_ge``: positives strictly more / at least as positive;
  ``fp_gt``/``fp_ge``: the same for negatives. ``rank_index(r)`` maps the
  r-th most positive entry (1-based) to its index in the sorted arrays.
  """
  valid: Array
  n_pos: Array
  n_neg: Array
  tp_gt: Array
  tp_ge: Array
  fp_gt: Array
  fp_ge: Array
  ascending: bool

  def rank_index(self, r: Array) -> Array:
    return r - 1 if self.ascending else self.n_pos - r


def _orient(sides: tuple[Side, Side], positive: str) -> _Oriented:
  s_in, s_out = sides
  if positive == "in":
    return _Oriented(s_in.valid, s_in.n, s_out.n, s_in.n - s_in.self_le,
                     s_in.n - s_in.self_lt, s_out.n - s_in.other_le,
                     s_out.n - s_in.other_lt, ascending=False)
  return _Oriented(s_out.valid, s_out.n, s_in.n, s_out.self_lt, s_out.self_le,
                   s_out.other_lt, s_out.other_le, ascending=True)


def _mean_over(valid: Array, values: Array, n: Array) -> Array:
  return ranking.accurate_sum(jnp.where(valid, values, 0.0)) / n.astype(jnp.float32)


def _auroc_sides(sides: tuple[Side, Side]) -> Array:
  """From the side that was binary-searched (the smaller one): its counts
  are direct, so XLA can drop the other side's histogram."""
  s_in, s_out = sides
  if s_in.keys.shape[0] <= s_out.keys.shape[0]:
    pairs2 = (s_in.other_lt + s_in.other_le).astype(jnp.float32)
    return _mean_over(s_in.valid, pairs2, s_in.n) / (2.0 * s_out.n.astype(jnp.float32))
  pairs2 = (s_out.other_lt + s_out.other_le).astype(jnp.float32)
  return 1.0 - _mean_over(s_out.valid, pairs2, s_out.n) / (2.0 * s_in.n.astype(jnp.float32))


def _aupr_sides(sides, positive: str, method: str) -> Array:
  o = _orient(sides, positive)
  prec_ge = ranking.ratio(o.tp_ge, o.tp_ge + o.fp_ge)
  if method == "ap":
    return _mean_over(o.valid, prec_ge, o.n_pos)
  # Trapezoid: each positive adds a segment from the PR point just above its
  # score (precision 1 at the (0, 0) start) to the point at its score.
  prec_gt = jnp.where(o.tp_gt + o.fp_gt == 0, 1.0,
                      ranking.ratio(o.tp_gt, o.tp_gt + o.fp_gt))
  return _mean_over(o.valid, 0.5 * (prec_gt + prec_ge), o.n_pos)


def _ceil_target(n: Array, rate: Rate) -> Array:
  fl, rem = ranking.scaled_rate(n, rate)
  return jnp.maximum(fl + (rem > 0), 1)


def _fpr_sides(sides, rate: Rate, positive: str, select: str) -> Array:
  o = _orient(sides, positive)
  c = _ceil_target(o.n_pos, rate)
  ic = o.rank_index(c)
  if select == "nearest":
    k_hi, k_lo = o.tp_ge[ic], o.tp_gt[ic]
    lo_ok = (k_lo > 0) | (o.fp_gt[o.rank_index(jnp.ones_like(c))] > 0)
    pick_hi = ranking.nearest_picks_upper(k_lo, k_hi, o.n_pos, rate) | ~lo_ok
    nxt = o.rank_index(jnp.minimum(k_hi + 1, o.n_pos))
    fp_hi = jnp.where(k_hi < o.n_pos, o.fp_gt[nxt], o.fp_ge[ic])
    fp = jnp.where(pick_hi, fp_hi, o.fp_gt[ic])
  else:
    fp = o.fp_ge[o.rank_index(_first_kept_rank(o, c))]
  return ranking.ratio(fp, o.n_neg)


def _first_kept_rank(o: _Oriented, c: Array) -> Array:
  """Rank of the ROC point sklearn ``roc_curve`` keeps at/after rank c.

  ``drop_intermediate=True`` drops a point when the next point (next lower
  threshold) has the same (#neg, #pos) increment, unless it is the first
  point. The walk from the first point with TPR >= target continues down
  through dropped points; it stops at a kept one.
  """
  size = o.valid.shape[0]
  idx = jnp.arange(size, dtype=jnp.int32)
  rank = idx + 1 if o.ascending else o.n_pos - idx
  has_next = o.tp_ge < o.n_pos
  j = jnp.clip(o.rank_index(o.tp_ge + 1), 0, size - 1)
  same_step = ((o.fp_gt[j] == o.fp_ge)  # no negative strictly in between
               & (o.fp_ge[j] - o.fp_gt[j] == o.fp_ge - o.fp_gt)
               & (o.tp_ge[j] - o.tp_gt[j] == o.tp_ge - o.tp_gt))
  top = (o.tp_gt == 0) & (o.fp_gt == 0)
  stop = ~(has_next & same_step) | top
  cand = o.valid & (rank >= c) & stop
  return jnp.min(jnp.where(cand, rank, jnp.iinfo(jnp.int32).max))


class _Lee(NamedTuple):
  tnr: Array
  auroc: Array
  dtacc: Array
  auin: Array
  auout: Array


def _lee_sides(sides, rate: Rate) -> _Lee:
  """Lee et al. (MH ``calculate_log.py``) on the sort-merge of ID then OOD.

  The merge removes scores in ascending order, an ID score before an equal
  OOD score. Before the i-th ID removal (0-based), i ID and c_i = #{OOD <
  x_i} OOD scores are gone; before the j-th OOD removal, j OOD and
  d_j = #{ID <= y_j} ID scores are gone. Every MH metric is a sum or a
  max over these states.
  """
  s_in, s_out = sides
  n_in, n_out = s_in.n, s_out.n
  i = jnp.arange(s_in.keys.shape[0], dtype=jnp.int32)
  c = s_in.other_lt
  nf_out = n_out.astype(jnp.float32)
  auroc = _mean_over(s_in.valid, c.astype(jnp.float32), n_in) / nf_out
  margin = ranking.ratio(n_in - i, n_in) - ranking.ratio(n_out - c, n_out)
  dtacc = 0.5 + 0.5 * jnp.maximum(jnp.max(jnp.where(s_in.valid, margin, 0.0)), 0.0)
  tp, fp = n_in - i, n_out - c
  pin = ranking.ratio(tp, tp + fp) + ranking.ratio(tp - 1, tp - 1 + fp)
  auin = _mean_over(s_in.valid, 0.5 * pin, n_in)
  j = jnp.arange(s_out.keys.shape[0], dtype=jnp.int32)
  d = s_out.other_le
  pout = ranking.ratio(j, j + d) + ranking.ratio(j + 1, j + 1 + d)
  auout = _mean_over(s_out.valid, 0.5 * pout, n_out)
  fl, rem = ranking.scaled_rate(n_in, rate)
  k_lo, k_hi = fl, fl + (rem > 0)
  k = jnp.where(ranking.nearest_picks_upper(k_lo, k_hi, n_in, rate), k_hi, k_lo)
  at = jnp.clip(n_in - k - 1, 0, c.shape[0] - 1)
  tnr = jnp.where(k >= n_in, 0.0, c[at].astype(jnp.float32) / nf_out)
  return _Lee(tnr, auroc, dtacc, auin, auout)


# ----------------------------------------------------------------------------
# Jitted cores.
# ----------------------------------------------------------------------------


@_core()
def _auroc_core(*inputs):
  return _auroc_sides(_ranked(*inputs))


@_core("positive", "method")
def _aupr_core(*inputs, positive, method):
  return _aupr_sides(_ranked(*inputs), positive, method)


def _oriented_keys(k_in, k_out, positive: str):
  """Unsigned keys increasing with positiveness (for bisection selection)."""
  def flip(k):
    k = k if positive == "in" else ~k
    return ranking.to_unsigned(k)
  pos, neg = (k_in, k_out) if positive == "in" else (k_out, k_in)
  inv = ranking.invalid_key(k_in.dtype)
  return flip(pos), pos != inv, flip(neg), neg != inv


@_core("rate", "positive", "select")
def _fpr_core(x_in, m_in, x_out, m_out, *, rate, positive, select):
  """FPR without sorting: the ceil(T)-th most positive score by bisection,
  then a few counts. ``first_ge`` falls back to the sorted path only when
  sklearn's ``drop_intermediate`` would drop the point found."""
  k_in, k_out = _keys(x_in, m_in, x_out, m_out)
  pos, v_pos, neg, v_neg = _oriented_keys(k_in, k_out, positive)
  n_pos, n_neg = ranking.masked_count(v_pos), ranking.masked_count(v_neg)
  c = _ceil_target(n_pos, rate)
  v = ranking.kth_largest(pos, v_pos, c)
  count = lambda keys, valid, cond: ranking.masked_count(valid & cond(keys))
  tp_ge = count(pos, v_pos, lambda k: k >= v)
  tp_gt = count(pos, v_pos, lambda k: k > v)
  fp_gt = count(neg, v_neg, lambda k: k > v)
  fp_ge = count(neg, v_neg, lambda k: k >= v)
  below_p = ranking.masked_max(pos, v_pos & (pos < v))
  if select == "nearest":
    max_pos = ranking.masked_max(pos, v_pos)
    lo_ok = (tp_gt > 0) | (count(neg, v_neg, lambda k: k > max_pos) > 0)
    pick_hi = ranking.nearest_picks_upper(tp_gt, tp_ge, n_pos, rate) | ~lo_ok
    fp_hi = jnp.where(tp_ge < n_pos, count(neg, v_neg, lambda k: k > below_p), fp_ge)
    return ranking.ratio(jnp.where(pick_hi, fp_hi, fp_gt), n_neg)
  # first_ge: the point at v is kept unless the next lower score u has the
  # same (#neg, #pos) step; only then take the sorted path.
  has_p = tp_ge < n_pos
  has_n = count(neg, v_neg, lambda k: k < v) > 0
  below_n = ranking.masked_max(neg, v_neg & (neg < v))
  u = jnp.where(has_p & has_n, jnp.maximum(below_p, below_n),
                jnp.where(has_p, below_p, below_n))
  same_step = ((count(neg, v_neg, lambda k: k == u) == fp_ge - fp_gt)
               & (count(pos, v_pos, lambda k: k == u) == tp_ge - tp_gt))
  kept = ((tp_gt == 0) & (fp_gt == 0)) | ~(has_p | has_n) | ~same_step
  sorted_path = lambda: _fpr_sides(ranking.rank_sides(k_in, k_out), rate, positive, select)
  return lax.cond(kept, lambda: ranking.ratio(fp_ge, n_neg), sorted_path)


@_core("rate")
def _lee_core(*inputs, rate):
  return _lee_sides(_ranked(*inputs), rate)


_RATE95 = ranking.as_rate("tpr", 0.95)


@_core("preset")
def _preset_core(*inputs, preset):
  sides = _ranked(*inputs)
  if preset == "lee":
    lee = _lee_sides(sides, _RATE95)
    out = {"tnr95": lee.tnr, "auroc": lee.auroc, "detection_accuracy": lee.dtacc,
           "aupr_in": lee.auin, "aupr_out": lee.auout}
  elif preset == "openood":
    out = {"auroc": _auroc_sides(sides),
           "aupr_in": _aupr_sides(sides, "in", "trapezoid"),
           "aupr_out": _aupr_sides(sides, "out", "trapezoid"),
           "fpr95": _fpr_sides(sides, _RATE95, "out", "first_ge")}
  else:
    positive = "out" if preset == "hendrycks" else "in"
    out = {"auroc": _auroc_sides(sides),
           f"aupr_{positive}": _aupr_sides(sides, positive, "ap"),
           "fpr95": _fpr_sides(sides, _RATE95, positive, "nearest")}
  return out


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def auroc(in_scores, out_scores, *, in_mask=None, out_mask=None) -> Array:
  """Area under the ROC curve, P(score_in > score_out) + 1/2 P(tie).

  Equal to ``sklearn.metrics.roc_auc_score`` (with either class positive:
  AUROC is symmetric). Sorts each side and binary-searches the smaller
  side's scores in the larger one.

  Args:
    in_scores: (n_in,) scores of in-distribution examples, higher = more ID.
    out_scores: (n_out,) scores of OOD examples.
    in_mask, out_mask: optional validity masks of the same shapes.
  Returns:
    float32 scalar in [0, 1] (NaN under jit for invalid input).
  """
  return _auroc_core(*_inputs(in_scores, out_scores, in_mask, out_mask))


def aupr_in(in_scores, out_scores, *, in_mask=None, out_mask=None,
            method: Method = "ap") -> Array:
  """Area under the precision-recall curve with **ID as the positive class**.

  ``method='ap'``: step-wise average precision, sum_k (R_k - R_{k-1}) P_k,
  as ``sklearn.metrics.average_precision_score`` and the Hendrycks/energy
  code. ``method='trapezoid'``: trapezoidal rule over
  ``sklearn.metrics.precision_recall_curve`` (with its (recall 0, precision
  1) end point), as OpenOOD v1.5 and pytorch-ood. Both depend on the
  ID:OOD ratio. Tied scores enter the curve together.
  """
  check_choice("method", method, ("ap", "trapezoid"))
  return _aupr_core(*_inputs(in_scores, out_scores, in_mask, out_mask),
                    positive="in", method=method)


def aupr_out(in_scores, out_scores, *, in_mask=None, out_mask=None,
             method: Method = "ap") -> Array:
  """Area under the precision-recall curve with **OOD as the positive class**
  (ranked by negated scores). See :func:`aupr_in` for ``method``."""
  check_choice("method", method, ("ap", "trapezoid"))
  return _aupr_core(*_inputs(in_scores, out_scores, in_mask, out_mask),
                    positive="out", method=method)


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95, *,
               positive: Positive = "in", select: Select = "nearest",
               in_mask=None, out_mask=None) -> Array:
  """False-positive rate at the threshold where ``tpr`` of positives pass.

  Thresholds lie only between distinct scores (tied scores enter together).

  Args:
    tpr: target true-positive rate in (0, 1], a fraction p/q with
      q <= 10000 such as 0.95 (selection is done in exact rational
      arithmetic).
    positive: ``'in'`` -- ID is positive: the fraction of OOD accepted when
      ``tpr`` of ID is accepted (ODIN / energy papers).
      ``'out'`` -- OOD is positive (Hendrycks et al., OpenOOD v1.5): the
      fraction of ID flagged when ``tpr`` of OOD is flagged.
    select: ``'nearest'`` -- the curve point whose recall is nearest ``tpr``
      (hendrycks ``fpr_and_fdr_at_recall``; may be below ``tpr``).
      ``'first_ge'`` -- ``fpr[argmax(tpr_curve >= tpr)]`` on
      ``sklearn.metrics.roc_curve`` with its default
      ``drop_intermediate=True`` (OpenOOD, uncertainty-baselines). An
      implementation that keeps every threshold can differ from it only when
      that point lies strictly inside a straight run of equal steps.
  Returns:
    float32 scalar in [0, 1]. Does not sort: the threshold is found by a
    bisection over integer keys (32 counting passes).
  """
  check_choice("positive", positive, ("in", "out"))
  check_choice("select", select, ("nearest", "first_ge"))
  rate = ranking.as_rate("tpr", tpr)
  return _fpr_core(*_inputs(in_scores, out_scores, in_mask, out_mask),
                   rate=rate, positive=positive, select=select)


def tnr_at_tpr(in_scores, out_scores, tpr: float = 0.95, *, in_mask=None,
               out_mask=None) -> Array:
  """TNR at TPR ``tpr`` as in Lee et al.'s exact code (MH ``calculate_log``).

  ID is positive. Over the sort-merge of all scores (an ID score removed
  before an equal OOD score), take the state whose TPR is nearest ``tpr``
  (TPR can be any k/n_in: ties among ID scores are split) and return
  1 - FPR there: the fraction of OOD scores strictly below the highest
  rejected ID score.
  """
  rate = ranking.as_rate("tpr", tpr)
  return _lee_core(*_inputs(in_scores, out_scores, in_mask, out_mask), rate=rate).tnr


def detection_accuracy(in_scores, out_scores, *, in_mask=None, out_mask=None) -> Array:
  """Best balanced accuracy ``max_t 1/2 (TPR(t) + TNR(t))`` (Lee et al. DTACC).

  ID accepted when score >= t; t ranges over all scores and +-inf, so the
  result is at least 0.5. Equal priors, independent of the ID:OOD ratio.
  """
  return _lee_core(*_inputs(in_scores, out_scores, in_mask, out_mask),
                   rate=_RATE95).dtacc


def ood_metrics(in_scores, out_scores, preset: Preset = "hendrycks", *,
                in_mask=None, out_mask=None) -> dict[str, Array]:
  """All metrics of one reference implementation, from one sort per side.

  Presets (fractions, not percentages; scores higher = more ID):

  * ``'hendrycks'`` (HPT, OE): OOD positive. ``auroc`` (ties 1/2),
    ``aupr_out`` (step-wise AP), ``fpr95`` (FPR on ID at the recall nearest
    0.95, tied scores together).
  * ``'energy'`` (Liu et al. 2020): ID positive. ``auroc``, ``aupr_in``
    (AP), ``fpr95`` (FPR on OOD at the ID recall nearest 0.95).
  * ``'openood'`` (OpenOOD v1.5): OOD positive. ``auroc``, ``aupr_in`` and
    ``aupr_out`` (trapezoid over the PR curve), ``fpr95`` (first point of
    ``roc_curve`` with TPR >= 0.95, intermediate collinear points dropped).
  * ``'lee'`` (Lee et al., MH ``calculate_log.py``): ID positive, sort-merge
    with an ID score removed before an equal OOD one. ``tnr95`` (1 - FPR at
    the TPR nearest 0.95), ``auroc`` (**ties count 0**),
    ``detection_accuracy`` (max 1/2 (TPR + TNR)), ``aupr_in`` / ``aupr_out``
    (MH AUIN / AUOUT: trapezoid with sentinels).

  Returns:
    dict of float32 scalars.
  """
  check_choice("preset", preset, PRESETS)
  return _preset_core(*_inputs(in_scores, out_scores, in_mask, out_mask), preset=preset)
