"""Post-hoc detectors that reshape activations or read the softmax: ReAct,
ASH-P/B/S, SCALE, DICE, GradNorm, GEN, KL-matching.

Every score is a pure, jittable function of the penultimate features ``[B, D]``
and the linear head (``logits = features @ kernel + bias``; ``kernel`` ``[D,
K]``), higher = in-distribution. Reference code followed, file by file
(OpenOOD v1.5 at 3c35632, ``openood/postprocessors/`` and ``openood/networks/``;
pytorch-ood 0.4, ``pytorch_ood/detector/``):

* ReAct (Sun et al. 2021) -- ``react_postprocessor.py``: threshold =
  ``np.percentile`` (linear interpolation) of every training activation,
  ``percentile`` = 90; features clipped above it; energy of the logits. The
  reference takes the percentile over its ID *validation* loader; here over
  the training rows the fit is given (the paper's choice).
* ASH-P/B/S (Djurisic et al. 2023) -- ``networks/ash_net.py``: per example keep
  the ``k = D - round(D · percentile / 100)`` largest activations
  (``np.round``, half to even); P zeroes the rest, B sets every kept one to
  ``sum(x) / k``, S multiplies the pruned vector by ``exp(sum(x) / sum(kept))``;
  then energy. Ties at the cut keep the lower feature index (``lax.top_k``;
  ``torch.topk`` leaves the choice open) -- it matters for ASH-B only.
* SCALE (Xu et al. 2024) -- ``networks/scale_net.py``: the unpruned features
  times ASH-S's factor ``exp(sum(x) / sum(top k))``; then energy.
  ``percentile`` defaults to 65 for ASH and SCALE: the references' CIFAR value
  (OpenOOD's configs hold its ImageNet values, 90 for ASH and 85 for SCALE).
  Departure: a zero denominator (every kept activation 0) leaves the example
  unscaled where the reference gives NaN.
* DICE (Sun & Li 2022) -- ``dice_postprocessor.py``: contributions
  ``mean_train_feature[:, None] * kernel``; weights whose contribution is not
  above ``np.percentile(contrib, 100 · sparsity)`` are zeroed (``sparsity`` =
  0.9, the reference's ``p`` = 90); energy of the sparsified head. The mean is
  streamed.
* GradNorm (Huang et al. 2021) -- ``gradnorm_postprocessor.py``: the L1 norm of
  the gradient w.r.t. the head's *kernel* of ``-Σ_k log softmax_k`` (the
  reference's all-ones targets), in closed form ``‖f‖₁ · Σ_k |K·p_k − 1|``.
  No fit.
* GEN (Liu et al. 2023) -- ``gen_postprocessor.py``: ``−Σ_{top_m} p^γ (1 −
  p)^γ`` over the ``top_m`` largest probabilities (``gamma`` = 0.1, ``top_m``
  = 100, as OpenOOD's config; ``min(top_m, K)``). No fit.
* KL-matching (Hendrycks et al. 2022) -- ``kl_matching_postprocessor.py``:
  templates ``d_k`` = mean softmax of the fit rows predicted ``k`` (a class
  never predicted gets the one-hot ``e_k``), each normalised to sum 1 as
  ``scipy.stats.entropy`` does; score ``−min_k KL(p ‖ d_k)`` (``+inf`` KL where
  ``d_k`` is 0 and ``p`` is not). The reference fits on ID validation data;
  here on whatever rows the fit gets (the training split in the evaluator).
  Streamed.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.methods.posthoc_base import (
    FitSource, as_float, check_percentile, energy, logits_of, valid_rows)
from jaxrobust.registry import RegistryError

Array = jax.Array


# --- ReAct ---------------------------------------------------------------------------

def react_fit(source: FitSource, kernel: Array, bias: Array, *, percentile: float = 90.0
              ) -> dict[str, np.ndarray]:
  check_percentile(percentile, source.where)
  f = source.features()
  source.empty(len(f))
  return {"threshold": np.asarray(np.percentile(f.reshape(-1), percentile), np.float32)}


def react_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array, *,
                percentile: float = 90.0) -> Array:
  del percentile  # in the fitted threshold
  clipped = jnp.minimum(as_float(features), as_float(state["threshold"]))
  return energy(logits_of(clipped, kernel, bias))


# --- ASH and SCALE -------------------------------------------------------------------

def kept(dim: int, percentile: float, where: str) -> int:
  """How many activations ASH/SCALE keep of ``dim``: ``dim - round(dim · p/100)``."""
  check_percentile(percentile, where)
  k = dim - int(np.round(dim * percentile / 100.0))
  if k < 1:
    raise RegistryError(f"{where}: percentile={percentile} prunes all {dim} activations; lower "
                        "it.")
  return k


def _top(f: Array, k: int) -> tuple[Array, Array]:
  return jax.lax.top_k(f, k)


def _scatter(f: Array, values: Array, index: Array) -> Array:
  rows = jnp.arange(f.shape[0])[:, None]
  return jnp.zeros_like(f).at[rows, index].set(values)


def _ratio(s1: Array, s2: Array) -> Array:
  return jnp.where(s2 != 0, s1 / jnp.where(s2 != 0, s2, 1.0), 0.0)


def ash(features: Array, variant: str, percentile: float = 65.0) -> Array:
  """ASH-``variant`` (``'p'``, ``'b'`` or ``'s'``) shaped features ``[B, D]``."""
  f = as_float(features)
  k = kept(f.shape[-1], percentile, f"ash_{variant}")
  values, index = _top(f, k)
  s1 = f.sum(-1)
  if variant == "p":
    return _scatter(f, values, index)
  if variant == "b":
    return _scatter(f, jnp.broadcast_to((s1 / k)[:, None], values.shape), index)
  if variant == "s":
    pruned = _scatter(f, values, index)
    return pruned * jnp.exp(_ratio(s1, pruned.sum(-1)))[:, None]
  raise ValueError(f"ASH variant must be 'p', 'b' or 's', got {variant!r}.")


def ash_score(variant: str):
  def score(features: Array, state: Any, kernel: Array, bias: Array, *,
            percentile: float = 65.0) -> Array:
    del state
    return energy(logits_of(ash(features, variant, percentile), kernel, bias))
  score.__name__ = f"ash_{variant}_score"
  return score


def scale_features(features: Array, percentile: float = 65.0) -> Array:
  f = as_float(features)
  values, _ = _top(f, kept(f.shape[-1], percentile, "scale"))
  return f * jnp.exp(_ratio(f.sum(-1), values.sum(-1)))[:, None]


def scale_score(features: Array, state: Any, kernel: Array, bias: Array, *,
                percentile: float = 65.0) -> Array:
  del state
  return energy(logits_of(scale_features(features, percentile), kernel, bias))


# --- DICE ----------------------------------------------------------------------------

def _feature_sums(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any = None
                  ) -> dict[str, Array]:
  del args
  v = valid_rows(labels, mask)
  return {"sum": v @ as_float(outputs["features"]), "count": v.sum()}


def feature_mean(source: FitSource, key: str) -> np.ndarray:
  """The mean training feature ``[D]`` (streamed; float64)."""
  total = source.reduce(_feature_sums, key=key)
  source.empty(float(total.get("count", 0)))
  return total["sum"] / total["count"]


def dice_fit(source: FitSource, kernel: Array, bias: Array, *, sparsity: float = 0.9
             ) -> dict[str, np.ndarray]:
  mean = feature_mean(source, "posthoc/feature_mean")
  w = np.asarray(kernel, np.float32)
  contrib = mean.astype(np.float32)[:, None] * w
  threshold = np.percentile(contrib, 100.0 * sparsity)
  return {"kernel": np.where(contrib > threshold, w, 0).astype(np.float32),
          "mean": mean.astype(np.float32)}


def dice_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array, *,
               sparsity: float = 0.9) -> Array:
  del kernel, sparsity  # the fitted, sparsified kernel replaces the head's
  return energy(logits_of(features, state["kernel"], bias))


# --- GradNorm, GEN -------------------------------------------------------------------

def gradnorm_score(features: Array, state: Any, kernel: Array, bias: Array) -> Array:
  del state
  f = as_float(features)
  p = jax.nn.softmax(logits_of(f, kernel, bias), -1)
  k = p.shape[-1]
  return jnp.abs(f).sum(-1) * jnp.abs(k * p - 1.0).sum(-1)


def gen_score(features: Array, state: Any, kernel: Array, bias: Array, *, gamma: float = 0.1,
              top_m: int = 100) -> Array:
  del state
  p = jax.nn.softmax(logits_of(features, kernel, bias), -1)
  top, _ = jax.lax.top_k(p, min(int(top_m), p.shape[-1]))
  return -jnp.sum(top ** gamma * (1.0 - top) ** gamma, -1)


# --- KL-matching ---------------------------------------------------------------------

def _predicted_softmax(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any
                       ) -> dict[str, Array]:
  logits = logits_of(outputs["features"], args["kernel"], args["bias"])
  p = jax.nn.softmax(logits, -1)
  onehot = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1])
  onehot = onehot * valid_rows(labels, mask)[:, None]
  return {"sums": onehot.T @ p, "counts": onehot.sum(0)}


def kl_matching_fit(source: FitSource, kernel: Array, bias: Array) -> dict[str, np.ndarray]:
  total = source.reduce(_predicted_softmax, key="posthoc/kl_matching",
                        args={"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)})
  counts = total["counts"]
  source.empty(float(counts.sum()))
  k = len(counts)
  templates = np.where(counts[:, None] > 0, total["sums"] / np.maximum(counts, 1)[:, None],
                       np.eye(k))
  templates = templates / templates.sum(-1, keepdims=True)
  return {"templates": templates.astype(np.float32)}


def kl_matching_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array
                      ) -> Array:
  p = jax.nn.softmax(logits_of(features, kernel, bias), -1)
  d = as_float(state["templates"])
  p_log_p = jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
  log_d = jnp.where(d > 0, jnp.log(jnp.where(d > 0, d, 1.0)), 0.0)
  kl = p_log_p[:, None] - p @ log_d.T
  impossible = ((p > 0).astype(jnp.float32) @ (d <= 0).astype(jnp.float32).T) > 0
  kl = jnp.where(impossible, jnp.inf, kl)
  return -jnp.min(kl, -1)
