"""Validation OOD sets (jaxrobust.data.validation_ood) against numpy ports of
hendrycks/outlier-exposure CIFAR/test.py's ``--validate`` transforms."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrobust.data import sources
from jaxrobust.data import validation_ood as vo
from tests import reference_validation_ood as ref


def _images(n=6, c=3, size=32, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n, size, size, c)).astype(np.uint8)


def _chw(u8):
  return u8.astype(np.float64).transpose(2, 0, 1) / 255.0


def _u8(chw):
  return np.clip(np.rint(chw.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["jigsaw", "rgb_shift", "invert"])
def test_deterministic_kinds_match_the_reference_rgb(kind):
  x = _images()
  got = vo.transform(kind, x, np.random.RandomState(0))
  want = np.stack([_u8(getattr(ref, kind)(_chw(im))) for im in x])
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, x)


def test_jigsaw_is_a_permutation_of_pixels():
  x = np.arange(32 * 32, dtype=np.float64).reshape(1, 32, 32, 1)
  out = vo.jigsaw(x)
  assert sorted(out.ravel()) == sorted(x.ravel())
  assert out[0, 0, 0, 0] == x[0, 8, 0, 0] and out[0, 0, 16, 0] == x[0, 16, 0, 0]
  assert out[0, 16, 0, 0] == x[0, 16, 16, 0] and out[0, 16, 16, 0] == x[0, 0, 24, 0]


def test_speckle_matches_the_reference_with_the_same_noise():
  x = _images(n=3)
  rng = np.random.RandomState(5)
  got = vo.transform("speckle", x, rng)
  noise = np.random.RandomState(5).standard_normal(x.shape)  # same draws, HWC order
  want = np.stack([_u8(ref.speckle(_chw(im), noise[i].transpose(2, 0, 1)))
                   for i, im in enumerate(x)])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind,fn", [("arithmetic_mean", ref.avg_of_pair),
                                     ("geometric_mean", ref.geom_mean_of_pair)])
def test_pair_means_match_the_reference_with_the_same_partners(kind, fn):
  x = _images(n=7)
  got = vo.transform(kind, x, np.random.RandomState(3))
  rng = np.random.RandomState(3)
  data = [_chw(im) for im in x]
  partners = [ref.random_partner(rng, len(x), i) for i in range(len(x))]
  assert all(j != i for i, j in enumerate(partners))
  want = np.stack([_u8(fn(data, i, j)) for i, j in enumerate(partners)])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("c", [1, 3])
def test_pixelate_matches_pillow_box_resize(c):
  Image = pytest.importorskip("PIL.Image")
  x = _images(n=4, c=c, seed=2)
  got = vo.transform("pixelate", x, np.random.RandomState(0))
  mode = "L" if c == 1 else "RGB"
  want = []
  for im in x:
    pil = Image.fromarray(im[..., 0] if c == 1 else im, mode)
    # CIFAR/test.py:399
    out = pil.resize((int(32 * 0.2), int(32 * 0.2)), Image.BOX).resize((32, 32), Image.BOX)
    want.append(np.asarray(out).reshape(32, 32, c))
  want = np.stack(want)
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got[0, :, :, 0])) <= 36  # 6x6 blocks (plus blends at borders)


def test_gray_rgb_shift_and_invert_are_the_channel_mean_of_the_rgb_transform():
  g = _images(n=2, c=1)
  rgb = np.repeat(g, 3, axis=-1)
  for kind in ("rgb_shift", "invert"):
    got = vo.transform(kind, g, None).astype(int)
    want = np.rint(vo.transform(kind, rgb, None).astype(float).mean(-1, keepdims=True))
    assert np.abs(got - want).max() <= 1, kind
  x = g.astype(np.float64) / 255
  np.testing.assert_allclose(vo.invert(x), (2 - x) / 3)
  np.testing.assert_allclose(vo.rgb_shift(x), (x[:, :, ::-1] + 2 * x) / 3)


def test_bad_names_and_inputs_raise_clearly():
  with pytest.raises(ValueError, match="unknown kind 'jigsw'.*jigsaw"):
    vo.parse_name("validation_ood/jigsw/digits")
  with pytest.raises(ValueError, match="validation_ood/<kind>/<dataset>"):
    vo.parse_name("validation_ood/jigsaw")
  with pytest.raises(ValueError, match="1 or 3 channels"):
    vo.transform("invert", _images(n=1, c=2), None)
  with pytest.raises(ValueError, match="at least 2"):
    vo.transform("arithmetic_mean", _images(n=1), np.random.RandomState(0))
  with pytest.raises(ValueError, match="even"):
    vo.transform("jigsaw", _images(n=1, size=31), None)


def test_source_over_digits_validation(tmp_path):
  del tmp_path
  name = "validation_ood/speckle/digits"
  spec = sources.get_spec(name)
  assert spec.num_classes is None and not spec.has_labels and spec.image_shape == (32, 32, 1)
  a = sources.get_source(name, "validation")
  b = sources.get_source(name, "validation")
  base = sources.get_source("digits", "validation")
  assert len(a) == len(base) == 180
  assert a[0]["label"] == -1 and a[0]["image"].dtype == np.uint8
  np.testing.assert_array_equal(a[5]["image"], b[5]["image"])  # deterministic
  assert not np.array_equal(a[5]["image"], base[5]["image"])
  assert sources.class_names(name) == []
  for kind in vo.KINDS:
    other = sources.get_source(f"validation_ood/{kind}/digits", "validation")
    assert len(other) == 180 and other[0]["image"].shape == (32, 32, 1), kind
  with pytest.raises(ValueError, match="Unknown split"):
    sources.get_source(name, "nope")


def test_tuning_sets_default_to_the_validation_ood_sets_and_bad_ones_are_named():
  from configs.recipes import ood as ood_recipe
  from jaxrobust.methods import tuning
  from jaxrobust.registry import RegistryError
  sets = tuning.validation_sets("digits")
  assert sets["jigsaw"] == "validation_ood/jigsaw/digits:validation" and len(sets) == 7
  assert tuning._ood_sets("uniform_noise/gray:validation", "w") == {
      "validation_ood": "uniform_noise/gray:validation"}
  with pytest.raises(RegistryError, match=r"config.stages.tune_odin.ood: give one set"):
    tuning._ood_sets(["blobs/gray:test"], "config.stages.tune_odin")
  c = ood_recipe.get_config("mode=compare")
  tuned = [k for k, v in c.stages.items() if v.get("task") == "tune_score"]
  assert sorted(tuned) == [f"tune_{s}" for s in sorted(ood_recipe.TUNED_SCORES)]
  for k in tuned:
    assert dict(c.stages[k].ood) == sets, k
    assert c.stages[k].score in tuning.GRIDS
