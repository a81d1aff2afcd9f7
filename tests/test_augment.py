"""AutoAugment / RandAugment ops (jaxrobust.data.autoaugment), scale jittering
and the S1-S4 presets (jaxrobust.data.pp): Pillow semantics, level mappings,
published policies, determinism, errors.

Comparisons are on uint8 levels (``round(255 x)``), the reference's domain.
Tolerances: 0 levels for the integer ops (Invert, Posterize, Solarize,
Equalize) and the geometric ops (nearest sampling; our coordinates are exact
integers, Pillow's float64); 1 level for AutoContrast (Pillow's float64
``int(ix * scale + offset)`` falls 1 below some exact integers) and the
ImageEnhance blends (``d + f (x - d)`` in float32 then truncated, as Pillow's C
code, but XLA may contract it into an FMA). Scale jittering is compared with
Pillow's float ``resize`` at 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from jaxrobust.data import autoaugment as aa
from jaxrobust.data import pp
from jaxrobust.registry import RegistryError

H, W = 11, 13  # non-square, odd: catches swapped axes and off-centre rotations


def _images(c: int) -> np.ndarray:
  """uint8 [4, H, W, c]: a gradient, noise, a low-contrast patch, a constant."""
  rng = np.random.default_rng(c)
  yy, xx = np.mgrid[0:H, 0:W]
  grad = (yy[..., None] * 17 + xx[..., None] * 7 + np.arange(c) * 50) % 230 + 10
  noise = rng.integers(0, 256, (H, W, c))
  low = rng.integers(60, 91, (H, W, c))
  const = np.full((H, W, c), 77)
  return np.stack([grad, noise, low, const]).astype(np.uint8)


def _ours(fn, x: np.ndarray, *args) -> np.ndarray:
  out = jax.jit(fn)(jnp.asarray(x, jnp.float32) / 255.0, *args)
  return _levels(out)


def _levels(out) -> np.ndarray:
  return np.round(np.asarray(out) * 255.0).astype(int)


def _pil(fn, x: np.ndarray) -> np.ndarray:
  def one(img):
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    out = np.asarray(fn(pil))
    return out[..., None] if out.ndim == 2 else out
  return np.stack([one(img) for img in x]).astype(int)


def _fill(c):
  return 128 if c == 1 else (128,) * 3


_COLOUR = [  # (name, our op, args, Pillow, tolerance in levels)
    ("autocontrast", aa.auto_contrast, (), ImageOps.autocontrast, 1),
    ("equalize", aa.equalize, (), ImageOps.equalize, 0),
    ("invert", aa.invert, (), ImageOps.invert, 0),
] + [
    (f"posterize{b}", aa.posterize, (b,), lambda im, b=b: ImageOps.posterize(im, b), 0)
    for b in (1, 3, 4, 8)
] + [
    (f"solarize{t}", aa.solarize, (t,), lambda im, t=t: ImageOps.solarize(im, t), 0)
    for t in (0, 77, 128, 256)
] + [
    (f"{name}{f}", getattr(aa, name), (f,), lambda im, e=enh, f=f: e(im).enhance(f), 1)
    for name, enh in (("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast),
                      ("brightness", ImageEnhance.Brightness),
                      ("sharpness", ImageEnhance.Sharpness))
    for f in (0.1, 0.37, 1.9, 5.5)
]


@pytest.mark.parametrize("c", [3, 1])
def test_colour_ops_match_pillow(c):
  x = _images(c)
  ours = jax.jit(lambda x: [fn(x, *args) for _, fn, args, _, _ in _COLOUR])(x / 255.0)
  for out, (name, fn, args, ref, tol) in zip(ours, _COLOUR):
    diff = np.abs(_levels(out) - _pil(ref, x))
    assert diff.max() <= tol, f"{name} (C={c}): max difference {diff.max()} levels"


@pytest.mark.parametrize("c", [3, 1])
def test_geometric_ops_match_pillow_exactly(c):
  x, fill = _images(c), _fill(c)

  def affine(coeffs):
    return lambda im: im.transform(im.size, Image.AFFINE, coeffs, fillcolor=fill)

  cases = [(aa.rotate, d, lambda im, d=d: im.rotate(d, fillcolor=fill))
           for d in (0, 13.7, -30, 30, 45, 90)]
  cases += [(aa.shear_x, v, affine((1, v, 0, 0, 1, 0))) for v in (0.3, -0.3, 0.15, -0.27)]
  cases += [(aa.shear_y, v, affine((1, 0, 0, v, 1, 0))) for v in (0.3, -0.15)]
  cases += [(aa.translate_x, v, affine((1, 0, v, 0, 1, 0))) for v in (3, -4, 2.5, -1.5, 20)]
  cases += [(aa.translate_y, v, affine((1, 0, 0, 0, 1, v))) for v in (3, -2.5)]
  for fn, arg, ref in cases:
    np.testing.assert_array_equal(_ours(fn, x, arg), _pil(ref, x),
                                  err_msg=f"{fn.__name__}({arg}), C={c}")


def test_ops_without_a_pillow_counterpart():
  x = _images(3).astype(int)
  np.testing.assert_array_equal(_ours(aa.posterize, x, 0), 0)  # 0 bits: black (TF reference)
  np.testing.assert_array_equal(_ours(aa.posterize, x, 12), x)  # > 8 bits: unchanged
  for add in (0, 33, 110, -20):
    want = np.where(x < 128, np.clip(x + add, 0, 255), x)
    np.testing.assert_array_equal(_ours(aa.solarize_add, x, add), want)
  np.testing.assert_array_equal(_ours(aa.identity, x), x)
  # one image and a batch give the same result
  np.testing.assert_array_equal(_ours(aa.rotate, x[1], 30), _ours(aa.rotate, x, 30)[1])


def test_cutout_is_a_clipped_gray_square():
  x = np.full((64, 12, 10, 1), 0.2, np.float32)
  cutout = jax.jit(aa.cutout, static_argnums=2)
  out = np.asarray(cutout(jax.random.PRNGKey(0), x, 3))
  np.testing.assert_array_equal(out, cutout(jax.random.PRNGKey(0), x, 3))
  sizes = set()
  for img in out[..., 0]:
    box = np.isclose(img, 128 / 255)
    assert np.all(np.isclose(img[~box], 0.2))
    rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
    assert box.sum() == len(rows) * len(cols)  # a full rectangle
    assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
    assert 3 <= len(rows) <= 6 and 3 <= len(cols) <= 6  # 2 pad, clipped at a border
    sizes.add((len(rows), len(cols)))
  assert (6, 6) in sizes and len(sizes) > 1


def test_level_to_arg_follows_the_references():
  tpu = functools.partial(aa.level_to_arg, mapping="tpu")
  cifar = functools.partial(aa.level_to_arg, mapping="cifar")
  assert [tpu("Rotate", v) for v in (0, 5, 10, 30)] == [0.0, 15.0, 30.0, 90.0]
  assert [tpu("Posterize", v) for v in (0, 2, 6, 10, 30)] == [0, 0, 2, 4, 12]
  assert [tpu("Solarize", v) for v in (0, 3, 8, 10)] == [0, 76, 204, 256]
  assert [tpu("SolarizeAdd", v) for v in (0, 3, 7, 10)] == [0, 33, 77, 110]
  for op in ("Color", "Contrast", "Brightness", "Sharpness"):
    np.testing.assert_allclose([tpu(op, v) for v in (0, 5, 10, 30)], [0.1, 1.0, 1.9, 5.5])
  np.testing.assert_allclose([tpu("ShearX", v) for v in (5, 10, 30)], [0.15, 0.3, 0.9])
  assert tpu("TranslateY", 10, translate_const=4) == 4.0
  assert tpu("TranslateX", 5, translate_const=4) == 2.0
  assert [tpu("Cutout", v, cutout_const=4) for v in (3, 5, 10)] == [1, 2, 4]
  assert tpu("Equalize", 7) == tpu("Invert", 3) == tpu("AutoContrast", 9) == 0
  # the CIFAR search code: Posterize / Solarize reversed, whole degrees / pixels
  assert [cifar("Posterize", v) for v in (0, 3, 7, 10)] == [4, 3, 2, 0]
  assert [cifar("Solarize", v) for v in (0, 3, 10)] == [256, 180, 0]
  assert cifar("Rotate", 7) == 21.0 and cifar("TranslateX", 9, translate_const=10) == 9.0
  np.testing.assert_allclose(cifar("Sharpness", 9), 1.72)
  assert aa.SIGNED_OPS == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


def test_randaugment_levels_reach_the_pixels_with_a_random_sign():
  """Rotate at M=10 is a +-30 degree rotation; TranslateX at M=10 moves 1/8
  of the width (16 px -> 2 px), with both signs across examples."""
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (32, 16, 16, 3)), jnp.float32)
  for op, fn, arg in (("Rotate", aa.rotate, 30.0), ("TranslateX", aa.translate_x, 2.0)):
    out = np.asarray(jax.jit(lambda k, x: aa.randaugment(k, x, 1, 10, ops=(op,)))(  # noqa: B023
        jax.random.PRNGKey(1), x))
    plus, minus = np.asarray(jax.jit(fn)(x, arg)), np.asarray(jax.jit(fn)(x, -arg))
    is_plus = np.all(out == plus, axis=(1, 2, 3))
    is_minus = np.all(out == minus, axis=(1, 2, 3))
    assert np.all(is_plus | is_minus) and is_plus.any() and is_minus.any(), op


def test_published_policies():
  assert set(aa.POLICIES) == {"cifar10", "svhn", "imagenet"}
  for name, policy in aa.POLICIES.items():
    assert len(policy) == 25, name
    for sub in policy:
      assert len(sub) == 2
      for op, prob, level in sub:
        assert op in aa.OP_NAMES and 0 <= prob <= 1 and level in range(11), (name, op)
  assert aa.POLICIES["cifar10"][0] == (("Invert", 0.1, 7), ("Contrast", 0.2, 6))
  assert aa.POLICIES["cifar10"][-1] == (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1))
  assert aa.POLICIES["svhn"][0] == (("ShearX", 0.9, 4), ("Invert", 0.2, 3))
  assert aa.POLICIES["svhn"][-1] == (("ShearX", 0.7, 2), ("Invert", 0.1, 5))
  assert aa.POLICIES["imagenet"][0] == (("Equalize", 0.8, 1), ("ShearY", 0.8, 4))
  assert aa.POLICIES["imagenet"][-1] == (("Color", 0.8, 6), ("Rotate", 0.4, 5))
  assert len(aa.RANDAUGMENT_OPS) == 16 and "Cutout" in aa.RANDAUGMENT_OPS


def test_randaugment_applies_exactly_n_ops():
  x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 0.6, (8, 6, 6, 3)), jnp.float32)
  k = jax.random.PRNGKey(0)

  @jax.jit
  def runs(k, x):
    once = aa.brightness(x, 1.9)  # Brightness at M=10
    thrice = aa.brightness(aa.brightness(once, 1.9), 1.9)
    return (once, aa.randaugment(k, x, 1, 10, ops=("Brightness",)), thrice,
            aa.randaugment(k, x, 3, 10, ops=("Brightness",)), aa.identity(x),
            aa.randaugment(k, x, 0, 10))

  for want, got in zip(*[iter(runs(k, x))] * 2):
    np.testing.assert_array_equal(got, want)
  # ops are drawn uniformly per example: Invert or Identity, about half each
  y = jnp.full((400, 2, 2, 1), 0.2)
  out = np.asarray(jax.jit(lambda k, y: aa.randaugment(k, y, 1, 10, ops=("Invert", "Identity")))(
      k, y))
  inverted = np.isclose(out[:, 0, 0, 0], 204 / 255)
  assert np.all(inverted | np.isclose(out[:, 0, 0, 0], 51 / 255))
  assert 160 < inverted.sum() < 240


def test_autoaugment_applies_sub_policies_with_their_probabilities():
  y = jnp.full((400, 2, 2, 1), 0.2)
  policies = ([[("Invert", 1.0, 0), ("Solarize", 0.0, 0)]],
              [[("Invert", 0.3, 0), ("Identity", 1.0, 0)]],
              # two sub-policies (of different lengths), drawn uniformly per example
              [[("Invert", 1.0, 0)], [("Identity", 1.0, 0), ("Identity", 1, 0)]])
  outs = jax.jit(lambda k, y: [aa.autoaugment(k, y, p) for p in policies])(
      jax.random.PRNGKey(2), y)
  inverted = [np.isclose(np.asarray(out)[:, 0, 0, 0], 204 / 255).sum() for out in outs]
  assert inverted[0] == 400
  assert 90 < inverted[1] < 150
  assert 160 < inverted[2] < 240


def _assert_augmentation(fn, x, c):
  a, b, other = fn(jax.random.PRNGKey(3), x), fn(jax.random.PRNGKey(3), x), fn(
      jax.random.PRNGKey(4), x)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, other)
  assert a.shape == x.shape and a.dtype == jnp.float32, c
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@pytest.mark.slow
def test_policies_on_one_and_three_channels_are_deterministic_and_on_the_uint8_grid():
  x1 = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (6, 12, 12, 1)), jnp.float32)
  x3 = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (6, 10, 14, 3)), jnp.float32)

  @jax.jit
  def augment(key, x1, x3):
    k1, k2, k3 = jax.random.split(key, 3)
    return (aa.autoaugment(k1, x1, "svhn"), aa.autoaugment(k2, x3, "v0"),
            aa.randaugment(k3, x1, 2, 30, extrapolate=True))

  outs = augment(jax.random.PRNGKey(5), x1, x3)
  again = augment(jax.random.PRNGKey(5), x1, x3)
  other = augment(jax.random.PRNGKey(6), x1, x3)
  for out, same, diff, x in zip(outs, again, other, (x1, x3, x1)):
    np.testing.assert_array_equal(out, same)
    assert not np.array_equal(out, diff)
    assert out.shape == x.shape and out.dtype == jnp.float32
    levels = np.asarray(out) * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert levels.min() >= 0 and levels.max() <= 255


@pytest.mark.slow
def test_presets_s2_to_s4_build_and_run_under_jit():
  assert pp.split_chain("s2") == ["autoaugment('cifar10')", "pad_crop(4)", "flip"]
  assert pp.split_chain("s3") == ["autoaugment('cifar10')", "scale_jitter(0.5, 2.0)", "flip"]
  assert pp.split_chain("s4") == ["randaugment(2, 10)", "scale_jitter(0.5, 2.0)", "flip"]
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (8, 16, 16, 3)), jnp.float32)
  for chain in ("s2", "s3", "s4"):
    fn = jax.jit(pp.build(chain))
    a, b, c = fn(jax.random.PRNGKey(3), x), fn(jax.random.PRNGKey(3), x), fn(
        jax.random.PRNGKey(4), x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), chain
    assert a.shape == x.shape and a.dtype == jnp.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_scale_crop_matches_pillow_resize():
  """The core of scale_jitter: resize by s and read an [H, W] window at an
  offset; Pillow: BILINEAR resize (antialiased when shrinking), crop / paste."""
  x = np.random.default_rng(0).uniform(0, 1, (12, 14)).astype(np.float32)
  crop = jax.jit(lambda s, oy, ox: pp._scale_crop(jnp.asarray(x[..., None]), s, oy, ox)[..., 0])
  up = np.asarray(Image.fromarray(x).resize((28, 24), Image.BILINEAR))[3:15, 5:19]
  np.testing.assert_allclose(crop(2.0, 3.0, 5.0), up, atol=1e-5)
  down = np.zeros_like(x)
  down[2:8, 3:10] = np.asarray(Image.fromarray(x).resize((7, 6), Image.BILINEAR))
  np.testing.assert_allclose(crop(0.5, -2.0, -3.0), down, atol=1e-5)
  np.testing.assert_allclose(crop(1.0, 0.0, 0.0), x, atol=1e-6)


def test_scale_jitter():
  """Per example s ~ U[0.5, 2]: enlarged images fill the window, shrunk ones
  (placed at random on black) cover about s^2 of it (up to the border pixels:
  the resize renormalises its weights at the image's edge)."""
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (16, 12, 12, 3)), jnp.float32)
  jitter = jax.jit(pp.scale_jitter)
  _assert_augmentation(jitter, x, 3)
  k = jax.random.PRNGKey(1)
  area = np.asarray(jitter(k, jnp.ones_like(x)))[..., 0].sum(axis=(1, 2)) / 144
  scales = np.asarray(jax.vmap(lambda k: jax.random.uniform(
      jax.random.split(k, 3)[0], (), minval=0.5, maxval=2.0))(jax.random.split(k, 16)))
  np.testing.assert_allclose(area[scales >= 1], 1.0, atol=1e-5)
  np.testing.assert_allclose(area, np.minimum(scales, 1) ** 2, atol=0.1)
  assert (scales < 0.9).any() and (scales > 1).any()


def test_bad_options_are_clear_errors():
  x = jnp.zeros((2, 8, 8, 3))
  k = jax.random.PRNGKey(0)
  with pytest.raises(RegistryError, match=r"magnitude=11 is outside \[0, 10\].*extrapolate=True"):
    aa.randaugment(k, x, 2, 11)
  with pytest.raises(RegistryError, match=r"magnitude=31 is outside \[0, 30\]"):
    aa.randaugment(k, x, 2, 31, extrapolate=True)
  with pytest.raises(RegistryError, match=r"magnitude=-1"):
    aa.randaugment(k, x, 2, -1)
  with pytest.raises(RegistryError, match="num_layers"):
    aa.randaugment(k, x, 1.5, 5)
  with pytest.raises(RegistryError, match=r"config.streams.train.pp: randaugment: "
                                          r"magnitude=12 .*extrapolate=True"):
    pp.build("randaugment(magnitude=12)", where="config.streams.train.pp")
  with pytest.raises(RegistryError, match=r"unknown policy 'cifar100' \(did you mean "
                                          r"'cifar10'.*known: cifar10, imagenet, svhn, v0"):
    pp.build("autoaugment('cifar100')")
  with pytest.raises(RegistryError, match="op in AutoContrast"):
    aa.autoaugment(k, x, [[("Rotat", 0.5, 3)]])
  with pytest.raises(RegistryError, match="1 or 3 channels"):
    aa.autoaugment(k, jnp.zeros((2, 8, 8, 2)))
  with pytest.raises(RegistryError, match="0 < min_scale <= max_scale"):
    pp.build("scale_jitter(2, 1)")
  with pytest.raises(RegistryError, match="unknown AutoAugment op"):
    aa.level_to_arg("Blur", 3)
  assert pp.build("randaugment(2, 14, extrapolate=True)|flip").ops == ("randaugment", "flip")
