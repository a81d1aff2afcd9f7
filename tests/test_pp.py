"""Pixel-space pp ops: torchvision semantics, determinism per key, ranges kept,
chains and presets, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.data import pp
from jaxrobust.registry import RegistryError


def _images(n=6, h=5, w=5, c=1, seed=0):
  return np.random.default_rng(seed).uniform(0.05, 1.0, (n, h, w, c)).astype(np.float32)


def test_pad_crop_is_a_crop_of_the_zero_padded_image():
  """torchvision RandomCrop(size, padding=p): every output is the input
  zero-padded by p (black) and cropped at an offset in [0, 2p]^2."""
  images = _images()
  out = np.asarray(pp.pad_crop(jax.random.PRNGKey(0), jnp.asarray(images), 2))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = []
  for i in range(len(images)):
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(padded[i, dy:dy + 5, dx:dx + 5], out[i])]
    assert matches, f"image {i} is not a crop of its padded input"
    offsets.append(matches[0])
  assert len(set(offsets)) > 1  # per-example offsets


def test_flip_mirrors_about_half_of_the_images():
  images = np.tile(np.arange(4, dtype=np.float32)[None, None, :, None] / 4, (400, 2, 1, 1))
  out = np.asarray(pp.flip(jax.random.PRNGKey(1), jnp.asarray(images)))
  flipped = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(out == images, axis=(1, 2, 3))
  assert np.all(flipped ^ kept)
  assert 150 < flipped.sum() < 250


@pytest.mark.parametrize("chain", ["pad_crop(4)|flip", "s1", "flip_ud|clip", "pad_crop(2)"])
def test_chains_are_deterministic_per_key_and_keep_shape_and_range(chain):
  fn = jax.jit(pp.build(chain))
  x = jnp.asarray(_images(16, 8, 8, 3))
  a, b = fn(jax.random.PRNGKey(3), x), fn(jax.random.PRNGKey(3), x)
  c = fn(jax.random.PRNGKey(4), x)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == x.shape and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_presets_and_empty_chains():
  assert pp.split_chain("s1") == ["pad_crop(4)", "flip"]
  assert pp.split_chain("") == [] and pp.split_chain("none") == []
  x = jnp.asarray(_images())
  np.testing.assert_array_equal(pp.build("")(jax.random.PRNGKey(0), x), x)


def test_to_unit_range():
  x = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(np.asarray(pp.to_unit_range(x)).ravel(), [0.0, 1.0])


def test_bad_chains_are_named():
  with pytest.raises(RegistryError, match=r"streams.train.pp: unknown pp op 'fllip' \(did "
                                          r"you mean 'flip'"):
    pp.build("pad_crop(4)|fllip", where="config.streams.train.pp")
  with pytest.raises(RegistryError, match="unknown option"):
    pp.build("pad_crop(pad=4)")
  with pytest.raises(RegistryError, match="padding must be a non-negative integer"):
    pp.build("pad_crop(-1)", where="config.streams.train.pp")
