"""`spurious_glyphs`: an offline spurious-correlation benchmark shaped like Waterbirds.

A small stand-in for Waterbirds (Sagawa et al. 2020, "Distributionally Robust
Neural Networks"; the benchmark of DFR, Kirichenko et al. 2023) that builds in
seconds from files scikit-learn and matplotlib ship:

* **core feature** (the label): the shape of a rendered digit -- label 0 for
  the digits 0-4, label 1 for 5-9 -- drawn with the glyph renderer of
  `jaxrobust.data.builders.glyphs` (16 bundled fonts, four stroke widths, a
  seeded affine map, no noise);
* **spurious feature** (the "background"): a random crop of one of
  scikit-learn's two sample photos -- ``china.jpg`` (spurious 0, the
  "land" background) or ``flower.jpg`` (spurious 1, "water") -- whose colour
  statistics a small CNN picks up far more easily than the digit's shape;
* **group** = ``2 * label + spurious`` (Sagawa/DFR: ``y * n_confounders + c``).

The training split has Waterbirds' group sizes (train ``[3498, 184, 56,
1057]``, rescaled to 4,800): background agrees with the label in 95.0% of
images, and group 2 (label 1 on the china background) is the small minority.
Validation and test have Waterbirds' val/test structure: the background is
independent of the label (half of each label on each background), with
Waterbirds' label imbalance (about 78% label 0).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow_datasets as tfds

from jaxrobust.data.builders import _base
from jaxrobust.data.builders import glyphs

SEED = 21
# Examples per group (landbird-land, landbird-water, waterbird-land,
# waterbird-water in Waterbirds' terms) of each split.
GROUP_SIZES = {
    "train": (3500, 184, 56, 1060),
    "validation": (466, 466, 134, 134),
    "test": (933, 933, 267, 267),
}
CLASS_NAMES = ("digit_0_4", "digit_5_9")
SPURIOUS_NAMES = ("china", "flower")  # scikit-learn sample images, in load order
GROUP_NAMES = tuple(f"{c}/{s}" for c in CLASS_NAMES for s in SPURIOUS_NAMES)
MIN_SIDE, MAX_SIDE = 64, 320  # background crop side range, in photo pixels
HALO = 3  # grey-dilation size of the dark outline around the glyph (at 32 px)


def glyph_masks(rng: np.random.RandomState, digits: np.ndarray,
                protos: np.ndarray) -> np.ndarray:
  """float32 [n, 32, 32] ink coverage in [0, 1] of the given digits, each from
  a random font and stroke width under a random affine map (as `glyphs`)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  n = len(digits)
  font = rng.randint(0, len(glyphs.FONTS), n)
  stroke = rng.choice(len(glyphs.STROKES), n, p=glyphs.STROKE_P)
  coeffs = glyphs._inverse_affines(rng, n)  # pylint: disable=protected-access
  size = (_base.IMAGE_SIZE, _base.IMAGE_SIZE)
  out = np.empty((n,) + size, np.float32)
  for i in range(n):
    proto = Image.fromarray(protos[stroke[i], font[i], digits[i]], mode="F")
    out[i] = np.asarray(proto.transform(
        size, Image.Transform.AFFINE, tuple(coeffs[i]), resample=Image.Resampling.BILINEAR))
  return np.clip(out, 0.0, 1.0)


def backgrounds(rng: np.random.RandomState, spurious: np.ndarray, photos: list) -> np.ndarray:
  """float32 [n, 32, 32, 3] in [0, 1]: for each example a square crop of
  ``photos[spurious[i]]`` (side log-uniform in [64, 320] px, uniform position,
  flipped with probability 1/2), resized bilinearly to 32x32."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  n = len(spurious)
  size = (_base.IMAGE_SIZE, _base.IMAGE_SIZE)
  out = np.empty((n,) + size + (3,), np.float32)
  for i in range(n):
    photo = photos[spurious[i]]
    width, height = photo.size
    side = int(round(math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))))
    side = min(side, height, width)
    top, left = rng.randint(height - side + 1), rng.randint(width - side + 1)
    patch = np.asarray(photo.resize(size, Image.Resampling.BILINEAR,
                                    box=(left, top, left + side, top + side)), np.float32)
    out[i] = (patch[:, ::-1] if rng.uniform() < 0.5 else patch) / 255.0
  return out


def generate(seed: int, split: str, sizes, protos: np.ndarray, photos: list
             ) -> dict[str, np.ndarray]:
  """Arrays of one split: ``image`` uint8 [n, 32, 32, 3], ``label``,
  ``spurious``, ``group``, ``digit`` (int64 [n]), in a seeded random order."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  rng = _base.split_rng(seed, split)
  group = rng.permutation(np.repeat(np.arange(4, dtype=np.int64), sizes))
  label, spurious = group // 2, group % 2
  digit = label * 5 + rng.randint(0, 5, len(group))
  ink = glyph_masks(rng, digit, protos)
  halo = ndimage.grey_dilation(ink, size=(1, HALO, HALO))
  background = backgrounds(rng, spurious, photos)
  # A dark outline, then a white glyph over the photo: the digit is visible on
  # any background.
  images = background * (1.0 - halo)[..., None] + ink[..., None]
  return {"image": _base.unit_to_uint8(images), "label": label, "spurious": spurious,
          "group": group, "digit": digit.astype(np.int64)}


class SpuriousGlyphs(_base.EmbeddedBuilder):
  """Digit shape (label) vs. photo background (spurious), uint8 [32, 32, 3].

  Construction of every example (seeded by the split):

  1. Its group ``g`` is fixed by the split's group sizes (a seeded
     permutation): ``label = g // 2``, ``spurious = g % 2``.
  2. A digit uniform in 0-4 (label 0) or 5-9 (label 1), rendered as in
     `glyphs` (font, stroke width and affine map drawn the same way; no blur,
     no noise) to an ink coverage mask ``a`` in [0, 1].
  3. A background crop of ``china.jpg`` (spurious 0) or ``flower.jpg``
     (spurious 1): square side log-uniform in [64, 320] px, uniform position,
     horizontal flip with probability 1/2, bilinear resize to 32x32.
  4. ``image = background * (1 - dilate(a, 3x3)) + a``: a dark 1-px outline
     and a white glyph, rounded to uint8.

  Features: ``image``, ``label`` (0: digits 0-4, 1: digits 5-9), ``group``
  (``2 * label + spurious``, 4 groups), ``spurious`` (0: china, 1: flower)
  and ``digit`` (0-9).

  Splits (group sizes ``[0/china, 0/flower, 1/china, 1/flower]``):

  * train 4,800 = [3500, 184, 56, 1060] (Waterbirds' [3498, 184, 56, 1057]):
    the background agrees with the label in 95.0% of images (95.0% of label 0
    on china, 95.0% of label 1 on flower);
  * validation 1,200 = [466, 466, 134, 134] and test 2,400 = [933, 933, 267,
    267]: background independent of the label, Waterbirds' label imbalance;
    every test group has >= 267 examples, so worst-group accuracy moves in
    steps below 0.4%.

  Bytes depend on matplotlib's bundled FreeType and fonts, Pillow's JPEG
  decoder, scipy and numpy; tests pin a hash.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": _base.image_feature(3),
        "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        "group": tfds.features.ClassLabel(names=list(GROUP_NAMES)),
        "spurious": tfds.features.ClassLabel(names=list(SPURIOUS_NAMES)),
        "digit": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
    })
    return self._dataset_info(features, description=self.__doc__)

  def split_sizes(self) -> dict[str, int]:
    return {s: int(sum(g)) for s, g in GROUP_SIZES.items()}

  @functools.cached_property
  def _prototypes(self) -> np.ndarray:
    return glyphs.prototypes()[:, :, :10]  # the digits

  @functools.cached_property
  def _photos(self) -> list:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    return [Image.fromarray(np.asarray(img, np.uint8)) for img in load_sample_images().images]

  def _generate_examples(self, split: str):
    arrays = generate(SEED, split, GROUP_SIZES[split], self._prototypes, self._photos)
    for i in range(len(arrays["label"])):
      yield i, {k: v[i] if k == "image" else int(v[i]) for k, v in arrays.items()}
