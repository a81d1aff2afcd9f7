"""Precision and recall of generative models, on feature embeddings.

Both metrics compare a set of **real** features ``real`` (N, D) -- the
reference sample, e.g. Inception or DINOv2 embeddings of the training set --
with a set of **generated** ("fake") features ``fake`` (M, D) embedded by the
same network. **Precision** (fidelity) asks how much of the fake set lies on
the support estimated from the real set; **recall** (diversity) asks how much
of the real set lies on the support estimated from the fake set. Both are
fractions in [0, 1]; swapping the arguments swaps the two numbers.

* :func:`improved_precision_recall` -- Kynkäänniemi et al. 2019, "Improved
  Precision and Recall Metric for Assessing Generative Models": a union of
  k-NN balls (k = 3), a sample is in or out.
* :func:`probabilistic_precision_recall` -- Park & Kim, ICCV 2023,
  "Probabilistic Precision and Recall Towards Reliable Evaluation of
  Generative Models" (P-precision / P-recall): every sample of one set
  makes a point of the other set part of its support with a probability that
  falls linearly with distance, inside one common radius; an outlier whose
  k-NN ball is huge no longer vouches for everything around it.

Computation: Euclidean distances, by the Gram expansion
``|x|^2 + |y|^2 - 2 x.y`` (clamped at 0) after translating both sets by the
first valid real row (distances are unchanged; the expansion loses less to
cancellation near the data). The pairwise distances are never materialised:
both sets are cut into blocks of ``chunk_size`` rows, and every reduction
(the running k smallest distances, "inside some ball", the sum of
log-probabilities) is folded over the column blocks of one row block at a
time, so memory is O(chunk_size^2) whatever N and M (50,000 x 50,000 runs in
a few tens of MB). Matrix products run at ``Precision.HIGHEST`` (no TF32 or
bfloat16 passes on GPU/TPU).

Masks and input regimes, as every metric of :mod:`jaxrobust.metrics`:

* ``real_mask`` (N,) / ``fake_mask`` (M,), boolean or 0/1, drop padded rows.
  With the padding appended at the end of a set (the usual padded eval
  batch), the result is bit-for-bit the unpadded call's; masked rows
  elsewhere give the same numbers up to float rounding. Masked rows may hold
  anything, NaN included.
* Eager call: a wrong rank, no row, a feature-size mismatch, a mask of the
  wrong shape, at most ``k`` valid rows in a set (each sample needs ``k``
  neighbours other than itself), NaN/inf in a valid row or a bad option
  raise ``ValueError`` naming it.
* Under ``jax.jit``: shapes and options are still checked at trace time;
  too few valid rows or a non-finite valid value make both results NaN,
  never a finite wrong number.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrobust.metrics import ranking
from jaxrobust.metrics._validate import (
  at_least_f32,
  check_finite_rows,
  check_positive_int,
  is_traced,
  mask_or_ones,
)

Array = jax.Array

DEFAULT_CHUNK_SIZE = 1024
"""Default rows per block; a block pair's distances take ``chunk_size**2`` floats."""


# ----------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------


def _inputs(real, fake, real_mask, fake_mask, k: int):
  """Validates both sets; returns (real, real_mask, fake, fake_mask)."""
  out = []
  for name, x, m in (("real", real, real_mask), ("fake", fake, fake_mask)):
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
      raise ValueError(
          f"{name} must be 2-D (samples, features) with at least one row and one "
          f"feature, got shape {tuple(x.shape)}.")
    out += [at_least_f32(x), mask_or_ones(f"{name}_mask", m, (x.shape[0],))]
  xr, mr, xf, mf = out
  if xr.shape[1] != xf.shape[1]:
    raise ValueError(
        f"fake has {xf.shape[1]} features per row but real has {xr.shape[1]}; both "
        "sets must be embedded by the same network.")
  dtype = jnp.promote_types(xr.dtype, xf.dtype)
  xr, xf = xr.astype(dtype), xf.astype(dtype)
  for name, x, m in (("real", xr, mr), ("fake", xf, mf)):
    if is_traced(x, m):
      continue
    n = int(np.count_nonzero(np.asarray(m)))
    if n <= k:
      raise ValueError(
          f"{name} has {n} valid row(s); k={k} needs at least k + 1 = {k + 1} "
          "(the k-th nearest neighbour of each sample among the other samples of its set).")
    check_finite_rows(name, x, m)
  return xr, mr, xf, mf


def _check_options(k, chunk_size) -> tuple[int, int]:
  return check_positive_int("k", k), check_positive_int("chunk_size", chunk_size)


# ----------------------------------------------------------------------------
# Blocked distances.
# ----------------------------------------------------------------------------


class _Blocks:
  """A set cut into ``nb`` blocks of ``c`` rows: rows (nb, c, D), squared
  norms (nb, c) and validity (nb, c). Invalid and padding rows are zeros."""

  def __init__(self, x: Array, mask: Array, origin: Array, c: int):
    n, d = x.shape
    nb = -(-n // c)
    x = jnp.where(mask[:, None], x - origin, 0.0)
    x = jnp.pad(x, ((0, nb * c - n), (0, 0)))
    self.rows = x.reshape(nb, c, d)
    self.sq = jnp.sum(self.rows * self.rows, axis=-1)
    self.valid = jnp.pad(mask, (0, nb * c - n)).reshape(nb, c)
    self.count = jnp.sum(mask.astype(jnp.int32))

  @property
  def num_blocks(self) -> int:
    return self.rows.shape[0]


def _sweep(rows: _Blocks, cols: _Blocks, step: Callable, row_init, col_init=None,
           row_data=(), col_data=()):
  """Folds ``step`` over every (row block, column block) pair of squared
  distances, one (c, c) block at a time.

  ``step(row_acc, col_acc, d2, i, j, row_data[i], col_data[j]) -> (row_acc,
  col_acc)``: ``row_acc`` (starting at ``row_init``) is folded over the
  column blocks of row block ``i``; ``col_acc`` (starting at ``col_init``,
  one per column block; ``None`` when unused) over the row blocks, so one
  pass over the distances reduces them along both axes. ``i``/``j`` are the
  block indices. Returns (row accumulators stacked over the row blocks,
  column accumulators stacked over the column blocks).
  """
  def row_block(col_acc, args):
    i, a, a_sq, r_data = args

    def col_block(carry, args_j):
      row_acc, col_acc = carry
      j, b, b_sq, c_data = args_j
      ab = lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)
      d2 = jnp.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * ab, 0.0)
      acc_j = None if col_acc is None else jax.tree.map(lambda t: t[j], col_acc)
      row_acc, acc_j = step(row_acc, acc_j, d2, i, j, r_data, c_data)
      if col_acc is not None:
        col_acc = jax.tree.map(lambda t, u: t.at[j].set(u), col_acc, acc_j)
      return (row_acc, col_acc), None

    xs = (jnp.arange(cols.num_blocks), cols.rows, cols.sq, col_data)
    (row_acc, col_acc), _ = lax.scan(col_block, (row_init, col_acc), xs)
    return col_acc, row_acc

  if col_init is not None:
    col_init = jax.tree.map(lambda t: jnp.broadcast_to(t, (cols.num_blocks, *t.shape)), col_init)
  xs = (jnp.arange(rows.num_blocks), rows.rows, rows.sq, row_data)
  col_acc, row_acc = lax.scan(row_block, col_init, xs)
  return row_acc, col_acc


def _kth_neighbour_sq(blocks: _Blocks, k: int) -> Array:
  """(nb, c) squared distance of every row to its k-th nearest neighbour
  among the *other* valid rows of its set (a running k smallest over the
  column blocks; duplicates of a row count as neighbours at distance 0)."""
  c = blocks.rows.shape[1]
  diagonal = jnp.eye(c, dtype=bool)
  big = jnp.array(jnp.inf, blocks.rows.dtype)

  def step(smallest, unused, d2, i, j, unused_i, valid_j):
    del unused, unused_i
    d2 = jnp.where(valid_j[None, :] & ~(diagonal & (i == j)), d2, big)
    block_smallest = -lax.top_k(-d2, min(k, c))[0]
    merged = jnp.concatenate([smallest, block_smallest], axis=1)
    return -lax.top_k(-merged, k)[0], None

  smallest, _ = _sweep(blocks, blocks, step, jnp.full((c, k), big), col_data=blocks.valid)
  return smallest[..., k - 1]


def _block_sum(values: Array, valid: Array) -> Array:
  """Sum of the valid entries of (nb, c) values, block after block: padding
  blocks appended at the end add exact zeros, so padded and unpadded calls
  agree to the bit."""
  def add(total, vm):
    v, m = vm
    return total + jnp.sum(jnp.where(m, v, 0.0)), None
  return lax.scan(add, jnp.zeros((), values.dtype), (values, valid))[0]


def _prepare(xr, mr, xf, mf, c: int) -> tuple[_Blocks, _Blocks]:
  """(fake, real) blocks, both translated by the first valid real row."""
  xr, mr, xf, mf = map(ranking.replicated, (xr, mr, xf, mf))
  origin = xr[jnp.argmax(mr)]
  return _Blocks(xf, mf, origin, c), _Blocks(xr, mr, origin, c)


def _ok(xr, mr, xf, mf, k: int) -> Array:
  """Traced validity: enough valid rows, and every valid value finite."""
  ok = jnp.array(True)
  for x, m in ((xr, mr), (xf, mf)):
    ok = ok & (jnp.sum(m.astype(jnp.int32)) > k)
    ok = ok & jnp.all(jnp.where(m[:, None], jnp.isfinite(x), True))
  return ok


def _fraction(hit: Array, blocks: _Blocks) -> Array:
  """Fraction of the valid rows of ``blocks`` where ``hit`` (nb, c) holds."""
  count = jnp.sum((hit & blocks.valid).astype(jnp.int32))
  dtype = blocks.rows.dtype
  return count.astype(dtype) / blocks.count.astype(dtype)


# ----------------------------------------------------------------------------
# Jitted cores.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _improved_core(xr, mr, xf, mf, *, k, chunk_size):
  fake, real = _prepare(xr, mr, xf, mf, chunk_size)
  inf = jnp.array(jnp.inf, real.rows.dtype)
  # A masked-out sample's ball is empty (radius^2 = -inf).
  radius_real = jnp.where(real.valid, _kth_neighbour_sq(real, k), -inf)
  radius_fake = jnp.where(fake.valid, _kth_neighbour_sq(fake, k), -inf)

  def step(fake_hit, real_hit, d2, i, j, radius_fake_i, radius_real_j):
    del i, j  # d2: (fake block, real block)
    fake_hit = fake_hit | jnp.any(d2 <= radius_real_j[None, :], axis=1)
    real_hit = real_hit | jnp.any(d2 <= radius_fake_i[:, None], axis=0)
    return fake_hit, real_hit

  no_hit = jnp.zeros((chunk_size,), bool)
  fake_hit, real_hit = _sweep(fake, real, step, no_hit, no_hit, radius_fake, radius_real)
  precision = _fraction(fake_hit, fake)
  recall = _fraction(real_hit, real)
  ok = _ok(xr, mr, xf, mf, k)
  return jnp.where(ok, precision, jnp.nan), jnp.where(ok, recall, jnp.nan)


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _probabilistic_core(xr, mr, xf, mf, a, *, k, chunk_size):
  fake, real = _prepare(xr, mr, xf, mf, chunk_size)
  dtype = real.rows.dtype
  a = jnp.asarray(a, dtype)

  def support_radius(blocks):
    knn = jnp.sqrt(_kth_neighbour_sq(blocks, k))
    return a * _block_sum(knn, blocks.valid) / blocks.count.astype(dtype)

  radius_real, radius_fake = support_radius(real), support_radius(fake)

  def log_outside(d2, radius, valid):
    # log(1 - f) = log(d / R) inside the radius (f = 1 - d / R), 0 outside
    # (f = 0); from d^2, without a square root. f is continuous at d = R, so
    # rounding at the boundary moves the result by a rounding error only.
    inside = valid & (d2 < radius * radius)
    log_ratio = 0.5 * jnp.log(d2) - jnp.log(radius)
    return jnp.where(inside, jnp.minimum(log_ratio, 0.0), 0.0)

  def step(log_fake, log_real, d2, i, j, valid_fake_i, valid_real_j):
    del i, j  # d2: (fake block, real block)
    log_fake = log_fake + jnp.sum(log_outside(d2, radius_real, valid_real_j[None, :]), axis=1)
    log_real = log_real + jnp.sum(log_outside(d2, radius_fake, valid_fake_i[:, None]), axis=0)
    return log_fake, log_real

  zero = jnp.zeros((chunk_size,), dtype)
  log_fake, log_real = _sweep(fake, real, step, zero, zero, fake.valid, real.valid)
  # P(sample on the other set's support) = 1 - prod (1 - f) = -expm1(sum log(1 - f)).
  p_precision = _block_sum(-jnp.expm1(log_fake), fake.valid) / fake.count.astype(dtype)
  p_recall = _block_sum(-jnp.expm1(log_real), real.valid) / real.count.astype(dtype)
  ok = _ok(xr, mr, xf, mf, k) & jnp.isfinite(a) & (a > 0)
  return jnp.where(ok, p_precision, jnp.nan), jnp.where(ok, p_recall, jnp.nan)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def improved_precision_recall(real, fake, *, k: int = 3, real_mask=None, fake_mask=None,
                              chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Array, Array]:
  """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

  Every real sample ``x_i`` gets the ball of radius ``r_i`` = distance to its
  ``k``-th nearest neighbour among the other real samples; the union of
  these balls estimates the real support. **Precision** is the fraction of
  fake samples inside that union (``|y - x_i| <= r_i`` for some ``i``);
  **recall** is the fraction of real samples inside the union of the fake
  samples' balls, built the same way from the fake set.

  Follows the authors' code (kynkaat/improved-precision-and-recall-metric,
  ``precision_recall.py``; NVlabs' StyleGAN2-ADA ``metrics/precision_recall.py``
  computes the same): default ``k = 3`` (``nhood_sizes=[3]``), a closed ball
  (``<=``), the k-th neighbour found in the sorted distances with the sample
  itself at position 0 -- so a duplicate of a sample counts as a neighbour
  at distance 0. Like it, squared distances from the Gram expansion in
  float32; departs only by translating the features first, by working block
  by block (no ``row_batch_size x N`` matrix) and by the masks. Note that
  ``generative-evaluation-prdc`` (Naeem et al. 2020) uses an open ball
  (``<``); the two differ only on exact ties.

  Args:
    real: (N, D) features of real samples (the reference set).
    fake: (M, D) features of generated samples, same embedding.
    k: neighbourhood size, at least 1 and below the number of valid rows of
      each set.
    real_mask, fake_mask: optional (N,) / (M,) validity masks.
    chunk_size: rows per block (memory ~ ``chunk_size**2`` floats; any value
      gives the same numbers).
  Returns:
    ``(precision, recall)``, float32 scalars in [0, 1] (float64 for float64
    input with x64 enabled); NaN under jit for invalid input.
  """
  k, chunk_size = _check_options(k, chunk_size)
  return _improved_core(*_inputs(real, fake, real_mask, fake_mask, k), k=k,
                        chunk_size=chunk_size)


def probabilistic_precision_recall(real, fake, *, a: float = 1.2, k: int = 4, real_mask=None,
                                   fake_mask=None, chunk_size: int = DEFAULT_CHUNK_SIZE
                                   ) -> tuple[Array, Array]:
  """P-precision and P-recall (Park & Kim, ICCV 2023).

  One radius per set instead of one per sample: ``R_real = a * mean_i
  d_k(x_i)``, ``d_k`` the distance from a real sample to its ``k``-th
  nearest other real sample. A real sample ``x_i`` puts a fake sample ``y``
  on the real support with probability ``f(y, x_i) = max(0, 1 - |y - x_i| /
  R_real)``, independently of the other real samples, so

  * **P-precision** = mean over fake ``y`` of ``1 - prod_i (1 - f(y, x_i))``;
  * **P-recall** = mean over real ``x`` of ``1 - prod_j (1 - f(x, y_j))``,
    with ``R_fake = a * mean_j d_k(y_j)`` from the fake set.

  A real outlier changes ``R_real`` by only its share of the mean, where in
  :func:`improved_precision_recall` its own huge k-NN ball would cover every
  fake sample near it -- the failure P-precision was designed for.

  Reference followed: the authors' official code,
  kdst-team/Probablistic_precision_recall ``metric/pp_pr.py``
  (``compute_pprecision_precall``, as fixed on 2024-05-29; paper: arXiv
  2309.01590). Kept from it: the defaults ``a = 1.2`` and ``k = 4``
  (``kth``; also those of its ``toy_experiment.py``), the k-th neighbour
  counted with the sample itself at position 0 (as above: duplicates are
  neighbours), ``f = 0`` at ``|y - x| >= R`` (so a set of identical points,
  ``R = 0``, gives 0). Departures: float32 distances from
  the Gram expansion, block by block (the reference: float64
  ``sklearn.metrics.pairwise_distances``, three full matrices); the product
  is taken as ``exp(sum log(|y - x_i| / R))`` over the samples inside the
  radius (the same value: ``1 - f = |y - x| / R`` there); masks.

  Args:
    real: (N, D) features of real samples (the reference set).
    fake: (M, D) features of generated samples, same embedding.
    a: scale of the radius, ``a > 0`` (the official code's default: 1.2).
    k: neighbourhood size of the mean k-NN distance (the official code's
      default: 4), at least 1 and below the number of valid rows of each set.
    real_mask, fake_mask: optional (N,) / (M,) validity masks.
    chunk_size: rows per block (memory ~ ``chunk_size**2`` floats; the
      numbers agree across values up to float rounding).
  Returns:
    ``(p_precision, p_recall)``, float32 scalars in [0, 1]; NaN under jit
    for invalid input.
  """
  k, chunk_size = _check_options(k, chunk_size)
  if not is_traced(a):
    try:
      value = None if isinstance(a, bool) else float(a)
    except (TypeError, ValueError):
      value = None
    if value is None or not math.isfinite(value) or value <= 0:
      raise ValueError(f"a must be a finite number > 0, got {a!r}.")
  return _probabilistic_core(*_inputs(real, fake, real_mask, fake_mask, k), a, k=k,
                             chunk_size=chunk_size)
