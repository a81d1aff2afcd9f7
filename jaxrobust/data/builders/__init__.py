"""Embedded offline datasets as tfds builders (array_record, readable without TF).

Importing this package registers the builders with tfds, so that
``tfds.builder(name)`` / ``tfds.data_source(name, ...)`` find them:

* in-distribution: ``digits`` (sklearn digits, 32x32x1), ``glyphs`` (rendered
  characters, 62 classes, 32x32x1; configs ``full``/``small``);
* out-of-distribution (configs ``rgb``/``gray``, label -1): ``gaussian_noise``,
  ``rademacher_noise``, ``blobs``, ``uniform_noise``, ``photo_patches``;
* spurious correlations (with a ``group`` feature): ``spurious_glyphs``
  (digit shape vs. photo background, 32x32x3, Waterbirds-like groups).

Composed from the user's tfds copies of other datasets (no download):
``waterbirds`` (CUB birds on Places backgrounds, Sagawa et al. 2020).

Most users go through `jaxrobust.data.sources.get_source`, which imports this
package and prepares the data on first use.
"""

from jaxrobust.data.builders._base import UNLABELED  # noqa: F401  (re-exported: sources.UNLABELED)
from jaxrobust.data.builders.digits import Digits
from jaxrobust.data.builders.glyphs import Glyphs
from jaxrobust.data.builders.noise import Blobs, GaussianNoise, RademacherNoise, UniformNoise
from jaxrobust.data.builders.photos import PhotoPatches
from jaxrobust.data.builders.spurious import SpuriousGlyphs
from jaxrobust.data.builders.waterbirds import Waterbirds

BUILDERS = (Digits, Glyphs, GaussianNoise, RademacherNoise, Blobs, UniformNoise, PhotoPatches,
            SpuriousGlyphs)
NAMES = tuple(b.name for b in BUILDERS)
# Builders composed from other tfds datasets the user has prepared in data_dir.
COMPOSED: tuple[str, ...] = (Waterbirds.name,)
