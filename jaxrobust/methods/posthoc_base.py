"""Shared pieces of the post-hoc OOD detectors (:mod:`jaxrobust.methods.posthoc`).

* the linear head: ``logits = features @ kernel + bias`` with ``kernel``
  ``[D, K]`` (flax's ``Dense`` layout, the transpose of PyTorch's ``weight``)
  and ``bias`` ``[K]``, checked against the features;
* :class:`FitSource`: what a detector's fit reads -- streamed sums over the
  training features (:meth:`FitSource.reduce`, as
  :func:`jaxrobust.methods.mahalanobis.fit_streaming`) or, for the detectors
  that keep a bank or take a percentile of every activation, the training
  features themselves (:meth:`FitSource.features`). :class:`ArraySource` reads
  arrays in memory, :class:`EvalSource` the task's training split through a
  :class:`jaxrobust.evaluators.FitContext`;
* option checks that name the option.

A training row takes part in a fit when its ``mask`` is true and its label is
``>= 0`` (pytorch-ood's ``is_known``: negative labels mark outliers).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.registry import RegistryError

Array = jax.Array
ReduceFn = Callable[[Mapping[str, Array], Array, Array, Any], Mapping[str, Array]]


# --- the head ------------------------------------------------------------------------

def as_float(x: Any) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_head(features_shape: tuple[int, ...], kernel: Any, bias: Any, where: str) -> None:
  """Raises unless ``kernel`` is ``[D, K]`` for features ``[..., D]`` and ``bias`` ``[K]``."""
  ks, bs = tuple(np.shape(kernel)), tuple(np.shape(bias))
  if len(features_shape) != 2:
    raise ValueError(f"{where}: features must be [batch, dim]; got shape {features_shape}.")
  if len(ks) != 2 or ks[0] != features_shape[-1]:
    raise ValueError(f"{where}: the head's kernel has shape {ks}; features of dimension "
                     f"{features_shape[-1]} need a kernel [{features_shape[-1]}, classes] "
                     "(logits = features @ kernel + bias).")
  if bs != (ks[1],):
    raise ValueError(f"{where}: the head's bias has shape {bs}; the kernel {ks} needs a bias "
                     f"of shape ({ks[1]},).")


def logits_of(features: Array, kernel: Array, bias: Array) -> Array:
  return as_float(features) @ as_float(kernel) + as_float(bias)


def energy(logits: Array) -> Array:
  """``logsumexp`` over classes (the negative free energy at T = 1)."""
  return jax.nn.logsumexp(logits, axis=-1)


def head_params(variables: Any, where: str) -> dict[str, Array]:
  """``{'kernel', 'bias'}`` of the classifier's ``head`` Dense layer from a
  module's variables (``params/head``; zeros when it has no bias)."""
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  head = params.get("head") if hasattr(params, "get") else None
  kernel = head.get("kernel") if hasattr(head, "get") else None
  if kernel is None or np.ndim(kernel) != 2:
    raise RegistryError(f"{where}: post-hoc detectors need the classifier's linear head "
                        "(params['head']['kernel'] [D, K]); this module has none.")
  bias = head.get("bias")
  kernel = jnp.asarray(kernel, jnp.float32)
  bias = jnp.zeros(kernel.shape[1], jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
  return {"kernel": kernel, "bias": bias}


# --- option checks -------------------------------------------------------------------

def _concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_percentile(percentile: float, where: str) -> None:
  if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not (
      0 < percentile < 100):
    raise RegistryError(f"{where}: percentile must be in (0, 100) (a percent, as the "
                        f"reference's), got {percentile!r}.")


def check_sparsity(sparsity: float, where: str) -> None:
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
      0 <= sparsity < 1):
    raise RegistryError(f"{where}: sparsity must be in [0, 1), got {sparsity!r}.")


def check_positive_int(value: Any, option: str, where: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise RegistryError(f"{where}: {option} must be a positive integer, got {value!r}.")


def check_k(k: Any, bank: int, where: str) -> None:
  check_positive_int(k, "k", where)
  if k > bank:
    raise RegistryError(f"{where}: k={k} is larger than the training bank ({bank} features).")


def check_dim(dim: Any, features: int, where: str) -> int:
  """The principal subspace dimension (None: ``features // 2``), checked."""
  if dim is None:
    dim = max(1, features // 2)
  check_positive_int(dim, "dim", where)
  if dim >= features:
    raise RegistryError(f"{where}: dim={dim} (the principal subspace) must be smaller than the "
                        f"feature dimension {features}.")
  return int(dim)


# --- fit sources ---------------------------------------------------------------------

def valid_rows(labels: Array, mask: Array) -> Array:
  return (mask & (labels >= 0)).astype(jnp.float32)


class FitSource:
  """What a fit reads (see the module docstring). ``where`` prefixes errors."""
  where: str = "posthoc.fit"

  def reduce(self, fn: ReduceFn, key: str, args: Any = None) -> dict[str, np.ndarray]:
    """``fn(outputs, labels, mask, args) -> {name: array}`` per batch, summed
    over the training rows in float64 on the host (``outputs['features']``)."""
    raise NotImplementedError

  def features(self) -> np.ndarray:
    """The training features ``[N, D]`` (float32) of the valid rows."""
    raise NotImplementedError

  def empty(self, count: float) -> None:
    if count <= 0:
      raise RegistryError(f"{self.where}: fit on an empty set (no training row with mask true "
                          "and label >= 0).")


_REDUCE_CACHE: dict[Any, Callable] = {}


def _compiled_reduce(fn: ReduceFn) -> Callable:
  """One jitted ``(features, labels, mask, args)`` wrapper per reduce function."""
  if fn not in _REDUCE_CACHE:
    _REDUCE_CACHE[fn] = jax.jit(lambda f, y, m, a: fn({"features": f}, y, m, a))
  return _REDUCE_CACHE[fn]


class ArraySource(FitSource):
  """Features ``[N, D]``, labels ``[N]`` (None: all 0) and ``mask`` ``[N]`` in
  memory, reduced in padded chunks of ``chunk`` rows (one compilation)."""

  def __init__(self, features: Any, labels: Any = None, mask: Any = None, *,
               chunk: int = 8192, where: str = "posthoc.fit"):
    self.x = np.asarray(features)
    if self.x.ndim != 2:
      raise ValueError(f"{where}: features must be [N, dim]; got shape {self.x.shape}.")
    n = len(self.x)
    self.y = np.zeros(n, np.int32) if labels is None else np.asarray(labels).astype(np.int32)
    self.m = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    if self.y.shape != (n,) or self.m.shape != (n,):
      raise ValueError(f"{where}: labels and mask must be [{n}]; got {self.y.shape} and "
                       f"{self.m.shape}.")
    self.chunk, self.where = int(max(1, min(chunk, n))), where

  def reduce(self, fn: ReduceFn, key: str, args: Any = None) -> dict[str, np.ndarray]:
    del key
    compiled = _compiled_reduce(fn)
    total: dict[str, np.ndarray] = {}
    n, c = len(self.x), self.chunk
    for start in range(0, max(n, 1), c):
      idx = np.arange(start, start + c)
      keep = idx < n
      idx = np.where(keep, idx, 0)
      if n == 0:
        break
      out = compiled(self.x[idx], self.y[idx], self.m[idx] & keep, args)
      for k, v in out.items():
        v = np.asarray(v, np.float64)
        total[k] = total[k] + v if k in total else v
    return total

  def features(self) -> np.ndarray:
    return self.x[self.m & (self.y >= 0)].astype(np.float32)


class EvalSource(FitSource):
  """The task's training split through a :class:`~jaxrobust.evaluators.FitContext`."""

  def __init__(self, ctx: Any):
    self.ctx, self.where = ctx, ctx.where

  def reduce(self, fn: ReduceFn, key: str, args: Any = None) -> dict[str, np.ndarray]:
    return self.ctx.reduce(self.ctx.train_source(), fn, key=key, args=args)

  def features(self) -> np.ndarray:
    out = self.ctx.predict(self.ctx.train_source(), ("features", "label"))
    return np.asarray(out["features"][out["label"] >= 0], np.float32)
