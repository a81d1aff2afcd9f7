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
    streams.train.pp = ""                     # nothing (also "none")

Ops register with ``@OPS.register(name)`` and have the signature
``op(rng, images, *options) -> images``.
"""

from __future__ import annotations

from typing import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp

from jaxrobust.registry import Registry, RegistryError

Array = jax.Array
Chain = Callable[[Array, Array], Array]

OPS = Registry("pp op")

# Named chains. S1 of Zoph et al. (2020) is the standard flip + crop; for
# 32x32 classification that is the CIFAR recipe of Hendrycks et al.
PRESETS: dict[str, str] = {
    "s1": "pad_crop(4)|flip",
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
