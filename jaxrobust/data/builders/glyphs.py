"""`glyphs`: generated characters 0-9, A-Z, a-z at 32x32x1, for pre-training.

A large, offline stand-in for the pre-training source in Hendrycks et al. 2019
("Using Pre-Training Can Improve Model Robustness and Uncertainty"), where
ImageNet (Downsampled 32x32) plays this role for CIFAR: many more images and
classes than the downstream task (`digits`), same image format (uint8
[32, 32, 1], white ink on black), and labels 0-9 are the digits 0-9 as in
`digits`.

Generation (fast: every (font, character, stroke) prototype is rasterised once,
then each sample is one affine resampling with Pillow plus vectorised numpy):

1. Prototypes: each character is rendered with FreeType (`matplotlib.ft2font`)
   from the 16 fonts matplotlib ships in ``mpl-data/fonts/ttf`` -- DejaVu Sans,
   Serif and Sans Mono with their bold/oblique(italic) variants, and STIX General
   (regular, bold, italic, bold italic) -- at a 52 px em on a 64x64 canvas (2x
   the output size), centred on its ink bounding box. Glyphs keep their relative
   size within a font, so 'o' stays smaller than 'O'. Four stroke widths per
   glyph (the font's own, then grey dilation 2x2, 3x3, 5x5 at 64 px), then a
   Gaussian anti-aliasing prefilter (sigma 0.8 px at 64 px).
2. Per sample (seeded): a prototype (uniform font; stroke width with
   probabilities 0.35/0.25/0.25/0.15), a random affine map -- rotation
   U(-12, 12) degrees, shear U(-0.2, 0.2), scale U(0.8, 1.1) with aspect ratio
   U(0.85, 1.15), translation U(-2.5, 2.5) px per axis -- sampled bilinearly
   down to 32x32; a Gaussian blur with sigma in {0, 0.5, 0.8} px
   (probabilities 0.4/0.35/0.25); ink intensity U(0.65, 1) on a background
   U(0, 0.2); additive Gaussian noise with sigma U(0, 0.06); clip and round to
   uint8.

Bytes are identical for the same builder version, seed and library versions
(matplotlib's bundled FreeType, Pillow, scipy, numpy); tests pin a hash.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import string

import numpy as np
import tensorflow_datasets as tfds

from jaxrobust.data.builders import _base

SEED = 1
CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase  # 62 classes
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
CANVAS = 64  # prototypes are rendered at 2x the output size
EM_PIXELS = 52
# (morphology, size) per stroke width, and their probabilities.
STROKES = (1, 2, 3, 5)  # grey dilation sizes (1: the font's own stroke)
STROKE_P = (0.35, 0.25, 0.25, 0.15)
ANTIALIAS_SIGMA = 0.8
BLUR_SIGMAS = (0.0, 0.5, 0.8)
BLUR_P = (0.4, 0.35, 0.25)


@dataclasses.dataclass(eq=False)
class GlyphsConfig(tfds.core.BuilderConfig):
  """Examples per class in each split (all splits are class-balanced), the
  characters (a contiguous range of ``CHARACTERS``) and the seed."""
  train_per_class: int = 400
  validation_per_class: int = 50
  test_per_class: int = 100
  first: int = 0
  count: int = len(CHARACTERS)
  seed: int = SEED

  @property
  def characters(self) -> str:
    return CHARACTERS[self.first:self.first + self.count]


def _font_dir() -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _render(path: str, char: str) -> np.ndarray:
  """One glyph as float32 [CANVAS, CANVAS] in [0, 1], centred on its ink box."""
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top

  font = ft2font.FT2Font(path)
  font.set_size(EM_PIXELS, 72)  # points at 72 dpi = pixels
  font.set_text(char, 0.0, flags=ft2font.LoadFlags.NO_HINTING)
  font.draw_glyphs_to_bitmap(antialiased=True)
  bitmap = np.asarray(font.get_image(), np.float32) / 255.0
  rows, cols = np.nonzero(bitmap)
  if not len(rows):
    raise ValueError(f"font {os.path.basename(path)} has no glyph for {char!r}.")
  glyph = bitmap[rows.min():rows.max() + 1, cols.min():cols.max() + 1][:CANVAS, :CANVAS]
  canvas = np.zeros((CANVAS, CANVAS), np.float32)
  top, left = (CANVAS - glyph.shape[0]) // 2, (CANVAS - glyph.shape[1]) // 2
  canvas[top:top + glyph.shape[0], left:left + glyph.shape[1]] = glyph
  return canvas


def prototypes() -> np.ndarray:
  """float32 [len(STROKES), len(FONTS), 62, CANVAS, CANVAS], anti-aliased."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  base = np.stack([
      np.stack([_render(os.path.join(_font_dir(), f), c) for c in CHARACTERS]) for f in FONTS])
  out = []
  for size in STROKES:
    shaped = ndimage.grey_dilation(base, size=(1, 1, size, size)) if size > 1 else base
    out.append(ndimage.gaussian_filter(shaped, (0, 0, ANTIALIAS_SIGMA, ANTIALIAS_SIGMA)))
  return np.stack(out).astype(np.float32)


def _inverse_affines(rng: np.random.RandomState, n: int) -> np.ndarray:
  """[n, 6] Pillow AFFINE coefficients mapping output (x, y) -> prototype (x, y)."""
  theta = np.deg2rad(rng.uniform(-12.0, 12.0, n))
  shear = rng.uniform(-0.2, 0.2, n)
  scale = rng.uniform(0.8, 1.1, n)
  aspect = np.sqrt(rng.uniform(0.85, 1.15, n))
  shift = rng.uniform(-2.5, 2.5, (n, 2))
  cos, sin = np.cos(theta), np.sin(theta)
  # Forward map A = rotation @ shear @ diag(sx, sy), in (x, y) coordinates.
  rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
  shr = np.zeros((n, 2, 2))
  shr[:, 0, 0] = shr[:, 1, 1] = 1.0
  shr[:, 0, 1] = shear
  fwd = rot @ shr @ (np.eye(2) * np.stack([scale * aspect, scale / aspect], -1)[:, None, :])
  inv = np.linalg.inv(fwd) * (CANVAS / _base.IMAGE_SIZE)
  out_centre = _base.IMAGE_SIZE / 2.0 + shift
  in_centre = np.full((n, 2), CANVAS / 2.0)
  offset = in_centre - np.einsum("nij,nj->ni", inv, out_centre)
  return np.concatenate([inv[:, 0, :], offset[:, :1], inv[:, 1, :], offset[:, 1:]], -1)


def generate(seed: int, split: str, per_class: int, protos: np.ndarray | None = None,
             first: int = 0, count: int = len(CHARACTERS)) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [count * per_class, 32, 32, 1], int64 labels 0..count-1) for one
  split of the characters ``CHARACTERS[first:first + count]``.

  ``protos`` is the output of `prototypes()` (computed when not given).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  protos = prototypes() if protos is None else protos
  rng = _base.split_rng(seed, split)
  labels = _base.balanced_labels(rng, count, per_class)
  n = len(labels)
  font = rng.randint(0, len(FONTS), n)
  stroke = rng.choice(len(STROKES), n, p=STROKE_P)
  coeffs = _inverse_affines(rng, n)
  blur = rng.choice(len(BLUR_SIGMAS), n, p=BLUR_P)
  ink = rng.uniform(0.65, 1.0, n)
  background = rng.uniform(0.0, 0.2, n)
  noise_sigma = rng.uniform(0.0, 0.06, n)
  noise = rng.standard_normal((n, _base.IMAGE_SIZE, _base.IMAGE_SIZE))

  size = (_base.IMAGE_SIZE, _base.IMAGE_SIZE)
  images = np.empty((n,) + size, np.float32)
  for i in range(n):
    proto = Image.fromarray(protos[stroke[i], font[i], first + labels[i]], mode="F")
    images[i] = np.asarray(proto.transform(
        size, Image.Transform.AFFINE, tuple(coeffs[i]), resample=Image.Resampling.BILINEAR))
  for level, sigma in enumerate(BLUR_SIGMAS):
    if sigma:
      sel = blur == level
      images[sel] = ndimage.gaussian_filter(images[sel], (0, sigma, sigma))
  images = background[:, None, None] + (ink - background)[:, None, None] * images
  images += noise_sigma[:, None, None] * noise
  return _base.unit_to_uint8(images)[..., None], labels


class Glyphs(_base.EmbeddedBuilder):
  """Rendered characters 0-9, A-Z, a-z as uint8 [32, 32, 1], 62 classes.

  Label ``k`` is ``CHARACTERS[k]``: 0-9 are the digits, 10-35 'A'-'Z',
  36-61 'a'-'z'. Every split is class-balanced and shuffled by a fixed seed.

  Configs (examples per class -> split sizes):

  * ``glyphs/full`` (default): 400 / 50 / 100 -> train 24,800, validation
    3,100, test 6,200.
  * ``glyphs/small`` (for tests): 30 / 5 / 10 -> train 1,860, validation 310,
    test 620.
  * ``glyphs/upper`` and ``glyphs/lower``: the 26 letters of one case only
    (labels 0-25 = 'A'-'Z' or 'a'-'z'), 400 / 50 / 100 -> 10,400 / 1,300 /
    2,600, drawn with their own seeds (not a subset of ``full``): letters are
    outliers of ``digits`` -- upper case for training with auxiliary
    outliers (Outlier Exposure, energy fine-tuning), lower case as a near-OOD
    test set -- and a letters target for transfer experiments.
  """

  BUILDER_CONFIGS = [
      GlyphsConfig(name="full", description="400/50/100 examples per class."),
      GlyphsConfig(name="small", description="30/5/10 examples per class (tests).",
                   train_per_class=30, validation_per_class=5, test_per_class=10),
      GlyphsConfig(name="upper", description="A-Z only, 400/50/100 examples per class.",
                   first=10, count=26, seed=SEED + 1),
      GlyphsConfig(name="lower", description="a-z only, 400/50/100 examples per class.",
                   first=36, count=26, seed=SEED + 2),
  ]
  DEFAULT_CONFIG_NAME = "full"

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info(
        _base.labelled_features(1, list(self.builder_config.characters)), description=__doc__)

  def _per_class(self) -> dict[str, int]:
    cfg = self.builder_config
    return {"train": cfg.train_per_class, "validation": cfg.validation_per_class,
            "test": cfg.test_per_class}

  def split_sizes(self) -> dict[str, int]:
    return {s: k * self.builder_config.count for s, k in self._per_class().items()}

  @functools.cached_property
  def _prototypes(self) -> np.ndarray:
    return prototypes()

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    return _base.iterate(*generate(cfg.seed, split, self._per_class()[split], self._prototypes,
                                   first=cfg.first, count=cfg.count))
