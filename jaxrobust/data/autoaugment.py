"""AutoAugment and RandAugment as jittable JAX ops on images in ``[0, 1]``.

Papers: Cubuk et al., "AutoAugment: Learning Augmentation Strategies from Data"
(CVPR 2019); Cubuk et al., "RandAugment: Practical automated data augmentation
with a reduced search space" (CVPRW 2020); RandAugment with magnitudes beyond
10 as in Xie et al., "Self-training with Noisy Student improves ImageNet
classification" (CVPR 2020). :mod:`jaxrobust.data.pp` chains them into Zoph et
al.'s (NeurIPS 2020) augmentation strengths S2-S4.

Reference code followed (the TF code reimplements PIL on uint8 images):

* google-research/noisystudent ``randaugment.py`` and tensorflow/tpu
  ``models/official/efficientnet/autoaugment.py``: the op set, the level ->
  argument mappings (``_MAX_LEVEL = 10``; mapping ``"tpu"`` below), the ImageNet
  policy ``v0``, RandAugment (N ops drawn uniformly with replacement, the fixed
  magnitude M, a drawn op is always applied: the reference draws a probability
  and ignores it), the gray fill 128 of geometric ops and Cutout, Cutout as a
  ``2 * pad`` square around a uniform centre, clipped at the borders.
* tensorflow/models ``research/autoaugment/augmentation_transforms.py`` (PIL),
  the code the CIFAR-10 policy was searched with: the level mapping of the
  CIFAR-10 and SVHN policies (mapping ``"cifar"``: Posterize keeps
  ``4 - int(level * 4 / 10)`` bits and Solarize's threshold is
  ``256 - int(level * 256 / 10)``, the reverse of ``"tpu"``, where more level
  means more bits and a higher threshold; translation ``int(level)`` pixels
  on 32x32 images; rotation ``int(level * 3)`` degrees).
* The published policies: CIFAR-10 and SVHN as in the paper's appendix (25
  sub-policies each, as transcribed by torchvision and DeepVoltaire/AutoAugment),
  ImageNet = the reference's ``policy_v0`` (25 sub-policies).
* Pillow (``ImageOps``, ``ImageEnhance``, ``Image.transform``): the pixel
  semantics every op reproduces; tests/test_augment.py compares against it.

Conventions and departures:

* **Quantisation: yes.** Like the reference (uint8), images are rounded to the
  256 levels ``round(255 x)`` on entry, every op returns integer levels as Pillow
  does (truncating blends, rounding the smoothing filter), and the result is
  ``level / 255``. A chain of ops therefore stays on the uint8 grid; only the
  input rounding (``round`` instead of the reference's ``tf.cast`` truncation,
  which agree on uint8-derived images) is a choice.
* Colour ops follow Pillow where the TF reference departs from it: Contrast
  blends towards the mean of the grayscale image (the TF reference uses
  ``sum(histogram) / 256``, i.e. the pixel count / 256, a known bug); Sharpness
  rounds the smoothed image (TF truncates); grayscale is Pillow's integer
  ``L = (19595 R + 38470 G + 7471 B + 2**15) >> 16`` (TF: float weights).
  AutoContrast is computed exactly, ``floor((v - lo) 255 / (hi - lo))``;
  Pillow's float64 table (and TF's float32 one) is 1 lower at a few levels.
* Geometric ops (Rotate, ShearX/Y, TranslateX/Y) follow Pillow's
  ``Image.transform(AFFINE)`` with nearest sampling: output pixel ``(x, y)``
  reads input ``floor(A (x + .5, y + .5) + t)``, computed exactly in integers
  from coefficients in 16-bit fixed point, so they equal Pillow's pixel for
  pixel; TF's ``contrib.image`` rounds ``A (x, y) + t``, which differs on
  ties. Positive Rotate degrees turn counter-clockwise (Pillow); the sign is
  random anyway. The fill is gray 128 (the TF reference; the CIFAR code fills
  with the dataset mean, Pillow with black).
* Posterize bits are clipped to ``[0, 8]`` (extrapolated magnitudes give more
  than 8 bits, a negative shift in the TF reference; here: no change).
* TranslateX/Y and Cutout sizes are fractions of the image side, so the policies
  keep their meaning on 28x28 and 32x32 images: RandAugment ``1/8`` for both
  (Noisy Student's CIFAR-10/SVHN setting ``image_size // 8``; its ImageNet
  setting is 100 and 40 pixels at 224); CIFAR-10/SVHN policies ``10/32`` (10
  pixels at 32); ImageNet ``v0`` ``250/224`` and ``100/224`` (the reference's
  250 and 100 pixels at 224). SolarizeAdd and Cutout always use the tpu
  mapping (the CIFAR code has no SolarizeAdd and a different Cutout, and
  neither appears in the published CIFAR-10 and SVHN policies).
* One-channel images: Color is the identity (Pillow on ``L`` images) and the
  grayscale image of Contrast is the channel itself. Only 1 and 3 channels.
* Randomness is per example from per-example keys (a batch splits its key);
  one ``uniform`` draw per example gives the op or sub-policy, the signs, the
  application coin flips and the Cutout centre (not the reference's random
  stream, which is TF's).
* Cost: the op of RandAugment and the sub-policy of AutoAugment are chosen per
  example with ``jax.lax.switch``; **under vmap every branch is computed** and
  the result selected. Ops are grouped in families that share their costly
  part (pointwise ops; Equalize; Pillow's enhance ops, one blend; geometric
  ops, one gather; Cutout), so a RandAugment layer or an AutoAugment slot
  costs one pass per family present, not one per op. A Python loop over PIL
  images computes only the drawn op; see benchmarks/augment.py.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxrobust.registry import RegistryError, suggest

Array = jax.Array
Policy = Sequence[Sequence[tuple[str, float, float]]]

__all__ = [
    "FILL", "GEOMETRIC_OPS", "MAX_EXTRAPOLATED_LEVEL", "MAX_LEVEL", "OP_NAMES", "POLICIES",
    "RANDAUGMENT_OPS", "SIGNED_OPS", "auto_contrast", "autoaugment", "brightness", "color",
    "contrast", "cutout", "equalize", "from_levels", "identity", "invert", "level_to_arg",
    "posterize", "randaugment", "rotate", "sharpness", "shear_x", "shear_y", "solarize",
    "solarize_add", "to_levels", "translate_x", "translate_y",
]

MAX_LEVEL = 10  # the reference's _MAX_LEVEL
MAX_EXTRAPOLATED_LEVEL = 30  # Noisy Student's range of RandAugment magnitudes
FILL = 128  # gray fill of geometric ops and Cutout, in uint8 levels
_FRAC_BITS = 16  # fixed-point coordinates of the geometric ops

# ----------------------------------------------------------------------------- policies

# Cubuk et al. (2019), appendix: (op, probability, level) x 2 per sub-policy.
_CIFAR10 = (
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)),
    (("Equalize", 0.2, 0), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.2, 8), ("Equalize", 0.6, 4)),
    (("Color", 0.9, 9), ("Equalize", 0.6, 6)),
    (("AutoContrast", 0.8, 4), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
)

_SVHN = (
    (("ShearX", 0.9, 4), ("Invert", 0.2, 3)),
    (("ShearY", 0.9, 8), ("Invert", 0.7, 5)),
    (("Equalize", 0.6, 5), ("Solarize", 0.6, 6)),
    (("Invert", 0.9, 3), ("Equalize", 0.6, 3)),
    (("Equalize", 0.6, 1), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("AutoContrast", 0.8, 3)),
    (("ShearY", 0.9, 8), ("Invert", 0.4, 5)),
    (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
    (("Invert", 0.9, 6), ("AutoContrast", 0.8, 1)),
    (("Equalize", 0.6, 3), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
    (("ShearY", 0.8, 8), ("Invert", 0.7, 4)),
    (("Equalize", 0.9, 5), ("TranslateY", 0.6, 6)),
    (("Invert", 0.9, 4), ("Equalize", 0.6, 7)),
    (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
    (("Invert", 0.8, 5), ("TranslateY", 0.0, 2)),
    (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
    (("Invert", 0.6, 4), ("Rotate", 0.8, 4)),
    (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
    (("ShearX", 0.1, 6), ("Invert", 0.6, 5)),
    (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
    (("ShearY", 0.8, 4), ("Invert", 0.8, 8)),
    (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
    (("ShearY", 0.8, 5), ("AutoContrast", 0.7, 3)),
    (("ShearX", 0.7, 2), ("Invert", 0.1, 5)),
)

# tensorflow/tpu efficientnet autoaugment.py policy_v0 ("used in AutoAugment Paper").
_IMAGENET_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


class _PolicySpec(NamedTuple):
  table: Policy
  mapping: str  # level mapping, see level_to_arg
  translate_frac: float  # TranslateX/Y constant (pixels at level 10) / image side
  cutout_frac: float  # Cutout constant (half-side at level 10) / image side


_POLICY_SPECS: dict[str, _PolicySpec] = {
    "cifar10": _PolicySpec(_CIFAR10, "cifar", 10 / 32, 10 / 32),
    "svhn": _PolicySpec(_SVHN, "cifar", 10 / 32, 10 / 32),
    "imagenet": _PolicySpec(_IMAGENET_V0, "tpu", 250 / 224, 100 / 224),
}
_POLICY_ALIASES = {"v0": "imagenet"}
POLICIES: dict[str, Policy] = {k: v.table for k, v in _POLICY_SPECS.items()}

# noisystudent randaugment.py's available_ops with cutout_op=True (the default;
# tensorflow/tpu has the same 16).
RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "SolarizeAdd",
    "Cutout")
OP_NAMES = RANDAUGMENT_OPS + ("Identity",)
#: Ops whose argument gets a random sign (:func:`level_to_arg`).
SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})

# ----------------------------------------------------------------------------- levels


def to_levels(images: Array) -> Array:
  """``[0, 1]`` floats -> float32 uint8 levels ``round(255 x)`` in ``[0, 255]``."""
  return jnp.round(jnp.clip(jnp.asarray(images, jnp.float32), 0.0, 1.0) * 255.0)


def from_levels(levels: Array) -> Array:
  """uint8 levels (float32) -> ``[0, 1]``."""
  return levels / 255.0


def level_to_arg(name: str, level: float, mapping: str = "tpu", translate_const: float = 100.0,
                 cutout_const: float = 40.0) -> float:
  """The argument of op ``name`` at ``level`` (before the random sign of
  :data:`SIGNED_OPS`), in the op's own units (degrees, bits, uint8 threshold,
  enhance factor, shear coefficient, pixels, Cutout half-side).

  ``mapping="tpu"`` is tensorflow/tpu's and Noisy Student's ``level_to_arg``
  (levels in ``[0, 10]``, extrapolated linearly above); ``"cifar"`` is the
  PIL code of the CIFAR-10 search (``PARAMETER_MAX = 10``), which differs for
  Rotate (whole degrees), Posterize and Solarize (reversed) and Translate
  (whole pixels). ``translate_const`` (pixels at level 10) and
  ``cutout_const`` default to the tpu RandAugment's ImageNet values.
  """
  if name not in OP_NAMES:
    raise RegistryError(f"unknown AutoAugment op {name!r}{suggest(name, OP_NAMES)}; known: "
                        f"{', '.join(OP_NAMES)}.")
  if mapping not in ("tpu", "cifar"):
    raise RegistryError(f"unknown level mapping {mapping!r}; known: tpu, cifar.")
  m = level / MAX_LEVEL
  if name in ("AutoContrast", "Equalize", "Invert", "Identity"):
    return 0.0
  if name in ("SolarizeAdd", "Cutout"):  # tpu only
    return float(int(m * (110 if name == "SolarizeAdd" else cutout_const)))
  if mapping == "tpu":
    return {
        "Rotate": lambda: m * 30.0,
        "Posterize": lambda: float(int(m * 4)),
        "Solarize": lambda: float(int(m * 256)),
        "ShearX": lambda: m * 0.3,
        "ShearY": lambda: m * 0.3,
        "TranslateX": lambda: m * float(translate_const),
        "TranslateY": lambda: m * float(translate_const),
    }.get(name, lambda: m * 1.8 + 0.1)()  # Color, Contrast, Brightness, Sharpness
  return {  # float_parameter / int_parameter of augmentation_transforms.py
      "Rotate": lambda: float(int(level * 30 / MAX_LEVEL)),
      "Posterize": lambda: float(4 - int(level * 4 / MAX_LEVEL)),
      "Solarize": lambda: float(256 - int(level * 256 / MAX_LEVEL)),
      "ShearX": lambda: float(level) * 0.3 / MAX_LEVEL,
      "ShearY": lambda: float(level) * 0.3 / MAX_LEVEL,
      "TranslateX": lambda: float(int(level * translate_const / MAX_LEVEL)),
      "TranslateY": lambda: float(int(level * translate_const / MAX_LEVEL)),
  }.get(name, lambda: float(level) * 1.8 / MAX_LEVEL + 0.1)()


# ----------------------------------------------------------------------------- ops on levels
# Ops act on one image of uint8 levels (float32 [H, W, C]) with a float32
# scalar argument. They come in families that share their costly part, so
# that choosing an op per example (lax.switch, which under vmap computes every
# branch) costs one image pass per family rather than one per op:
#   pointwise (fused elementwise): AutoContrast, Invert, Posterize, Solarize,
#     SolarizeAdd, Identity;
#   Equalize (a histogram and a [C, 256] lookup table);
#   enhance: a "degenerate" image per op, one blend (Color, Contrast,
#     Brightness, Sharpness), as Pillow's ImageEnhance;
#   geometric: fixed-point affine coefficients per op, one gather (Rotate,
#     ShearX/Y, TranslateX/Y);
#   Cutout.


def _identity(img: Array, arg: Array) -> Array:
  del arg
  return img


def _auto_contrast(img: Array, arg: Array) -> Array:
  """``ImageOps.autocontrast``: each channel's [min, max] stretched to [0, 255]
  (``floor((v - lo) 255 / (hi - lo))``, exact; Pillow's float64 lookup table
  is 1 lower at a few exact integers)."""
  del arg
  lo = img.min(axis=(0, 1))
  hi = img.max(axis=(0, 1))
  scaled = jnp.floor((img - lo) * 255.0 / jnp.maximum(hi - lo, 1.0))
  return jnp.where(hi > lo, scaled, img)


def _invert(img: Array, arg: Array) -> Array:
  del arg
  return 255.0 - img


def _posterize(img: Array, bits: Array) -> Array:
  """``ImageOps.posterize``: keeps the ``bits`` high bits (clipped to [0, 8])."""
  step = jnp.exp2(jnp.clip(8.0 - jnp.floor(bits), 0.0, 8.0))
  return jnp.floor(img / step) * step


def _solarize(img: Array, threshold: Array) -> Array:
  """``ImageOps.solarize``: levels >= threshold are inverted."""
  return jnp.where(img < threshold, img, 255.0 - img)


def _solarize_add(img: Array, addition: Array, threshold: float = 128.0) -> Array:
  """The reference's SolarizeAdd: levels below ``threshold`` get ``addition``
  (clipped to [0, 255])."""
  return jnp.where(img < threshold, jnp.clip(img + addition, 0.0, 255.0), img)


_POINTWISE_OPS: dict[str, Callable[[Array, Array], Array]] = {
    "AutoContrast": _auto_contrast,
    "Invert": _invert,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Identity": _identity,
}


def _equalize(img: Array, arg: Array) -> Array:
  """``ImageOps.equalize`` per channel: ``lut[i] = (step // 2 + #{< i}) //
  step`` with ``step = (#pixels - #{last level}) // 255``; none when step is 0."""
  del arg
  h, w, c = img.shape
  q = img.astype(jnp.int32)
  hist = jnp.zeros(256 * c, jnp.int32).at[(q + 256 * jnp.arange(c)).ravel()].add(1)
  hist = hist.reshape(c, 256)
  last = 255 - jnp.argmax(hist[:, ::-1] > 0, axis=1)
  step = (h * w - hist[jnp.arange(c), last]) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  lut = jnp.clip((step[:, None] // 2 + below) // jnp.maximum(step, 1)[:, None], 0, 255)
  return jnp.where(step > 0, lut[jnp.arange(c), q].astype(jnp.float32), img)


def _gray(img: Array) -> Array:
  """Pillow's ``convert("L")`` (integer ITU-R 601-2 luma); 1 channel: itself."""
  if img.shape[-1] == 1:
    return img[..., 0]
  # (19595 R + 38470 G + 7471 B + 2**15) >> 16: below 2**24, exact in float32
  luma = img[..., 0] * 19595.0 + img[..., 1] * 38470.0 + img[..., 2] * 7471.0 + 32768.0
  return jnp.floor(luma / 65536.0)


def _blend(degenerate: Array, img: Array, factor: Array) -> Array:
  """``Image.blend(degenerate, img, factor)``: float32, clipped, truncated."""
  out = degenerate + factor * (img - degenerate)
  return jnp.floor(jnp.clip(out, 0.0, 255.0))


def _degenerate_color(img: Array) -> Array:
  """``ImageEnhance.Color``: the grayscale image (1 channel: itself)."""
  return jnp.broadcast_to(_gray(img)[..., None], img.shape)


def _degenerate_contrast(img: Array) -> Array:
  """``ImageEnhance.Contrast``: the grayscale image's mean, rounded half up."""
  gray = _gray(img)
  return jnp.full_like(img, jnp.floor(gray.sum() / gray.size + 0.5))


def _degenerate_brightness(img: Array) -> Array:
  """``ImageEnhance.Brightness``: black."""
  return jnp.zeros_like(img)


def _degenerate_sharpness(img: Array) -> Array:
  """``ImageEnhance.Sharpness``: ``ImageFilter.SMOOTH`` (3x3 kernel 1 1 1 / 1
  5 1 / 1 1 1, divisor 13, rounded); border rows and columns copied, as Pillow."""
  h, w, _ = img.shape
  if h < 3 or w < 3:
    return img
  total = 4.0 * img[1:-1, 1:-1]  # integers below 2**24: exact in float32
  for dy in (0, 1, 2):
    for dx in (0, 1, 2):
      total = total + img[dy:h - 2 + dy, dx:w - 2 + dx]
  inner = jnp.floor((2.0 * total + 13.0) / 26.0)  # round-half-up of total / 13
  return img.at[1:-1, 1:-1].set(inner)


_ENHANCE_OPS: dict[str, Callable[[Array], Array]] = {
    "Color": _degenerate_color,
    "Contrast": _degenerate_contrast,
    "Brightness": _degenerate_brightness,
    "Sharpness": _degenerate_sharpness,
}

GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _fixed(v: float | Array) -> Array:
  """A coefficient in fixed point with :data:`_FRAC_BITS` fractional bits (int32)."""
  return jnp.round(jnp.asarray(v, jnp.float32) * (1 << _FRAC_BITS)).astype(jnp.int32)


def _affine_coeffs(name: str, arg: Array, h: int, w: int) -> Array:
  """int32 ``(A, B, 2C, D, E, 2F)``: Pillow's AFFINE coefficients of a
  geometric op in fixed point (see :func:`_affine`).

  Rotate is ``Image.rotate``: about the centre ``(w/2, h/2)``, ``a = e =
  cos(-t)``, ``b = -d = sin(-t)``; its offsets are computed from the rounded
  ``A, B`` in integers, so rotations stay exactly centred.
  """
  one, zero = jnp.int32(1 << _FRAC_BITS), jnp.int32(0)
  arg = jnp.asarray(arg, jnp.float32)
  if name == "Rotate":
    rad = -arg * (math.pi / 180.0)
    a, b = _fixed(jnp.cos(rad)), _fixed(jnp.sin(rad))
    d, e = -b, a
    c2 = (w << _FRAC_BITS) - a * w - b * h
    f2 = (h << _FRAC_BITS) - d * w - e * h
    return jnp.stack([a, b, c2, d, e, f2])
  coeffs = {
      "ShearX": (one, _fixed(arg), zero, zero, one, zero),
      "ShearY": (one, zero, zero, _fixed(arg), one, zero),
      "TranslateX": (one, zero, 2 * _fixed(arg), zero, one, zero),
      "TranslateY": (one, zero, zero, zero, one, 2 * _fixed(arg)),
  }[name]
  return jnp.stack(coeffs)


def _affine(img: Array, coeffs: Array) -> Array:
  """``Image.transform(size, AFFINE, (a, b, c, d, e, f))`` with nearest
  sampling and the gray fill: output ``(x, y)`` reads input
  ``floor(a(x+.5) + b(y+.5) + c, d(x+.5) + e(y+.5) + f)``.

  ``coeffs`` are ``(a, b, 2c, d, e, 2f)`` in fixed point (16 fractional bits)
  and the coordinates are computed exactly in integers, so exact ties (30
  degree rotations, half-pixel translations) fall as in Pillow's float64,
  which float32 does not do (it moves about 2% of the pixels of a 30 degree
  rotation). Images up to 4096 pixels a side.
  """
  a, b, c2, d, e, f2 = (coeffs[i] for i in range(6))
  h, w, _ = img.shape
  ys, xs = jnp.meshgrid(2 * jnp.arange(h, dtype=jnp.int32) + 1,
                        2 * jnp.arange(w, dtype=jnp.int32) + 1, indexing="ij")  # 2 (x + .5)
  denom = 1 << (_FRAC_BITS + 1)
  xin = jnp.floor_divide(a * xs + b * ys + c2, denom)
  yin = jnp.floor_divide(d * xs + e * ys + f2, denom)
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  out = img[jnp.clip(yin, 0, h - 1), jnp.clip(xin, 0, w - 1)]
  return jnp.where(inside[..., None], out, jnp.float32(FILL))


def _geometric(name: str) -> Callable[[Array, Array], Array]:
  """The op ``name`` of :data:`GEOMETRIC_OPS` on one image of levels."""
  def op(img: Array, arg: Array) -> Array:
    h, w, _ = img.shape
    return _affine(img, _affine_coeffs(name, arg, h, w))
  op.__name__ = name
  return op


def _cutout(img: Array, pad_size: Array, rand: Array) -> Array:
  """The reference's cutout: rows ``[cy - pad, cy + pad)`` x columns ``[cx -
  pad, cx + pad)``, clipped to the image, set to 128, around the centre
  ``(cy, cx) = floor(rand * (h, w))`` (``rand`` uniform in ``[0, 1)^2``)."""
  h, w, _ = img.shape
  cy = jnp.minimum(jnp.floor(rand[0] * h), h - 1)
  cx = jnp.minimum(jnp.floor(rand[1] * w), w - 1)
  pad = jnp.floor(pad_size)
  rows = jnp.arange(h, dtype=jnp.float32)[:, None]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :]
  box = (rows >= cy - pad) & (rows < cy + pad) & (cols >= cx - pad) & (cols < cx + pad)
  return jnp.where(box[..., None], jnp.float32(FILL), img)


def _enhance_op(name: str) -> Callable[[Array, Array], Array]:
  return lambda img, factor: _blend(_ENHANCE_OPS[name](img), img, factor)


# ----------------------------------------------------------------------------- public ops
# One image [H, W, C] or a batch [B, H, W, C] in [0, 1]; arguments in the
# reference's units (degrees, bits, uint8 thresholds, enhance factors, shear
# coefficients, pixels), scalars or one per example.


def _check_image(image: Array, where: str) -> None:
  if image.ndim not in (3, 4) or image.shape[-1] not in (1, 3):
    raise RegistryError(f"{where}: images must be [H, W, C] or [B, H, W, C] with 1 or 3 "
                        f"channels, got shape {tuple(image.shape)}.")


def _apply(fn: Callable[..., Array], image: Array, *args: float | Array) -> Array:
  """``fn`` on levels, for one image or (vmapped, arguments broadcast) a batch."""
  image = jnp.asarray(image)
  _check_image(image, "AutoAugment op")
  x = to_levels(image)
  if x.ndim == 3:
    return from_levels(fn(x, *[jnp.asarray(a, jnp.float32) for a in args]))
  batched = [jnp.broadcast_to(jnp.asarray(a, jnp.float32), x.shape[:1]) for a in args]
  return from_levels(jax.vmap(fn)(x, *batched))


def identity(image: Array) -> Array:
  """Quantises only (RandAugment paper's Identity)."""
  return _apply(_identity, image, 0.0)


def auto_contrast(image: Array) -> Array:
  """``ImageOps.autocontrast(image)`` on ``[H, W, C]`` or ``[B, H, W, C]`` in [0, 1]."""
  return _apply(_auto_contrast, image, 0.0)


def equalize(image: Array) -> Array:
  """``ImageOps.equalize(image)``."""
  return _apply(_equalize, image, 0.0)


def invert(image: Array) -> Array:
  """``ImageOps.invert(image)``."""
  return _apply(_invert, image, 0.0)


def posterize(image: Array, bits: float | Array) -> Array:
  """``ImageOps.posterize(image, bits)``; ``bits`` clipped to [0, 8]."""
  return _apply(_posterize, image, bits)


def solarize(image: Array, threshold: float | Array = 128) -> Array:
  """``ImageOps.solarize(image, threshold)``, threshold in uint8 levels."""
  return _apply(_solarize, image, threshold)


def solarize_add(image: Array, addition: float | Array = 0, threshold: float = 128) -> Array:
  """The reference's ``solarize_add``: uint8 levels below ``threshold`` get ``addition``."""
  return _apply(lambda x, a: _solarize_add(x, a, threshold), image, addition)


def color(image: Array, factor: float | Array) -> Array:
  """``ImageEnhance.Color(image).enhance(factor)``."""
  return _apply(_enhance_op("Color"), image, factor)


def contrast(image: Array, factor: float | Array) -> Array:
  """``ImageEnhance.Contrast(image).enhance(factor)``."""
  return _apply(_enhance_op("Contrast"), image, factor)


def brightness(image: Array, factor: float | Array) -> Array:
  """``ImageEnhance.Brightness(image).enhance(factor)``."""
  return _apply(_enhance_op("Brightness"), image, factor)


def sharpness(image: Array, factor: float | Array) -> Array:
  """``ImageEnhance.Sharpness(image).enhance(factor)``."""
  return _apply(_enhance_op("Sharpness"), image, factor)


def rotate(image: Array, degrees: float | Array) -> Array:
  """``Image.rotate(degrees, fillcolor=gray)``: counter-clockwise, nearest."""
  return _apply(_geometric('Rotate'), image, degrees)


def shear_x(image: Array, level: float | Array) -> Array:
  """``Image.transform(size, AFFINE, (1, level, 0, 0, 1, 0), fillcolor=gray)``."""
  return _apply(_geometric('ShearX'), image, level)


def shear_y(image: Array, level: float | Array) -> Array:
  """``Image.transform(size, AFFINE, (1, 0, 0, level, 1, 0), fillcolor=gray)``."""
  return _apply(_geometric('ShearY'), image, level)


def translate_x(image: Array, pixels: float | Array) -> Array:
  """``Image.transform(size, AFFINE, (1, 0, pixels, 0, 1, 0), fillcolor=gray)``:
  the content moves left by ``pixels``."""
  return _apply(_geometric('TranslateX'), image, pixels)


def translate_y(image: Array, pixels: float | Array) -> Array:
  """``Image.transform(size, AFFINE, (1, 0, 0, 0, 1, pixels), fillcolor=gray)``."""
  return _apply(_geometric('TranslateY'), image, pixels)


def cutout(rng: Array, image: Array, pad_size: int | Array) -> Array:
  """The reference's Cutout: a gray ``2 pad_size`` square at a uniform centre
  (one key per example for a batch)."""
  image = jnp.asarray(image)
  _check_image(image, "cutout")
  pad = jnp.asarray(pad_size, jnp.float32)
  return _per_example(lambda key, x: _cutout(x, pad, jax.random.uniform(key, (2,))), rng, image)


# ----------------------------------------------------------------------------- policies


class _OpSet:
  """Ops to choose from per example: ``jax.lax.switch`` over the families
  present (see "ops on levels"), then over the family's members for the cheap
  per-op part (an elementwise function, a degenerate image, affine
  coefficients). Under vmap both switches become selects: every family
  present is computed once."""

  def __init__(self, names: Sequence[str], h: int, w: int):
    self.h, self.w = h, w
    self.names = tuple(names)
    unique = list(dict.fromkeys(names))
    kinds = (("pointwise", _POINTWISE_OPS), ("equalize", ("Equalize",)),
             ("enhance", _ENHANCE_OPS), ("geometric", GEOMETRIC_OPS), ("cutout", ("Cutout",)))
    self.families = [(kind, [n for n in unique if n in members]) for kind, members in kinds]
    self.families = [(kind, members) for kind, members in self.families if members]
    where = {n: (f, members.index(n)) for f, (_, members) in enumerate(self.families)
             for n in members}
    self.family = jnp.asarray([where[n][0] for n in names], jnp.int32)
    self.member = jnp.asarray([where[n][1] for n in names], jnp.int32)
    self.signed = jnp.asarray([n in SIGNED_OPS for n in names])

  def _branch(self, kind: str, members: list[str]) -> Callable[..., Array]:
    if kind == "pointwise":
      fns = [_POINTWISE_OPS[n] for n in members]
      return lambda img, arg, m, rand: jax.lax.switch(m, fns, img, arg)
    if kind == "equalize":
      return lambda img, arg, m, rand: _equalize(img, arg)
    if kind == "enhance":
      degenerates = [_ENHANCE_OPS[n] for n in members]
      return lambda img, arg, m, rand: _blend(jax.lax.switch(m, degenerates, img), img, arg)
    if kind == "geometric":
      def geometric(img: Array, arg: Array, m: Array, rand: Array) -> Array:
        coeffs = jnp.stack([_affine_coeffs(n, arg, self.h, self.w) for n in members])
        return _affine(img, coeffs[m])
      return geometric
    return lambda img, arg, m, rand: _cutout(img, arg, rand)

  def __call__(self, img: Array, op: Array, arg: Array, rand: Array) -> Array:
    """Op ``op`` (index into ``names``) with ``arg``; ``rand`` = 3 uniforms
    (the sign of signed ops, then the Cutout centre)."""
    arg = jnp.where(self.signed[op] & (rand[0] < 0.5), -arg, arg)
    branches = [self._branch(kind, members) for kind, members in self.families]
    return jax.lax.switch(self.family[op], branches, img, arg, self.member[op], rand[1:])


def _per_example(one: Callable[[Array, Array], Array], rng: Array, image: Array) -> Array:
  """``one(key, levels)`` on an image or, with per-example keys, a batch."""
  image = jnp.asarray(image)
  _check_image(image, "AutoAugment op")
  x = to_levels(image)
  if x.ndim == 3:
    return from_levels(one(rng, x))
  return from_levels(jax.vmap(one)(jax.random.split(rng, x.shape[0]), x))


def _policy_spec(policy: str | Policy) -> _PolicySpec:
  if isinstance(policy, str):
    name = _POLICY_ALIASES.get(policy, policy)
    if name not in _POLICY_SPECS:
      known = sorted(_POLICY_SPECS) + sorted(_POLICY_ALIASES)
      raise RegistryError(f"autoaugment: unknown policy {policy!r}{suggest(policy, known)}; "
                          f"known: {', '.join(known)} (v0 = imagenet).")
    return _POLICY_SPECS[name]
  table = tuple(tuple(tuple(op) for op in sub) for sub in policy)
  for sub in table:
    for op in sub:
      if (len(op) != 3 or op[0] not in OP_NAMES or not 0 <= op[1] <= 1
          or not 0 <= op[2] <= MAX_LEVEL):
        raise RegistryError(
            f"autoaugment: a policy is a list of sub-policies of (op, probability in [0, 1], "
            f"level in [0, {MAX_LEVEL}]) with op in {', '.join(OP_NAMES)}; got {op!r}.")
  if not table or any(not sub for sub in table):
    raise RegistryError("autoaugment: a policy needs at least one non-empty sub-policy.")
  return _PolicySpec(table, "tpu", 1 / 8, 1 / 8)


def _arg(name: str, level: float, mapping: str, h: int, w: int, translate_frac: float,
         cutout_frac: float) -> float:
  side = w if name == "TranslateX" else h
  return level_to_arg(name, level, mapping, translate_const=translate_frac * side,
                      cutout_const=cutout_frac * min(h, w))


def autoaugment(rng: Array, image: Array, policy: str | Policy = "cifar10", *,
                translate_frac: float | None = None, cutout_frac: float | None = None) -> Array:
  """AutoAugment (Cubuk et al. 2019): per example, one sub-policy drawn
  uniformly; each of its ``(op, probability, level)`` applied in turn with its
  probability.

  Args:
    rng: a PRNG key (split into one key per example for a batch).
    image: ``[H, W, C]`` or ``[B, H, W, C]`` in [0, 1], C in {1, 3}.
    policy: ``"cifar10"``, ``"svhn"``, ``"imagenet"`` (= ``"v0"``) or a list of
      sub-policies ``[(op, probability, level), ...]`` (tpu level mapping).
    translate_frac, cutout_frac: override the policy's TranslateX/Y and Cutout
      constants (pixels at level 10 / image side).

  Returns:
    The augmented images, same shape, quantised to k/255.
  """
  spec = _policy_spec(policy)
  image = jnp.asarray(image)
  _check_image(image, "autoaugment")
  h, w = image.shape[-3:-1]
  tf = spec.translate_frac if translate_frac is None else translate_frac
  cf = spec.cutout_frac if cutout_frac is None else cutout_frac
  slots = max(len(sub) for sub in spec.table)
  # Tables [sub-policy, slot]; short sub-policies are padded with p=0 Identity.
  rows = [tuple(sub) + (("Identity", 0.0, 0),) * (slots - len(sub)) for sub in spec.table]
  opset = _OpSet(sorted({op for r in rows for op, _, _ in r}), h, w)
  op_idx = jnp.asarray([[opset.names.index(op) for op, _, _ in r] for r in rows], jnp.int32)
  probs = jnp.asarray([[p for _, p, _ in r] for r in rows], jnp.float32)
  args = jnp.asarray([[_arg(op, lv, spec.mapping, h, w, tf, cf) for op, _, lv in r]
                      for r in rows], jnp.float32)

  def one(key: Array, img: Array) -> Array:
    u = jax.random.uniform(key, (slots + 1, 4))  # sub-policy; per slot: apply, sign, centre
    j = jnp.minimum(jnp.floor(u[slots, 0] * len(rows)).astype(jnp.int32), len(rows) - 1)
    for s in range(slots):
      out = opset(img, op_idx[j, s], args[j, s], u[s, 1:])
      img = jnp.where(u[s, 0] < probs[j, s], out, img)
    return img

  return _per_example(one, rng, image)


def randaugment(rng: Array, image: Array, num_layers: int = 2, magnitude: float = 10, *,
                extrapolate: bool = False, ops: Sequence[str] = RANDAUGMENT_OPS,
                translate_frac: float = 1 / 8, cutout_frac: float = 1 / 8) -> Array:
  """RandAugment (Cubuk et al. 2020) as in Noisy Student: ``num_layers`` ops,
  each drawn uniformly from ``ops`` per example and always applied, all at the
  level ``magnitude`` (tpu level mapping).

  Args:
    rng: a PRNG key (split into one key per example for a batch).
    image: ``[H, W, C]`` or ``[B, H, W, C]`` in [0, 1], C in {1, 3}.
    num_layers: N, the number of ops applied in sequence.
    magnitude: M in [0, 10]; with ``extrapolate=True`` up to 30, where the op
      ranges are extrapolated linearly as in Noisy Student (e.g. Rotate 90
      degrees, enhance factors up to 5.5, Solarize and Posterize saturate).
    extrapolate: allow magnitudes above 10.
    ops: the op names to draw from (default: the reference's 16, Cutout included).
    translate_frac, cutout_frac: TranslateX/Y and Cutout constants (pixels at
      level 10) as fractions of the image side (Noisy Student CIFAR/SVHN: 1/8).

  Returns:
    The augmented images, same shape, quantised to k/255.
  """
  top = MAX_EXTRAPOLATED_LEVEL if extrapolate else MAX_LEVEL
  if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not (
      0 <= magnitude <= top):
    hint = (" (the most extrapolate=True allows)" if extrapolate else
            f"; magnitudes above {MAX_LEVEL} extrapolate the op ranges (Noisy Student) and "
            f"need extrapolate=True")
    raise RegistryError(f"randaugment: magnitude={magnitude!r} is outside [0, {top}]{hint}.")
  if isinstance(num_layers, bool) or int(num_layers) != num_layers or num_layers < 0:
    raise RegistryError(f"randaugment: num_layers must be a non-negative integer, got "
                        f"{num_layers!r}.")
  ops = tuple(ops)
  bad = [op for op in ops if op not in OP_NAMES]
  if bad or not ops:
    raise RegistryError(f"randaugment: ops must be a non-empty list of {', '.join(OP_NAMES)}; "
                        f"got {list(ops)!r}.")
  image = jnp.asarray(image)
  _check_image(image, "randaugment")
  h, w = image.shape[-3:-1]
  args = jnp.asarray([_arg(op, magnitude, "tpu", h, w, translate_frac, cutout_frac)
                      for op in ops], jnp.float32)
  opset = _OpSet(ops, h, w)

  def one(key: Array, img: Array) -> Array:
    u = jax.random.uniform(key, (int(num_layers), 4))  # per layer: op, sign, Cutout centre
    for i in range(int(num_layers)):
      op = jnp.minimum(jnp.floor(u[i, 0] * len(ops)).astype(jnp.int32), len(ops) - 1)
      img = opset(img, op, args[op], u[i, 1:])
    return img

  return _per_example(one, rng, image)
