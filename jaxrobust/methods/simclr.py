"""SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020): contrastive
self-supervised pre-training, as an initialisation for Zoph et al. (2020)'s
comparison of pre-training and self-training.

Two augmented views of every image go through the trunk and a projection head
``g`` (``config.model.heads.proj``, e.g. ``mlp(features=128, layers=2)``:
Dense-ReLU-Dense, SimCLR v1); the NT-Xent loss makes each view pick its
partner among the other ``2N - 2`` views of the (global) batch at temperature
τ. Fine-tuning drops the projection head (``init_from.skip='heads/.*'``) and
trains a new classifier ``head`` on the trunk's features.

Reference: ``google-research/simclr`` (``objective.py``,
``add_contrastive_loss``; ``data_util.py``). Conventions followed:

* ℓ2-normalised projections; similarities ``z_i · z_j / τ``; self-similarity
  masked out; for view 1 the cross-entropy over ``[z1·z2ᵀ, z1·z1ᵀ]`` with the
  partner as target, the same for view 2, and the loss is **the sum of the two
  means** (``loss_a + loss_b``), as the reference returns it;
* negatives from the **whole global batch**: under the global-view jit the
  step's batch is global, so the similarity matrix spans every device (XLA
  gathers); the pmap form gathers the projections over the device axis
  (``jax.lax.all_gather``), as the reference's ``tpu_cross_replica_concat``;
* BatchNorm statistics over the global batch (the reference's global BN);
* LARS (``config.optimizer.name='lars'``), lr 0.3 × B / 256, weight decay
  1e-6 excluding biases and BatchNorm, temperature 0.5 for CIFAR (0.1 for
  ImageNet at large batch), batch 512–4096 in the paper.

Augmentations (registered pp ops; pixel space, per-example keys):
``random_resized_crop(scale_min=0.08, scale_max=1, ratio_min=3/4,
ratio_max=4/3)`` (Inception crop, bilinear resize back to the input size),
``color_jitter(strength=0.5, p=0.8)`` (brightness, contrast, saturation,
hue with SimCLR's 0.8s/0.8s/0.8s/0.2s ranges; saturation and hue only on RGB),
``random_grayscale(p=0.2)``; preset ``simclr`` =
``random_resized_crop|flip|color_jitter(0.5)|random_grayscale``
(CIFAR: SimCLR drops the blur for 32×32 images). Departures: the jitter
ops run in a fixed order (brightness, contrast, saturation, hue) where the
reference shuffles them per image; character datasets use the preset
``simclr_gray`` (no flip, no colour ops but brightness/contrast).
"""

from __future__ import annotations

from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp

from jaxrobust.config import merge
from jaxrobust.data import pp
from jaxrobust.losses import LOSSES, LossInputs, masked_mean
from jaxrobust.registry import RegistryError

Array = jax.Array
LARGE = 1e9
TEMPERATURE = 0.5  # SimCLR's CIFAR-10 setting
PROJECTION = "mlp(features=128, layers=2)"  # SimCLR v1 projection head

pp.PRESETS["simclr"] = "random_resized_crop|flip|color_jitter(0.5)|random_grayscale"
pp.PRESETS["simclr_gray"] = "random_resized_crop(0.2)|color_jitter(0.5)"


# --- the loss ----------------------------------------------------------------------

def nt_xent(z: Array, *, temperature: float = TEMPERATURE, mask: Array | None = None,
            axis_name: str | None = None) -> Array:
  """SimCLR's NT-Xent loss of two views.

  Args:
    z: ``[2, N, D]`` projections, view-major (row ``i`` of each view is the
      same image).
    temperature: τ > 0.
    mask: ``[N]`` validity; padded images are neither anchors nor negatives.
    axis_name: inside ``pmap``: the device axis to gather negatives over.

  Returns:
    ``mean_i ℓ(view 1 of i) + mean_i ℓ(view 2 of i)`` over valid ``i``.
  """
  if z.ndim != 3 or z.shape[0] != 2:
    raise RegistryError(f"nt_xent needs two views [2, N, D], got shape {z.shape}.")
  n = z.shape[1]
  mask = jnp.ones(n, bool) if mask is None else mask.astype(bool)
  z = z.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  a, b = z[0], z[1]
  a_all, b_all, m_all, offset = a, b, mask, 0
  if axis_name is not None:
    a_all = jax.lax.all_gather(a, axis_name, tiled=True)
    b_all = jax.lax.all_gather(b, axis_name, tiled=True)
    m_all = jax.lax.all_gather(mask, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  rows = jnp.arange(n) + offset
  self_mask = jnp.arange(a_all.shape[0])[None, :] == rows[:, None]
  invalid = ~m_all[None, :]

  def side(x, same, other):
    pos = x @ other.T / temperature
    neg = jnp.where(self_mask | invalid, -LARGE, x @ same.T / temperature)
    pos = jnp.where(invalid, -LARGE, pos)
    logits = jnp.concatenate([pos, neg], axis=1)
    target = jnp.take_along_axis(pos, rows[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - target

  return (masked_mean(side(a, a_all, b_all), mask) + masked_mean(side(b, b_all, a_all), mask))


def _check(options: dict[str, Any], num_classes: int | None) -> None:
  del num_classes
  if not options.get("temperature", TEMPERATURE) > 0:
    raise RegistryError(f"temperature must be > 0, got {options['temperature']!r}.")


@LOSSES.register("nt_xent", info={"check": _check})
def nt_xent_term(inputs: LossInputs, *, stream: str = "train",
                 temperature: float = TEMPERATURE) -> tuple[Array, dict[str, Array]]:
  """NT-Xent on a two-view stream's outputs -- give the term ``head='proj'`` to
  use the projection head. Metric: how often a view's most similar other view
  is its partner (``<stream>/contrastive_accuracy``)."""
  if inputs.views.get(stream, 1) != 2:
    raise RegistryError(f"nt_xent: stream {stream!r} needs views=2 (config.streams.{stream}."
                        f"views), it has {inputs.views.get(stream, 1)}.")
  z = inputs.view(stream)
  mask = inputs.batch[stream]["mask"]
  loss = nt_xent(z, temperature=temperature, mask=mask, axis_name=inputs.axis_name)
  zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  sim = zn[0] @ jnp.concatenate([zn[1], zn[0]]).T
  n = z.shape[1]
  sim = jnp.where(jnp.arange(2 * n)[None, :] == jnp.arange(n)[:, None] + n, -LARGE, sim)
  sim = jnp.where(jnp.concatenate([mask, mask])[None, :], sim, -LARGE)
  acc = masked_mean((sim.argmax(1) == jnp.arange(n)).astype(jnp.float32), mask)
  return loss, {f"{stream}/contrastive_accuracy": acc}


# --- augmentations -------------------------------------------------------------------

def _keys(rng: Array, images: Array) -> Array:
  return jax.random.split(rng, images.shape[0])


def _crop_resize(image: Array, key: Array, scale: tuple[float, float],
                 ratio: tuple[float, float]) -> Array:
  """One Inception-style crop: area fraction ~ U(scale), log aspect ratio ~
  U(log ratio), clipped to the image, resized back (bilinear)."""
  h, w = image.shape[:2]
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * h * w
  log_r = jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  r = jnp.exp(log_r)
  ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
  cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
  y0 = jax.random.uniform(k_y, ()) * (h - ch)
  x0 = jax.random.uniform(k_x, ()) * (w - cw)
  s = jnp.stack([h / ch, w / cw])
  t = jnp.stack([-y0 * h / ch, -x0 * w / cw])
  return jax.image.scale_and_translate(image, image.shape, (0, 1), s, t, method="linear",
                                       antialias=True)


@pp.OPS.register("random_resized_crop")
def random_resized_crop(rng: Array, images: Array, scale_min: float = 0.08,
                        scale_max: float = 1.0, ratio_min: float = 3 / 4,
                        ratio_max: float = 4 / 3) -> Array:
  """torchvision's ``RandomResizedCrop`` on device: a random crop of area
  fraction in ``[scale_min, scale_max]`` and aspect ratio in ``[ratio_min,
  ratio_max]`` (log-uniform), resized back to the input size (bilinear,
  antialiased). Departure: a box that does not fit is clipped to the image,
  where torchvision retries 10 times then falls back to a centre crop."""
  if not 0 < scale_min <= scale_max <= 1 or not 0 < ratio_min <= ratio_max:
    raise RegistryError(f"random_resized_crop: need 0 < scale_min <= scale_max <= 1 and 0 < "
                        f"ratio_min <= ratio_max, got ({scale_min}, {scale_max}), "
                        f"({ratio_min}, {ratio_max}).")
  out = jax.vmap(lambda im, k: _crop_resize(im, k, (scale_min, scale_max),
                                            (ratio_min, ratio_max)))(images, _keys(rng, images))
  return jnp.clip(out, 0.0, 1.0)


def _jitter_one(image: Array, key: Array, strength: float, p: float) -> Array:
  k_apply, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
  s = strength
  x = image
  b = jax.random.uniform(k_b, (), minval=max(0.0, 1 - 0.8 * s), maxval=1 + 0.8 * s)
  x = x * b
  c = jax.random.uniform(k_c, (), minval=max(0.0, 1 - 0.8 * s), maxval=1 + 0.8 * s)
  gray_mean = (pix.rgb_to_grayscale(x) if x.shape[-1] == 3 else x).mean()
  x = (x - gray_mean) * c + gray_mean
  if x.shape[-1] == 3:
    sat = jax.random.uniform(k_s, (), minval=max(0.0, 1 - 0.8 * s), maxval=1 + 0.8 * s)
    x = pix.adjust_saturation(jnp.clip(x, 0, 1), sat)
    x = pix.adjust_hue(x, jax.random.uniform(k_h, (), minval=-0.2 * s, maxval=0.2 * s))
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.where(jax.random.uniform(k_apply) < p, x, image)


@pp.OPS.register("color_jitter")
def color_jitter(rng: Array, images: Array, strength: float = 0.5, p: float = 0.8) -> Array:
  """SimCLR's colour distortion with probability ``p``: brightness and
  contrast factors in ``[1 - 0.8s, 1 + 0.8s]``, saturation likewise and a hue
  shift in ``[-0.2s, 0.2s]`` (RGB only)."""
  if strength < 0 or not 0 <= p <= 1:
    raise RegistryError(f"color_jitter: need strength >= 0 and p in [0, 1], got {strength}, {p}.")
  return jax.vmap(lambda im, k: _jitter_one(im, k, strength, p))(images, _keys(rng, images))


@pp.OPS.register("random_grayscale")
def random_grayscale(rng: Array, images: Array, p: float = 0.2) -> Array:
  """Converts an RGB image to gray (kept 3-channel) with probability ``p``;
  single-channel images are returned unchanged."""
  if not 0 <= p <= 1:
    raise RegistryError(f"random_grayscale: p must be in [0, 1], got {p}.")
  if images.shape[-1] != 3:
    return images
  gray = jnp.repeat(pix.rgb_to_grayscale(images), 3, axis=-1)
  pick = jax.random.uniform(rng, (images.shape[0], 1, 1, 1)) < p
  return jnp.where(pick, gray, images)


# --- config -----------------------------------------------------------------------------

def pretrain(overrides: dict[str, Any], *, stream: dict[str, Any] | None = None,
             temperature: float = TEMPERATURE, projection: str = PROJECTION,
             pp_chain: str = "simclr") -> dict[str, Any]:
  """A SimCLR pre-training stage's overrides: the ``train`` stream with two
  views of ``pp_chain`` and no labels, the projection head ``proj``, and
  NT-Xent as the only loss term (the classifier ``head`` gets no gradient)."""
  out = merge(overrides, {
      "streams": {"train": {"views": 2, "pp": pp_chain, "labels": "unlabeled", **(stream or {})}},
      "model": {"heads": {"proj": projection}}})
  out["losses"] = {"cross_entropy": None,  # removed: no labels
                   "nt_xent": {"stream": "train", "temperature": temperature, "head": "proj"}}
  return out


def fine_tune_skip() -> str:
  """``init_from.skip`` for a SimCLR checkpoint: its projection head."""
  return "heads/.*"
