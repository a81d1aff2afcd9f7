"""ArcFace: additive angular margin loss (Deng, Guo, Xue, Zafeiriou, CVPR 2019).

Features ``f`` and class weights ``W[:, j]`` are L2-normalised, so their
product is ``cos θ_j``; the true class gets an additive angular margin ``m``
and every logit is scaled by ``s``::

    logit_j = s · cos(θ_y + m)   (j = y)        logit_j = s · cos θ_j   (j ≠ y)

and the loss is the softmax cross-entropy of these logits. Paper defaults
``s = 64``, ``m = 0.5``.

Reference followed: insightface's ``ArcMarginProduct`` (``recognition/
arcface_torch/losses.py``, the pre-2022 ``ArcFace`` there, and
ronghuaiyang/arcface-pytorch ``models/metrics.py``) with ``easy_margin=False``:
``cos(θ + m) = cos θ cos m − sin θ sin m`` with ``sin θ = sqrt(1 − cos²θ)``;
when ``θ + m > π`` (``cos θ ≤ th = cos(π − m)``) the target logit falls back
to ``cos θ − mm`` with ``mm = sin(π − m) · m``, which keeps the target logit
decreasing in θ. ``easy_margin=True`` applies the margin only where
``cos θ > 0``.

Departures: ``sin θ = sqrt(max(1 − cos²θ, 1e-9))`` instead of clamping at 0,
so the gradient stays finite at ``cos θ = ±1`` (the reference's is infinite
there); ``cos θ`` is clipped to ``[-1, 1]``. Rows whose label is ``-1`` get
no margin and do not count in the loss (as arcface_torch's ``labels != -1``).

Config::

    config.model.heads = {'arcface': 'arcface(features=K)'}      # W: heads/arcface/kernel [D, K]
    config.losses.arcface = dict(s=64.0, m=0.5)                   # ArcFace on the features

The ``arcface`` head is a normalised linear layer (no bias): its output
``head:arcface`` is ``cos θ`` (``[B, K]``), which evaluation can read as
logits; the ``arcface`` loss term reads the head's kernel and the module's
penultimate ``features`` and applies :func:`arcface_loss`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxrobust.losses import LOSSES, LossInputs, masked_mean
from jaxrobust.models.heads import HEADS, PREFIX
from jaxrobust.registry import RegistryError

Array = jax.Array
SCALE = 64.0  # paper default s
MARGIN = 0.5  # paper default m
NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps
SIN_EPS = 1e-9


def check_scale_margin(s: float, m: float, where: str = "arcface") -> None:
  """``s > 0`` and ``0 <= m < π`` or a :class:`~jaxrobust.registry.RegistryError` naming the key."""
  if not isinstance(s, (int, float)) or isinstance(s, bool) or not s > 0:
    raise RegistryError(f"{where}: s (the scale) must be > 0, got {s!r}.")
  if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0 <= m < math.pi:
    raise RegistryError(f"{where}: m (the angular margin, radians) must be in [0, π), got {m!r}.")


def l2_normalize(x: Array, axis: int = -1) -> Array:
  """``x / max(‖x‖, 1e-12)`` along ``axis`` (``F.normalize``)."""
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norm, NORM_EPS)


def cosine(features: Array, weights: Array) -> Array:
  """``cos θ`` ``[B, K]`` of features ``[B, D]`` and class weights ``[D, K]``."""
  f = l2_normalize(features.astype(jnp.float32), axis=-1)
  w = l2_normalize(weights.astype(jnp.float32), axis=0)
  return jnp.clip(f @ w, -1.0, 1.0)


def margin_logits(cos: Array, labels: Array, *, s: float = SCALE, m: float = MARGIN,
                  easy_margin: bool = False) -> Array:
  """ArcFace logits from ``cos θ`` ``[B, K]`` and int labels ``[B]`` (``-1``: no margin)."""
  check_scale_margin(s, m)
  cos_m, sin_m = math.cos(m), math.sin(m)
  th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
  sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, SIN_EPS))
  phi = cos * cos_m - sin * sin_m  # cos(θ + m)
  if easy_margin:
    phi = jnp.where(cos > 0, phi, cos)
  else:
    phi = jnp.where(cos > th, phi, cos - mm)
  k = cos.shape[-1]
  target = jax.nn.one_hot(labels, k, dtype=bool)  # a -1 label gives an all-False row
  return s * jnp.where(target, phi, cos)


def arcface_logits(features: Array, weights: Array, labels: Array, *, s: float = SCALE,
                   m: float = MARGIN, easy_margin: bool = False) -> Array:
  """``[B, K]`` logits whose softmax cross-entropy is the ArcFace loss.

  Args:
    features: ``[B, D]`` embeddings (normalised here).
    weights: ``[D, K]`` class weights (each column normalised here).
    labels: ``[B]`` int classes; ``-1`` rows get no margin.
    s: scale (> 0); m: additive angular margin in radians (>= 0).
    easy_margin: the reference's ``easy_margin`` (margin only where cos θ > 0).
  """
  return margin_logits(cosine(features, weights), labels, s=s, m=m, easy_margin=easy_margin)


def arcface_loss(features: Array, weights: Array, labels: Array, mask: Array | None = None, *,
                 s: float = SCALE, m: float = MARGIN, easy_margin: bool = False) -> Array:
  """Mean ArcFace cross-entropy over valid rows (``mask`` and ``label >= 0``)."""
  labels = jnp.asarray(labels)
  logits = arcface_logits(features, weights, labels, s=s, m=m, easy_margin=easy_margin)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  valid = labels >= 0 if mask is None else jnp.asarray(mask, bool) & (labels >= 0)
  return masked_mean(per_example, valid)


# --- head -------------------------------------------------------------------------------


class NormLinearHead(nn.Module):
  """The ``arcface`` head: ``cos θ = f̂ · Ŵ`` with a bias-free kernel ``[D, K]``
  (Xavier-uniform init, as arcface-pytorch's ``ArcMarginProduct.weight``)."""
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    del train
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (x.shape[-1], self.features),
                        jnp.float32)
    return cosine(x, kernel)


@HEADS.register("arcface")
def arcface_head(features: int) -> dict[str, Any]:
  """A normalised linear layer to ``features`` classes (ArcFace's class weights)."""
  if isinstance(features, bool) or int(features) != features or features < 1:
    raise RegistryError(f"features must be a positive integer, got {features!r}.")
  return {"cls": NormLinearHead, "features": int(features)}


# --- loss term --------------------------------------------------------------------------


def _check_term(options: dict[str, Any], num_classes: int | None) -> None:
  del num_classes
  check_scale_margin(options.get("s", SCALE), options.get("m", MARGIN), "arcface")


def head_kernel(inputs: LossInputs, head: str, key: str = "arcface") -> Array:
  """The kernel ``[D, K]`` of extra head ``head`` of the trained module."""
  heads = inputs.params.get(PREFIX, {}) if hasattr(inputs.params, "get") else {}
  if head not in heads or "kernel" not in heads[head]:
    raise RegistryError(
        f"config.losses.{key}.arcface_head={head!r}: module {inputs.module!r} has no such head "
        f"with a kernel (its heads: {sorted(heads)}); add config.model.heads."
        f"{head}='arcface(features=K)'.")
  return heads[head]["kernel"]


@LOSSES.register("arcface", info={"check": _check_term})
def arcface(inputs: LossInputs, *, stream: str = "train", s: float = SCALE, m: float = MARGIN,
            easy_margin: bool = False, arcface_head: str = "arcface"
            ) -> tuple[Array, dict[str, Array]]:
  """ArcFace loss of the stream's penultimate ``features`` with the class
  weights of the extra head ``arcface_head`` (``config.model.heads``)."""
  weights = head_kernel(inputs, arcface_head)
  batch = inputs.batch[stream]
  features, labels = inputs.outputs[stream]["features"], batch["label"]
  logits = arcface_logits(features, weights, labels, s=s, m=m, easy_margin=easy_margin)
  valid = batch["mask"] & (labels >= 0)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  loss = masked_mean(per_example, valid)
  cos = cosine(features, weights)
  acc = masked_mean((jnp.argmax(cos, -1) == labels).astype(jnp.float32), valid)
  return loss, {f"{stream}/arcface_accuracy": acc}
