"""Validation OOD sets made from in-distribution images, for tuning OOD scores.

The ``--validate`` (``-v``) sets of Hendrycks et al.'s Outlier Exposure code
(hendrycks/outlier-exposure ``CIFAR/test.py`` lines 287-436; the same block in
hendrycks/pre-training ``uncertainty/CIFAR/test.py``): in-distribution-like
images broken in ways that none of the test OOD sets (noise, photo patches,
letters) resembles, so a score tuned on them is not tuned on the test sets.

A set is a dataset name ``validation_ood/<kind>/<dataset>`` read with any
split of ``<dataset>`` (``<dataset>`` may carry a config and version):

    get_source("validation_ood/jigsaw/digits", "validation")
    evaluators.ood.sets = {"jigsaw": "validation_ood/jigsaw/digits:validation"}

(the ``:`` that would separate kind and dataset is the split/version separator
of every other name, hence ``/``). Each record is the transformed record ``i``
of the source split, ``label = -1``; the set has as many records as that split
(the reference: as many as the other CIFAR's test set). Kinds (``x`` in
``[0, 1]``, HWC; reference lines of ``CIFAR/test.py``):

* ``arithmetic_mean`` (307-337, ``AvgOfPair``): ``(x_i + x_j) / 2`` with
  ``j`` drawn uniformly among the other records (redrawn while ``j == i``).
  The reference averages normalised images; normalisation is affine, so this
  is the same image.
* ``geometric_mean`` (340-370, ``GeomMeanOfPair``): ``sqrt(x_i x_j)``, same
  pairing.
* ``jigsaw`` (372-387): the four quadrants permuted -- top-left gets the
  top-left quadrant with its two row strips (rows 0:8, 8:16) swapped, top-right
  the bottom-left quadrant, bottom-left the bottom-right quadrant, bottom-right
  the top-right quadrant with its two column strips swapped. For ``H x W``
  images: halves ``H // 2``, strips ``H // 4`` (8 and 16 at 32); ``H`` and
  ``W`` must be even.
* ``speckle`` (389-395): ``clip(x + x · n, 0, 1)``, ``n ~ N(0, 1)`` per pixel
  and channel (σ = 1).
* ``pixelate`` (397-403): Pillow BOX resize to ``int(0.2 H) x int(0.2 W)``
  (6 x 6 at 32) and BOX resize back, on the uint8 image, as the reference
  (which resizes the PIL image): a numpy port of Pillow's separable
  resampling (box filter ``(-0.5, 0.5]``, horizontal pass then vertical,
  each in Pillow's 22-bit fixed point, rounded to uint8).
* ``rgb_shift`` (405-411): channels ``(G mirrored left-right, B, R)``.
* ``invert`` (413-419): ``(R, 1 - G, 1 - B)`` ("not done on all channels").

Departures: (1) the pairs and the corrupted images come from the
in-distribution split itself (the reference mixes images of the *other* CIFAR
test set for the two means and applies jigsaw/speckle/... to the geometric-mean
set's dataset -- i.e. the other CIFAR, which on the embedded benchmark has no
counterpart); (2) outputs are stored as uint8 (``round(255 x)``; the reference
feeds floats, a difference of at most 1/510); (3) gray images: ``rgb_shift``
and ``invert`` are defined on three channels, so a gray image is repeated into
three, transformed, and averaged back (``rgb_shift``: ``(mirror(x) + 2 x) / 3``,
a ghost; ``invert``: ``(2 - x) / 3``); the other kinds act per channel as in
the reference; (4) the reference's uniform-noise ``-v`` set is left out (it
resembles the Gaussian and Rademacher test sets); it is the separate
``uniform_noise`` dataset. Randomness: ``np.random.RandomState`` seeded by
(``SEED``, kind, dataset, split), so a set is fixed.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import numpy as np

PREFIX = "validation_ood"
SEED = 20
UNLABELED = -1
PIXELATE_FACTOR = 0.2  # CIFAR/test.py:399: int(32 * 0.2)
SPECKLE_SIGMA = 1.0  # CIFAR/test.py:391: x + x * torch.randn_like(x)

# --- the transforms: float images [N, H, W, C] in [0, 1] (pixelate: uint8) ---


def partners(rng: np.random.RandomState, n: int) -> np.ndarray:
  """For each record ``i`` a uniformly drawn ``j != i`` (the reference's
  ``np.random.choice(len)`` redrawn while equal to ``i``)."""
  if n < 2:
    raise ValueError(f"{PREFIX}: image pairs need at least 2 records, got {n}.")
  out = np.empty(n, np.int64)
  for i in range(n):
    j = rng.randint(n)
    while j == i:
      j = rng.randint(n)
    out[i] = j
  return out


def arithmetic_mean(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  return (x + x[partners(rng, len(x))]) / 2.0


def geometric_mean(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  return np.sqrt(x * x[partners(rng, len(x))])


def jigsaw(x: np.ndarray, rng: np.random.RandomState | None = None) -> np.ndarray:
  del rng
  _, h, w, _ = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"{PREFIX}/jigsaw: needs even image height and width, got {h}x{w}.")
  h2, h4, w2, w4 = h // 2, h // 4, w // 2, w // 4
  out = np.empty_like(x)
  out[:, :h2, :w2] = np.concatenate([x[:, h4:h2, :w2], x[:, :h4, :w2]], axis=1)
  out[:, :h2, w2:] = x[:, h2:, :w2]
  out[:, h2:, :w2] = x[:, h2:, w2:]
  out[:, h2:, w2:] = np.concatenate([x[:, :h2, w2 + w4:], x[:, :h2, w2:w2 + w4]], axis=2)
  return out


def speckle(x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  return np.clip(x + x * (SPECKLE_SIGMA * rng.standard_normal(x.shape)), 0.0, 1.0)


def _on_rgb(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, kind: str) -> np.ndarray:
  """``fn`` of an RGB batch; gray: repeated into RGB, then the channel mean."""
  c = x.shape[-1]
  if c == 3:
    return fn(x)
  if c == 1:
    return fn(np.repeat(x, 3, axis=-1)).mean(-1, keepdims=True)
  raise ValueError(f"{PREFIX}/{kind}: needs 1 or 3 channels, got {c}.")


def rgb_shift(x: np.ndarray, rng: np.random.RandomState | None = None) -> np.ndarray:
  del rng
  return _on_rgb(lambda v: np.stack([v[:, :, ::-1, 1], v[..., 2], v[..., 0]], -1), x,
                 "rgb_shift")


def invert(x: np.ndarray, rng: np.random.RandomState | None = None) -> np.ndarray:
  del rng
  return _on_rgb(lambda v: np.stack([v[..., 0], 1.0 - v[..., 1], 1.0 - v[..., 2]], -1), x,
                 "invert")


def box_weights(in_size: int, out_size: int) -> np.ndarray:
  """``[out_size, in_size]`` weights of Pillow's BOX resampling along one axis
  (``Resample.c: precompute_coeffs`` with ``box_filter``: 1 on ``(-0.5, 0.5]``),
  each row normalised to sum 1."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 0.5 * filterscale
  w = np.zeros((out_size, in_size), np.float64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    for k in range(xmin, xmax):
      t = (k - center + 0.5) / filterscale
      w[xx, k] = 1.0 if -0.5 < t <= 0.5 else 0.0
    total = w[xx].sum()
    if total:
      w[xx] /= total
  return w


PRECISION_BITS = 32 - 8 - 2  # Pillow Resample.c: fixed-point bits of the 8-bit passes


def _pass_u8(x: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
  """One 8-bit pass of Pillow's resampling along ``axis`` of ``[N, H, W, C]``:
  weights in fixed point (``normalize_coeffs_8bpc``: ``int(0.5 + w 2^22)``),
  ``(2^21 + sum in * k) >> 22`` clipped to uint8."""
  k = np.floor(0.5 + weights * (1 << PRECISION_BITS)).astype(np.int64)
  acc = np.moveaxis(np.tensordot(np.moveaxis(x.astype(np.int64), axis, -1), k.T, axes=1),
                    -1, axis)
  return np.clip((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255).astype(np.uint8)


def _resize_u8(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Pillow ``Image.resize((out_w, out_h), BOX)`` of uint8 ``[N, H, W, C]``:
  the horizontal pass, then the vertical one (``ImagingResampleInner``)."""
  _, h, w, _ = x.shape
  return _pass_u8(_pass_u8(x, box_weights(w, out_w), 2), box_weights(h, out_h), 1)


def pixelate(x: np.ndarray, rng: np.random.RandomState | None = None) -> np.ndarray:
  """uint8 in, uint8 out (the reference resizes the uint8 PIL image)."""
  del rng
  _, h, w, _ = x.shape
  small_h, small_w = int(h * PIXELATE_FACTOR), int(w * PIXELATE_FACTOR)
  if small_h < 1 or small_w < 1:
    raise ValueError(f"{PREFIX}/pixelate: {h}x{w} images are too small to pixelate.")
  return _resize_u8(_resize_u8(x, small_h, small_w), h, w)


#: kind -> transform ``fn(images, rng)``; ``pixelate`` works on uint8.
KINDS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "arithmetic_mean": arithmetic_mean,
    "geometric_mean": geometric_mean,
    "jigsaw": jigsaw,
    "speckle": speckle,
    "pixelate": pixelate,
    "rgb_shift": rgb_shift,
    "invert": invert,
}
_UINT8_KINDS = ("pixelate",)


def transform(kind: str, images: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  """uint8 ``[N, H, W, C]`` -> the ``kind`` validation OOD images, uint8."""
  if kind not in KINDS:
    raise ValueError(f"{PREFIX}: unknown kind {kind!r}; known: {', '.join(KINDS)}.")
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise TypeError(f"{PREFIX}/{kind}: expected uint8 images [N, H, W, C], got "
                    f"{images.dtype} {images.shape}.")
  if kind in _UINT8_KINDS:
    return KINDS[kind](images, rng)
  out = KINDS[kind](images.astype(np.float64) / 255.0, rng)
  return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


# --- as a dataset -------------------------------------------------------------


def is_validation_ood(name: Any) -> bool:
  return isinstance(name, str) and name.split("/", 1)[0] == PREFIX


def parse_name(name: str) -> tuple[str, str]:
  """``'validation_ood/jigsaw/glyphs/small'`` -> (``'jigsaw'``, ``'glyphs/small'``)."""
  parts = name.split("/", 2)
  if len(parts) != 3 or parts[0] != PREFIX or not parts[2]:
    raise ValueError(f"dataset {name!r}: a validation OOD set is named "
                     f"'{PREFIX}/<kind>/<dataset>' (e.g. '{PREFIX}/jigsaw/digits'); kinds: "
                     f"{', '.join(KINDS)}.")
  if parts[1] not in KINDS:
    from jaxrobust.registry import suggest
    raise ValueError(f"dataset {name!r}: unknown kind {parts[1]!r}"
                     f"{suggest(parts[1], list(KINDS))}; kinds: {', '.join(KINDS)}.")
  if is_validation_ood(parts[2]):
    raise ValueError(f"dataset {name!r}: the source of a validation OOD set cannot be one.")
  return parts[1], parts[2]


def names(dataset: str, kinds: Sequence[str] = tuple(KINDS)) -> dict[str, str]:
  """``{kind: 'validation_ood/<kind>/<dataset>'}``, e.g. for an OOD evaluator's sets."""
  return {k: f"{PREFIX}/{k}/{dataset}" for k in kinds}


def seed_of(kind: str, dataset: str, split: str, seed: int = SEED) -> np.random.RandomState:
  return np.random.RandomState([seed, zlib.crc32(f"{kind}/{dataset}:{split}".encode())])


class ValidationOODSource:
  """In-memory records ``{'image': uint8 [H, W, C], 'label': -1}`` (picklable)."""

  def __init__(self, images: np.ndarray, name: str = ""):
    self.images = images
    self.name = name

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[int(index)], "label": np.int64(UNLABELED)}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"ValidationOODSource({self.name!r}, len={len(self)})"
