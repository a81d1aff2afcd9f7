"""Pixel-space augmentation ops, chained per stream, run on device in the step.

Every op works on a float32 batch ``[B, H, W, C]`` with values in ``[0, 1]``
(pixel space), draws one key per example from the key it is given, and is
jittable, so a chain runs inside the jitted train step on any mesh and is
deterministic for ``fold_in(rng, step)``. Normalisation by the dataset's
mean/std happens later, inside the model call (:mod:`jaxrobust.modules`), so an
attack's ε, ODIN's input step and clipping to ``[0, 1]`` are in pixel units, as
in the reference code.

A stream names its chain as a string of registered ops separated by ``|``::

    streams.train.pp = "pad_crop(4)|flip"     # CIFAR: torchvision RandomCrop(32, 4) + flip
    streams.train.pp = "s1"                   # a preset (Zoph et al.'s Augment-S1)
    streams.train.pp = "randaugment(2, 14, extrapolate=True)|flip"
    streams.train.pp = ""                     # nothing (also "none")

Ops register with ``@OPS.register(name)`` and have the signature
``op(rng, images, *options) -> images``.

Presets ``s1``-``s4`` are the four augmentation strengths of Zoph et al.,
"Rethinking Pre-training and Self-training" (NeurIPS 2020), §3 (defined there
for detection and segmentation), adapted to 32x32 classification:

* ``s1`` = ``pad_crop(4)|flip`` (Augment-S1: flip and crop);
* ``s2`` = ``autoaugment('cifar10')|pad_crop(4)|flip`` (Augment-S2: AutoAugment
  + flip and crop);
* ``s3`` = ``autoaugment('cifar10')|scale_jitter(0.5, 2.0)|flip`` (Augment-S3:
  large scale jittering (0.5, 2.0) + AutoAugment + flip and crop);
* ``s4`` = ``randaugment(2, 10)|scale_jitter(0.5, 2.0)|flip`` (Augment-S4:
  "RandAugment with larger scale jittering", N=2, M=10).

Adaptation choices. The policy (AutoAugment, RandAugment) runs first, on the
whole image, as in Cubuk et al.'s CIFAR code (policy, then pad-and-crop, flip)
and in the detection code (AutoAugment, then flip, then scale jittering), so
colour ops never see the black padding. In s3 and s4 scale jittering replaces
pad_crop: it is the crop (a random crop of the upscaled image, or a random
placement of the downscaled one on black), as large scale jittering replaces
the standard crop in detection. s4 keeps s3's range (0.5, 2.0) rather than a
larger one, since on 32x32 images a smaller scale leaves a few pixels; write
e.g. ``scale_jitter(0.1, 2.0)`` for more. Noisy Student's magnitudes above
10 need ``randaugment(..., extrapolate=True)``.

A preset cannot know the dataset: s2 and s3 use the CIFAR-10 policy. For SVHN
write the chain out with its policy and without flips (digits are not
mirror-symmetric), e.g. ``"autoaugment('svhn')|pad_crop(4)"``; for
ImageNet-like data use ``autoaugment('imagenet')`` (the reference's v0). Flips
do not suit MNIST-like digits either.
"""

from __future__ import annotations

import math
from typing import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp

from jaxrobust.data import autoaugment as aa
from jaxrobust.registry import Registry, RegistryError

Array = jax.Array
Chain = Callable[[Array, Array], Array]

#: The augmentation ops a ``pp`` chain names.
OPS = Registry("pp op")

# Named chains: Zoph et al.'s (2020) augmentation strengths S1-S4 (see the
# module docstring); S1 is the standard flip + crop, for 32x32 classification
# the CIFAR recipe of Hendrycks et al.
PRESETS: dict[str, str] = {
    "s1": "pad_crop(4)|flip",
    "s2": "autoaugment('cifar10')|pad_crop(4)|flip",
    "s3": "autoaugment('cifar10')|scale_jitter(0.5, 2.0)|flip",
    "s4": "randaugment(2, 10)|scale_jitter(0.5, 2.0)|flip",
    "cifar": "pad_crop(4)|flip",
}


def _per_example_keys(rng: Array, images: Array) -> Array:
  return jax.random.split(rng, images.shape[0])


@OPS.register("flip")
def flip(rng: Array, images: Array) -> Array:
  """Mirrors each image left-right with probability 1/2 (dm-pix)."""
  return jax.vmap(pix.random_flip_left_right)(_per_example_keys(rng, images), images)


@OPS.register("flip_ud")
def flip_ud(rng: Array, images: Array) -> Array:
  """Mirrors each image top-bottom with probability 1/2 (dm-pix)."""
  return jax.vmap(pix.random_flip_up_down)(_per_example_keys(rng, images), images)


@OPS.register("pad_crop")
def pad_crop(rng: Array, images: Array, padding: int = 4) -> Array:
  """Zero-pads every side by ``padding`` pixels (black, as torchvision pads the
  PIL image) and crops back to the original size at a uniformly random offset:
  torchvision's ``RandomCrop(size, padding=padding)``."""
  if int(padding) != padding or padding < 0:
    raise RegistryError(f"pad_crop: padding must be a non-negative integer, got {padding!r}.")
  if padding == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return jax.vmap(lambda k, im: pix.random_crop(k, im, (h, w, c)))(
      _per_example_keys(rng, images), padded)


@OPS.register("autoaugment")
def autoaugment(rng: Array, images: Array, policy: str | aa.Policy = "cifar10") -> Array:
  """AutoAugment (Cubuk et al. 2019) with a published policy: ``"cifar10"``,
  ``"svhn"`` or ``"imagenet"`` (= ``"v0"``), or a list of sub-policies
  ``((op, probability, level), ...)``; one sub-policy per example
  (:func:`jaxrobust.data.autoaugment.autoaugment`)."""
  return aa.autoaugment(rng, images, policy)


@OPS.register("randaugment")
def randaugment(rng: Array, images: Array, num_layers: int = 2, magnitude: float = 10,
                extrapolate: bool = False) -> Array:
  """RandAugment (Cubuk et al. 2020) as in Noisy Student: ``num_layers`` ops
  drawn per example from the reference's 16, all at ``magnitude`` in [0, 10];
  ``extrapolate=True`` allows up to 30 (Noisy Student's extrapolated ranges)
  (:func:`jaxrobust.data.autoaugment.randaugment`)."""
  return aa.randaugment(rng, images, num_layers, magnitude, extrapolate=extrapolate)


def _scale_crop(image: Array, scale: Array, offset_y: Array, offset_x: Array) -> Array:
  """One ``[H, W, C]`` image resized by ``scale`` (bilinear, antialiased when
  shrinking, as Pillow's resize) and read at ``(offset_y, offset_x)`` of the
  resized image into an ``[H, W, C]`` window; outside it: black."""
  h, w, c = image.shape
  return jax.image.scale_and_translate(
      image, (h, w, c), (0, 1), jnp.stack([scale, scale]), jnp.stack([-offset_y, -offset_x]),
      method="bilinear", antialias=True)


@OPS.register("scale_jitter")
def scale_jitter(rng: Array, images: Array, min_scale: float = 0.5, max_scale: float = 2.0
                 ) -> Array:
  """Large-scale jittering (Zoph et al. 2020; Ghiasi et al. 2021): each image
  is resized by ``s ~ U[min_scale, max_scale]`` and brought back to its size:
  a uniformly placed crop when ``s > 1``, a uniformly placed paste on black
  when ``s < 1`` (the window offset is ``u (s H - H)``, ``u ~ U[0, 1]``, per
  axis). The shape is static: the resize is ``jax.image.scale_and_translate``
  into the output window, on device.

  Departures from the detection reference (TF ``resize_and_crop_image``),
  which rounds the scaled size, crops at whole pixels, pads at the bottom
  right and resizes without antialiasing: continuous sizes and offsets, a
  random placement of small images (no corner bias for classification), and
  antialiased shrinking (as Pillow's resize).
  """
  if not (0 < min_scale <= max_scale) or not all(map(math.isfinite, (min_scale, max_scale))):
    raise RegistryError(f"scale_jitter: need 0 < min_scale <= max_scale, got min_scale="
                        f"{min_scale!r}, max_scale={max_scale!r}.")
  _, h, w, _ = images.shape

  def one(key: Array, image: Array) -> Array:
    k_s, k_y, k_x = jax.random.split(key, 3)
    s = jax.random.uniform(k_s, (), minval=min_scale, maxval=max_scale)
    oy = jax.random.uniform(k_y) * (s * h - h)
    ox = jax.random.uniform(k_x) * (s * w - w)
    return _scale_crop(image, s, oy, ox)

  out = jax.vmap(one)(_per_example_keys(rng, images), images.astype(jnp.float32))
  return jnp.clip(out, 0.0, 1.0)


@OPS.register("clip")
def clip(rng: Array, images: Array, low: float = 0.0, high: float = 1.0) -> Array:
  """Clips values to ``[low, high]`` (deterministic)."""
  del rng
  return jnp.clip(images, low, high)


def split_chain(chain: str) -> list[str]:
  """``"s1|clip"`` -> ``["pad_crop(4)", "flip", "clip"]`` (presets expanded)."""
  out: list[str] = []
  for part in (chain or "").split("|"):
    part = part.strip()
    if not part or part == "none":
      continue
    if part in PRESETS:
      out += split_chain(PRESETS[part])
    else:
      out.append(part)
  return out


def build(chain: str, *, where: str = "pp") -> Chain:
  """``"pad_crop(4)|flip"`` -> ``fn(rng, images01) -> images01``.

  Each op gets ``fold_in(rng, position)``. Unknown ops and bad options raise
  before anything is compiled, naming ``where`` (the config key).
  """
  if not isinstance(chain, str):
    raise RegistryError(f"{where}: a pp chain is a string such as 'pad_crop(4)|flip', got "
                        f"{chain!r}.")
  ops = []
  probe = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  for part in split_chain(chain):
    try:
      op = OPS.build(part, where=where, runtime=("rng", "images"))
    except RegistryError as e:
      known = ", ".join(sorted(PRESETS))
      raise RegistryError(f"{e} (presets: {known})") from None
    try:  # traces (does not compile) the op once, so bad options fail now
      jax.eval_shape(op, jax.random.PRNGKey(0), probe)
    except RegistryError as e:
      raise RegistryError(f"{where}: {e}") from None
    ops.append(op)

  def apply(rng: Array, images: Array) -> Array:
    for i, op in enumerate(ops):
      images = op(jax.random.fold_in(rng, i), images)
    return images

  apply.ops = tuple(op.spec_name for op in ops)  # type: ignore[attr-defined]
  return apply


def to_unit_range(images: Array) -> Array:
  """uint8 ``[0, 255]`` -> float32 ``[0, 1]`` (float input is returned as float32)."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)
