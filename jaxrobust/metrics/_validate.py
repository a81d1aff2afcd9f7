"""Input checks shared by every metric.

Two regimes, documented in every public metric:

* **Eager call** (concrete arrays): bad input raises ``ValueError`` naming the
  argument and the problem (shape, emptiness, NaN/inf, label range, probabilities
  that do not sum to one).
* **Under ``jax.jit``** (tracers): shapes are still checked at trace time, but
  values cannot raise. The metric then returns NaN for invalid values (NaN/inf
  scores, no valid element) -- never a finite wrong number. Use
  :func:`poison` to apply that rule inside a jitted core.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def is_traced(*xs) -> bool:
  """True when any argument is a tracer (inside jit/vmap/grad)."""
  return any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def as_1d(name: str, x) -> Array:
  """Converts to a 1-D floating array, or raises naming ``name``."""
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def mask_or_ones(name: str, mask, shape: tuple[int, ...]) -> Array:
  """Returns a boolean mask of ``shape``; ``None`` means all valid.

  Numeric masks (weights 0/1) are accepted and converted with ``!= 0``.
  """
  if mask is None:
    return jnp.ones(shape, dtype=bool)
  mask = jnp.asarray(mask)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(
        f"{name} has shape {tuple(mask.shape)} but the values it masks have "
        f"shape {tuple(shape)}.")
  return mask if mask.dtype == jnp.bool_ else mask != 0


def check_scores(name: str, x: Array, mask: Array) -> None:
  """Eager-only value checks for a score vector; no-op under tracing."""
  if is_traced(x, mask):
    return
  xn = np.asarray(x)
  mn = np.asarray(mask)
  if xn.size == 0 or not mn.any():
    raise ValueError(f"{name} is empty (no valid element after masking).")
  valid = xn[mn]
  if not np.all(np.isfinite(valid)):
    bad = int(np.sum(~np.isfinite(valid)))
    raise ValueError(
        f"{name} contains {bad} NaN or inf value(s) among its valid entries; "
        "metrics on non-finite scores are undefined.")


def check_labels(name: str, labels: Array, num_classes: int,
                 mask: Optional[Array] = None) -> None:
  """Eager-only check that integer labels lie in [0, num_classes)."""
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(f"{name} must be integers, got dtype {jnp.asarray(labels).dtype}.")
  if is_traced(labels, mask):
    return
  ln = np.asarray(labels)
  if mask is not None:
    ln = ln[np.asarray(mask)]
  if ln.size and (ln.min() < 0 or ln.max() >= num_classes):
    raise ValueError(
        f"{name} must lie in [0, {num_classes}); got values in "
        f"[{int(ln.min())}, {int(ln.max())}].")


def check_probabilities(name: str, probs: Array, mask: Optional[Array] = None,
                        atol: float = 1e-3) -> None:
  """Eager-only check that rows are probability vectors (>= 0, sum to one)."""
  if is_traced(probs, mask):
    return
  p = np.asarray(probs, dtype=np.float64)
  if mask is not None:
    p = p[np.asarray(mask)]
  if p.size == 0:
    raise ValueError(f"{name} is empty (no valid row after masking).")
  if not np.all(np.isfinite(p)):
    raise ValueError(f"{name} contains NaN or inf.")
  if p.min() < -atol:
    raise ValueError(f"{name} has negative entries (min {p.min():.3g}); pass probabilities, not logits.")
  sums = p.sum(axis=-1)
  worst = float(np.max(np.abs(sums - 1.0)))
  if worst > atol:
    raise ValueError(
        f"{name} rows must sum to one (worst row sums to {sums[np.argmax(np.abs(sums - 1.0))]:.6g}); "
        "pass softmax probabilities, not logits.")


def poison(value: Array, *inputs_and_masks: tuple[Array, Array]) -> Array:
  """Returns NaN where any (values, mask) pair has a non-finite valid entry or
  no valid entry; ``value`` otherwise. Keeps jitted metrics from returning a
  finite wrong number on bad input."""
  ok = jnp.array(True)
  for x, m in inputs_and_masks:
    finite = jnp.all(jnp.where(m, jnp.isfinite(x), True))
    ok = ok & finite & jnp.any(m)
  return jnp.where(ok, value, jnp.nan)


# --- Helpers for (N, K) scores and integer labels (calibration, classification,
# temperature). Eager checks raise; the ``*_ok`` functions are traced checks
# that feed ``jnp.where(ok, value, nan)``.

PROB_ATOL = 1e-3  # Row-sum tolerance of the traced checks; check_probabilities' default.


def check_choice(name: str, value, choices) -> None:
  """Raises ValueError unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_positive_int(name: str, value) -> int:
  """Returns ``value`` as int, or raises unless it is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def at_least_f32(x: Array) -> Array:
  """Casts integer, bool, bfloat16 and float16 arrays to float32 (metrics
  accumulate sums, which half precision cannot hold); keeps float32/64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def as_2d(name: str, x) -> Array:
  """Converts to a (N, K) array of float32 or wider with K >= 1, or raises."""
  x = jnp.asarray(x)
  if x.ndim != 2 or x.shape[1] < 1:
    raise ValueError(
        f"{name} must be 2-D (examples, classes) with at least one class, got shape "
        f"{tuple(x.shape)}.")
  return at_least_f32(x)


def as_labels(name: str, labels, num_examples: int) -> Array:
  """Converts to a 1-D integer array of length ``num_examples``, or raises."""
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != num_examples:
    raise ValueError(
        f"{name} must have shape ({num_examples},) to match the predictions, "
        f"got {tuple(labels.shape)}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{name} must be integers, got dtype {labels.dtype}.")
  return labels


def rows_mask(mask, n: int) -> Array:
  """Boolean (n,) row mask; ``None`` means all rows are valid."""
  return mask_or_ones("mask", mask, (n,))


def check_finite_rows(name: str, x: Array, mask: Array) -> None:
  """Eager-only check of a (N, K) array: some valid row, no NaN/inf in them."""
  check_scores(name, x, jnp.broadcast_to(mask[:, None], x.shape))


def labels_ok(labels: Array, num_classes: int, mask: Array) -> Array:
  """Traced check: every valid label lies in [0, num_classes)."""
  inside = (labels >= 0) & (labels < num_classes)
  return jnp.all(jnp.where(mask, inside, True))


def prob_rows_ok(probs: Array) -> Array:
  """Traced per-row check: finite, >= -PROB_ATOL, sums to one within PROB_ATOL."""
  finite = jnp.all(jnp.isfinite(probs), axis=-1)
  nonneg = jnp.all(probs >= -PROB_ATOL, axis=-1)
  total = jnp.sum(jnp.where(finite[:, None], probs, 0.0), axis=-1)
  return finite & nonneg & (jnp.abs(total - 1.0) <= PROB_ATOL)


def probs_ok(probs: Array, mask: Array) -> Array:
  """Traced check: some valid row, and every valid row is a probability vector."""
  return jnp.any(mask) & jnp.all(jnp.where(mask, prob_rows_ok(probs), True))


def masked_mean(values: Array, mask: Array, weights: Array | None = None, *,
                empty: float = float("nan")) -> Array:
  """Mean of ``values`` over the entries where ``mask`` is true, optionally
  weighted; ``empty`` when there is none (NaN for metrics; loss terms pass 0).
  Masked entries never contribute, even when they hold NaN or inf."""
  w = mask.astype(jnp.float32) if weights is None else jnp.where(mask, weights, 0.0)
  total = jnp.sum(jnp.where(mask, values * w, 0.0))
  n = jnp.sum(w)
  return jnp.where(n > 0, total / jnp.where(n > 0, n, 1.0), empty)
