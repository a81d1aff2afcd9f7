"""Calibration metrics: RMS/MAD (Hendrycks), ECE/MCE, classwise ECE, NLL, Brier.

Every public function is a thin wrapper that checks its inputs and calls a
jitted core with static shapes. Each takes ``mask`` (boolean, or 0/1 weights):
entries where the mask is false are ignored whatever they hold (even NaN), so
a padded evaluation batch gives the unpadded answer: the same bins and the
same integer counts; float sums can differ in the last bit only, because
XLA's summation order depends on the padded length.

Input regimes (see the private module ``jaxrobust.metrics._validate``):

* eager call: bad input raises ``ValueError`` naming the problem (shape,
  emptiness, NaN/inf, confidences outside [0, 1], probability rows that do not
  sum to one, labels outside [0, num_classes));
* under ``jax.jit``: the same bad *values* make the result NaN.

Conventions (the reference implementations disagree, so each is stated):

* ``confidences`` = max softmax probability, ``correct`` = argmax == label,
  argmax ties go to the first (lowest) index, as in numpy and torch.
* Adaptive bins (:func:`rms_calibration_error`) follow Hendrycks et al.
  ``calib_err`` (hendrycks/outlier-exposure ``utils/calibration_tools.py``):
  a fixed bin *size*, not a fixed bin count.
* Equal-width bins (:func:`expected_calibration_error` with
  ``binning='width'``) are left-closed ``[k/M, (k+1)/M)``; the last bin is
  closed, ``[(M-1)/M, 1]``. Confidence 0 falls in the first bin and 1 in the
  last. An input equal to the float nearest ``k/M`` falls in bin ``k``.
* Within sorted (adaptive / equal-mass) bins, tied confidences that straddle a
  bin boundary are split in input order (stable sort).
* bfloat16 / float16 inputs are cast to float32 before any sum.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxrobust.metrics._validate import (
    as_1d, as_2d, as_labels, check_choice, check_finite_rows, check_labels,
    at_least_f32, check_positive_int, check_probabilities, check_scores, is_traced,
    labels_ok, mask_or_ones, masked_mean, prob_rows_ok, probs_ok, rows_mask)

Array = jax.Array
Norm = Literal["l1", "l2", "max"]
_NORMS = ("l1", "l2", "max")


# ----------------------------------------------------------------------------
# Input handling.
# ----------------------------------------------------------------------------

def _nan_unless(ok: Array, value: Array) -> Array:
  return jnp.where(ok, value, jnp.nan)


def _prepare_probs_labels(probs, labels, mask):
  probs = as_2d("probs", probs)
  labels = as_labels("labels", labels, probs.shape[0])
  mask = rows_mask(mask, probs.shape[0])
  check_probabilities("probs", probs, mask)
  check_labels("labels", labels, probs.shape[1], mask)
  return probs, labels, mask


def _prepare_conf_correct(confidences, correct, mask):
  """Checks a (confidences, correct) pair; returns arrays of one float dtype."""
  conf = at_least_f32(as_1d("confidences", confidences))
  corr = as_1d("correct", correct).astype(conf.dtype)
  if corr.shape != conf.shape:
    raise ValueError(
        f"correct has shape {tuple(corr.shape)} but confidences has shape "
        f"{tuple(conf.shape)}.")
  mask = mask_or_ones("mask", mask, conf.shape)
  check_scores("confidences", conf, mask)
  check_scores("correct", corr, mask)
  if not is_traced(conf, corr, mask):
    m = np.asarray(mask)
    for name, v in (("confidences", np.asarray(conf)[m]), ("correct", np.asarray(corr)[m])):
      if v.min() < 0 or v.max() > 1:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{v.min():.6g}, {v.max():.6g}]"
            + ("; pass max softmax probabilities, not logits." if name == "confidences" else "."))
  return conf, corr, mask


def _pair_ok(conf: Array, corr: Array, mask: Array) -> Array:
  """Traced validity of a (confidences, correct) pair: some valid entry, and
  every valid value in [0, 1] (which also rules out NaN and inf)."""
  inside = (conf >= 0) & (conf <= 1) & (corr >= 0) & (corr <= 1)
  return jnp.any(mask) & jnp.all(jnp.where(mask, inside, True))


# ----------------------------------------------------------------------------
# Binning machinery.
# ----------------------------------------------------------------------------

def _sort_valid_first(conf: Array, corr: Array, mask: Array):
  """Stable sort by confidence with masked entries moved to the end.

  Valid confidences lie in [0, 1] (anything else poisons the result), so a
  key of 2 for masked entries sorts them last.
  """
  key = jnp.where(mask, conf, 2)
  conf_s, corr_s = lax.sort((key, corr), num_keys=1, is_stable=True)
  mask_s = jnp.arange(conf.shape[0]) < jnp.sum(mask.astype(jnp.int32))
  return conf_s, corr_s, mask_s


_CHUNK = 32


def _float_segment_sum(values: Array, ids: Array, num_segments: int) -> Array:
  """``segment_sum`` with float error independent of N.

  A scatter-add accumulates sequentially (relative error ~7e-6 for 1e6
  float32 values); here each chunk of 32 is scattered and the per-chunk
  partial sums are added by an XLA reduction (~1e-7, and faster on CPU).
  """
  pad = -values.shape[0] % _CHUNK
  values = jnp.pad(values, (0, pad)).reshape(-1, _CHUNK)
  ids = jnp.pad(ids, (0, pad)).reshape(-1, _CHUNK)
  partial = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_segments))(
      values, ids)
  return jnp.sum(partial, axis=0)


def _bin_sums(conf, corr, mask, bin_id, num_bins: int):
  """Per-bin (count, sum of confidence, sum of correct); masked entries add 0."""
  count = jax.ops.segment_sum(mask.astype(jnp.int32), bin_id, num_segments=num_bins)
  sum_conf = _float_segment_sum(jnp.where(mask, conf, 0), bin_id, num_bins)
  sum_corr = _float_segment_sum(jnp.where(mask, corr, 0), bin_id, num_bins)
  return count, sum_conf, sum_corr


def _binned_error(count, sum_conf, sum_corr, norm, counted=None) -> Array:
  """Combines per-bin gaps |mean conf - mean correct| with weights n_b / N.

  ``norm`` is a name in ``_NORMS`` or its (possibly traced) index, so one
  compiled core serves every norm. ``counted`` (optional boolean per bin)
  excludes bins from the sum while N still counts their examples (Hendrycks'
  last-bin quirk). Empty bins never contribute.
  """
  total = jnp.sum(count).astype(sum_conf.dtype)
  safe = jnp.maximum(count, 1).astype(sum_conf.dtype)
  gap = jnp.abs(sum_conf / safe - sum_corr / safe)
  use = count > 0 if counted is None else (count > 0) & counted
  weight = jnp.where(use, count.astype(sum_conf.dtype) / total, 0)
  values = jnp.stack([jnp.sum(weight * gap), jnp.sqrt(jnp.sum(weight * gap * gap)),
                      jnp.max(jnp.where(use, gap, 0))])
  return values[_NORMS.index(norm) if isinstance(norm, str) else norm]


def _width_bin_ids(conf: Array, num_bins: int) -> Array:
  """Equal-width bin index: left-closed bins, 0 -> first bin, 1 -> last bin."""
  # Interior edges are the floats nearest k / num_bins in the input dtype.
  inner = np.asarray(np.arange(1, num_bins) / num_bins, dtype=conf.dtype)
  return jnp.searchsorted(jnp.asarray(inner), conf, side="right").astype(jnp.int32)


def _mass_bin_ids(n_valid: Array, size: int, num_bins: int) -> Array:
  """Equal-mass bin of each sorted position, ``torch.tensor_split`` style.

  With n valid entries, the first n % B bins hold n // B + 1 entries and the
  others n // B; when n < B the last B - n bins are empty.
  """
  pos = jnp.arange(size, dtype=jnp.int32)
  q = n_valid // num_bins
  r = n_valid % num_bins
  big = r * (q + 1)
  ids = jnp.where(pos < big, pos // (q + 1), r + (pos - big) // jnp.maximum(q, 1))
  return jnp.minimum(ids, num_bins - 1)


# ----------------------------------------------------------------------------
# Confidences.
# ----------------------------------------------------------------------------

@jax.jit
def _confidences_and_correct(probs, labels, mask):
  conf = jnp.max(probs, axis=-1)
  pred = jnp.argmax(probs, axis=-1)  # First index on ties.
  correct = (pred == labels).astype(probs.dtype)
  row_ok = prob_rows_ok(probs) & (labels >= 0) & (labels < probs.shape[-1])
  bad = mask & ~row_ok
  return jnp.where(bad, jnp.nan, conf), jnp.where(bad, jnp.nan, correct)


def confidences_and_correct(probs, labels, *, mask=None) -> tuple[Array, Array]:
  """Max-softmax confidence and correctness of the argmax prediction.

  Args:
    probs: (N, K) softmax probabilities (rows must sum to one).
    labels: (N,) integer labels in [0, K).
    mask: optional (N,) validity mask.

  Returns:
    ``(confidences, correct)``, both (N,) floats; ``correct`` is 1.0 where
    ``argmax(probs) == label`` (ties resolved to the first index, like
    ``numpy.argmax`` and ``torch.argmax``), else 0.0. Masked rows hold
    whatever the padding computes to and must stay masked downstream. Under
    jit, a valid row that is not a probability vector or has an
    out-of-range label gives NaN in both outputs.
  """
  probs, labels, mask = _prepare_probs_labels(probs, labels, mask)
  return _confidences_and_correct(probs, labels, mask)


# ----------------------------------------------------------------------------
# Hendrycks adaptive-bin RMS / MAD calibration error.
# ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("bin_size",))
def _adaptive_error(conf, corr, mask, norm_index, drop_last_bin, *, bin_size):
  size = conf.shape[0]
  conf_s, corr_s, mask_s = _sort_valid_first(conf, corr, mask)
  n = jnp.sum(mask.astype(jnp.int32))
  num_bins = jnp.maximum(n // bin_size, 1)
  # Sum whole blocks of bin_size sorted entries (a reshape: exact grouping),
  # then merge the trailing blocks into the last bin, which absorbs the
  # remainder. Padding sorts last and adds nothing.
  num_blocks = -(-size // bin_size)
  pad = num_blocks * bin_size - size
  blocks = lambda x: jnp.sum(jnp.pad(jnp.where(mask_s, x, 0), (0, pad)).reshape(num_blocks, -1),
                             axis=1)
  block_bin = jnp.minimum(jnp.arange(num_blocks), num_bins - 1)
  num_bins_static = max(size // bin_size, 1)
  merge = lambda x: jax.ops.segment_sum(x, block_bin, num_segments=num_bins_static)
  stats = tuple(merge(blocks(x)) for x in (mask_s.astype(jnp.int32), conf_s, corr_s))
  counted = ~drop_last_bin | (jnp.arange(num_bins_static) != num_bins - 1)
  value = _binned_error(*stats, norm_index, counted)
  return _nan_unless(_pair_ok(conf, corr, mask), value)


def rms_calibration_error(confidences, correct, *, bin_size: int = 100,
                          drop_last_bin: bool = False, norm: Norm = "l2",
                          mask=None) -> Array:
  """RMS calibration error with adaptive bins of fixed size (Hendrycks et al.).

  Port of ``calib_err`` from hendrycks/outlier-exposure
  ``utils/calibration_tools.py`` (also in hendrycks/pre-training and
  pytorch-ood ``calibration_error``): sort by confidence, cut consecutive
  blocks of ``bin_size`` examples, ``B = floor(N / bin_size)`` bins with the
  last one absorbing the remainder, then

    RMS = sqrt( sum_b (n_b / N) * (mean conf_b - mean correct_b)^2 ).

  ``norm='l1'`` gives the MAD calibration error, ``norm='max'`` the largest
  bin gap. With ``N < bin_size`` there is a single bin of all N examples (the
  reference raises ``IndexError`` there).

  ``drop_last_bin=True`` reproduces the reference code's quirk: its loop runs
  over ``range(len(bins) - 1)``, so the highest-confidence bin is never
  counted while the weights still divide by the full N. Use it to reproduce
  published HPT / OE / pytorch-ood numbers; the default counts every bin.
  With the quirk and fewer than ``2 * bin_size`` examples the result is 0,
  as in the reference.

  Args:
    confidences: (N,) confidences in [0, 1].
    correct: (N,) 0/1 correctness (bool, int or float).
    bin_size: examples per bin (reference ``beta=100``).
    drop_last_bin: reproduce the reference's uncounted last bin.
    norm: 'l2' (RMS, default), 'l1' (MAD) or 'max'.
    mask: optional (N,) validity mask; masked entries are removed before the
      bins are formed, so padding never moves a bin boundary.

  Returns:
    Scalar calibration error (NaN under jit on invalid values).
  """
  bin_size = check_positive_int("bin_size", bin_size)
  check_choice("norm", norm, _NORMS)
  conf, corr, mask = _prepare_conf_correct(confidences, correct, mask)
  return _adaptive_error(conf, corr, mask, _NORMS.index(norm), bool(drop_last_bin),
                         bin_size=bin_size)


def mad_calibration_error(confidences, correct, *, bin_size: int = 100,
                          drop_last_bin: bool = False, mask=None) -> Array:
  """Mean-absolute-deviation calibration error: Hendrycks ``calib_err(p='1')``.

  Same bins and ``drop_last_bin`` semantics as :func:`rms_calibration_error`.
  """
  return rms_calibration_error(confidences, correct, bin_size=bin_size,
                               drop_last_bin=drop_last_bin, norm="l1", mask=mask)


# ----------------------------------------------------------------------------
# Expected calibration error (equal-width or equal-mass bins).
# ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("num_bins", "binning"))
def _ece(conf, corr, mask, norm_index, *, num_bins, binning):
  if binning == "width":
    bin_id = _width_bin_ids(conf, num_bins)
    stats = _bin_sums(conf, corr, mask, bin_id, num_bins)
  else:
    conf_s, corr_s, mask_s = _sort_valid_first(conf, corr, mask)
    n = jnp.sum(mask.astype(jnp.int32))
    bin_id = _mass_bin_ids(n, conf.shape[0], num_bins)
    stats = _bin_sums(conf_s, corr_s, mask_s, bin_id, num_bins)
  return _nan_unless(_pair_ok(conf, corr, mask), _binned_error(*stats, norm_index))


def expected_calibration_error(confidences, correct, *, num_bins: int = 15,
                               norm: Norm = "l1",
                               binning: Literal["width", "mass"] = "width",
                               mask=None) -> Array:
  """Binned calibration error: ECE (l1), RMS-CE (l2) or MCE (max).

  ``sum_b (n_b / N) |mean conf_b - mean correct_b|`` over non-empty bins for
  'l1'; the square root of the weighted squared gaps for 'l2'; the largest
  gap over non-empty bins for 'max' (MCE).

  Binning:

  * ``'width'`` (default): ``num_bins`` equal-width bins on [0, 1], the
    robustness_metrics ``ece`` / torchmetrics ``CalibrationError`` convention
    (15 bins, Guo et al. 2017). Bins are left-closed, ``[k/M, (k+1)/M)``, and
    the last bin is closed, so confidence 0 falls in the first bin and 1 in
    the last. (robustness_metrics' ``tf.histogram_fixed_width_bins`` does the
    same; torchmetrics >= 0.11 instead gives confidence exactly 1.0 its own
    extra bin.)
  * ``'mass'``: equal-mass bins over the sorted confidences, split as
    ``torch.tensor_split`` does (TorchUncertainty
    ``AdaptiveCalibrationError``): the first ``N % M`` bins hold one extra
    example; with ``N < M`` some bins stay empty and are skipped.
    robustness_metrics' ``GeneralCalibrationError(binning_scheme='adaptive')``
    uses value edges instead (ties never straddle a bin), so it can differ
    when confidences tie.

  Args:
    confidences: (N,) confidences in [0, 1].
    correct: (N,) 0/1 correctness.
    num_bins: number of bins M.
    norm: 'l1' (ECE), 'l2' (RMS calibration error) or 'max' (MCE).
    binning: 'width' or 'mass'.
    mask: optional (N,) validity mask.

  Returns:
    Scalar (NaN under jit on invalid values, e.g. confidences outside [0, 1]).
  """
  num_bins = check_positive_int("num_bins", num_bins)
  check_choice("norm", norm, _NORMS)
  check_choice("binning", binning, ("width", "mass"))
  conf, corr, mask = _prepare_conf_correct(confidences, correct, mask)
  return _ece(conf, corr, mask, _NORMS.index(norm), num_bins=num_bins, binning=binning)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _reliability(conf, corr, mask, *, num_bins):
  count, sum_conf, sum_corr = _bin_sums(conf, corr, mask, _width_bin_ids(conf, num_bins), num_bins)
  ok = _pair_ok(conf, corr, mask)
  nonempty = ok & (count > 0)
  safe = jnp.maximum(count, 1).astype(conf.dtype)
  edges = jnp.asarray(np.arange(num_bins + 1) / num_bins, dtype=conf.dtype)
  return dict(bin_edges=edges,
              bin_confidence=jnp.where(nonempty, sum_conf / safe, jnp.nan),
              bin_accuracy=jnp.where(nonempty, sum_corr / safe, jnp.nan),
              bin_count=count)


def reliability_diagram_data(confidences, correct, *, num_bins: int = 15,
                             mask=None) -> dict[str, Array]:
  """Per-bin statistics behind a reliability diagram (equal-width bins).

  Uses the bins of :func:`expected_calibration_error` with
  ``binning='width'``, so ``sum(count * |conf - acc|) / sum(count)`` over
  non-empty bins equals the ECE.

  Returns:
    dict with ``bin_edges`` (M+1,), ``bin_confidence`` (M,) mean confidence,
    ``bin_accuracy`` (M,) mean correctness (both NaN for empty bins, and for
    every bin under jit on invalid values) and ``bin_count`` (M,) int32.
  """
  num_bins = check_positive_int("num_bins", num_bins)
  conf, corr, mask = _prepare_conf_correct(confidences, correct, mask)
  return _reliability(conf, corr, mask, num_bins=num_bins)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _classwise_ece(probs, labels, mask, *, num_bins):
  num_classes = probs.shape[1]
  onehot = (labels[:, None] == jnp.arange(num_classes)[None, :]).astype(probs.dtype)

  def one_class(p, y):
    stats = _bin_sums(p, y, mask, _width_bin_ids(p, num_bins), num_bins)
    return _binned_error(*stats, "l1")

  # lax.map in batches bounds memory at 64 classes' chunked partial sums.
  per_class = lax.map(lambda a: one_class(*a), (probs.T, onehot.T), batch_size=64)
  ok = probs_ok(probs, mask) & labels_ok(labels, num_classes, mask)
  return _nan_unless(ok, jnp.mean(per_class))


def classwise_ece(probs, labels, *, num_bins: int = 15, mask=None) -> Array:
  """Static / classwise calibration error (SCE, Nixon et al. 2019).

  For each class k, the equal-width ECE (same bins as
  :func:`expected_calibration_error`) of ``probs[:, k]`` against
  ``labels == k`` over all N examples; then the mean over the K classes.
  Matches robustness_metrics ``sce`` (``GeneralCalibrationError`` with
  ``binning_scheme='even', class_conditional=True, max_prob=False``) except
  that it keeps probabilities exactly 0 (robustness_metrics' threshold test
  ``p > 0`` drops them) and puts probability 1 in the last bin.

  Returns:
    Scalar SCE (NaN under jit on invalid values).
  """
  num_bins = check_positive_int("num_bins", num_bins)
  probs, labels, mask = _prepare_probs_labels(probs, labels, mask)
  return _classwise_ece(probs, labels, mask, num_bins=num_bins)


# ----------------------------------------------------------------------------
# Proper scoring rules.
# ----------------------------------------------------------------------------

@jax.jit
def _nll_logits(logits, labels, mask):
  num_classes = logits.shape[1]
  row_ok = jnp.all(jnp.isfinite(logits), axis=-1)
  z = jnp.where((mask & row_ok)[:, None], logits, 0)
  safe_labels = jnp.clip(labels, 0, num_classes - 1)
  per_example = (jax.nn.logsumexp(z, axis=-1)
                 - jnp.take_along_axis(z, safe_labels[:, None], axis=-1)[:, 0])
  ok = jnp.all(jnp.where(mask, row_ok, True)) & labels_ok(labels, num_classes, mask)
  return _nan_unless(ok, masked_mean(per_example, mask))


@jax.jit
def _nll_probs(probs, labels, mask):
  num_classes = probs.shape[1]
  safe_labels = jnp.clip(labels, 0, num_classes - 1)
  p_true = jnp.take_along_axis(probs, safe_labels[:, None], axis=-1)[:, 0]
  per_example = -jnp.log(jnp.where(mask, p_true, 1))
  ok = probs_ok(probs, mask) & labels_ok(labels, num_classes, mask)
  return _nan_unless(ok, masked_mean(per_example, mask))


def nll_from_logits(logits, labels, *, mask=None) -> Array:
  """Mean negative log-likelihood (cross-entropy, nats) from logits.

  ``mean_i [logsumexp(z_i) - z_i[y_i]]``: numerically stable, finite for any
  finite logits. Preferred over :func:`nll_from_probs`.
  """
  logits = as_2d("logits", logits)
  labels = as_labels("labels", labels, logits.shape[0])
  mask = rows_mask(mask, logits.shape[0])
  check_finite_rows("logits", logits, mask)
  check_labels("labels", labels, logits.shape[1], mask)
  return _nll_logits(logits, labels, mask)


def nll_from_probs(probs, labels, *, mask=None) -> Array:
  """Mean negative log-likelihood (nats) from probabilities: ``mean -log p[y]``.

  No clipping: a zero probability on the true class gives ``inf`` (honest,
  where ``sklearn.metrics.log_loss`` clips to machine epsilon). Use
  :func:`nll_from_logits` when logits are available.
  """
  probs, labels, mask = _prepare_probs_labels(probs, labels, mask)
  return _nll_probs(probs, labels, mask)


def negative_log_likelihood(inputs, labels, *, from_logits: bool, mask=None) -> Array:
  """Mean NLL; ``from_logits`` must be given (no silent guess between the two)."""
  if not isinstance(from_logits, bool):
    raise ValueError(f"from_logits must be True or False, got {from_logits!r}.")
  fn = nll_from_logits if from_logits else nll_from_probs
  return fn(inputs, labels, mask=mask)


@jax.jit
def _brier(probs, labels, mask):
  num_classes = probs.shape[1]
  onehot = (labels[:, None] == jnp.arange(num_classes)[None, :]).astype(probs.dtype)
  per_example = jnp.sum(jnp.square(jnp.where(mask[:, None], probs, 0) - onehot), axis=-1)
  ok = probs_ok(probs, mask) & labels_ok(labels, num_classes, mask)
  return _nan_unless(ok, masked_mean(per_example, mask))


def brier_score(probs, labels, *, mask=None) -> Array:
  """Multi-class Brier score: ``mean_i sum_k (p_ik - 1[y_i = k])^2``, in [0, 2].

  This is Brier's original sum over classes (Ovadia et al. 2019,
  uncertainty-baselines, ``sklearn.metrics.brier_score_loss`` for more than
  two classes). For K = 2 it is twice sklearn's binary ``brier_score_loss``
  (which scores only the positive class); some papers divide by K instead.
  """
  probs, labels, mask = _prepare_probs_labels(probs, labels, mask)
  return _brier(probs, labels, mask)


@jax.jit
def _soft_f1(conf, corr, mask):
  wrong = 1 - corr
  num = 2 * jnp.sum(jnp.where(mask, (1 - conf) * wrong, 0))
  den = jnp.sum(jnp.where(mask, (1 - conf) + wrong, 0))
  return _nan_unless(_pair_ok(conf, corr, mask), num / den)


def soft_f1(confidences, correct, *, mask=None) -> Array:
  """Soft F1 of detecting errors from confidence (Hendrycks ``soft_f1``).

  Errors are the positive class and ``1 - confidence`` is the soft positive
  prediction: ``2 * sum((1 - c) * wrong) / sum((1 - c) + wrong)``. NaN when
  every valid prediction is correct with confidence 1 (0 / 0).
  """
  conf, corr, mask = _prepare_conf_correct(confidences, correct, mask)
  return _soft_f1(conf, corr, mask)
