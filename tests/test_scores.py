"""OOD scores: higher = more in-distribution, numpy references, jittable."""

import jax
import numpy as np
import pytest

from jaxrobust import scores
from jaxrobust.registry import RegistryError

RNG = np.random.default_rng(0)
LOGITS = (RNG.normal(size=(32, 7)) * 3).astype(np.float32)


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("t", [1.0, 10.0])
def test_scores_match_numpy(t):
  z = LOGITS.astype(np.float64)
  np.testing.assert_allclose(scores.msp(LOGITS, t), _np_softmax(z / t).max(-1), rtol=1e-5)
  np.testing.assert_allclose(scores.max_logit(LOGITS), z.max(-1), rtol=1e-6)
  lse = np.log(np.exp(z / t - (z / t).max(-1, keepdims=True)).sum(-1)) + (z / t).max(-1)
  np.testing.assert_allclose(scores.energy(LOGITS, t), t * lse, rtol=1e-5)  # -E(x; T)
  p = _np_softmax(z / t)
  np.testing.assert_allclose(scores.entropy(LOGITS, t), (p * np.log(p)).sum(-1), rtol=1e-4,
                             atol=1e-6)


def test_higher_means_in_distribution():
  """A confident (peaked) prediction scores higher than a flat one with every score."""
  peaked = np.array([[10.0, 0, 0, 0]], np.float32)
  flat = np.zeros((1, 4), np.float32)
  for name in ("msp", "max_logit", "energy", "entropy"):
    fn = scores.build(name)
    assert float(fn(peaked)[0]) > float(fn(flat)[0]), name


def test_entropy_bounds_and_energy_is_negative_free_energy():
  flat = np.zeros((1, 5), np.float32)
  np.testing.assert_allclose(scores.entropy(flat), -np.log(5), rtol=1e-6)
  np.testing.assert_allclose(scores.energy(flat), np.log(5), rtol=1e-6)


def test_scores_jit_and_build_from_specs():
  fn = scores.build("energy(temperature=2)")
  assert fn.name == "energy" and fn.perturb is None and fn.fit is None
  np.testing.assert_allclose(jax.jit(fn)(LOGITS), scores.energy(LOGITS, 2.0), rtol=1e-6)
  with pytest.raises(RegistryError, match="temperature must be > 0"):
    scores.build("msp(temperature=0)")
  with pytest.raises(RegistryError, match="unknown OOD score 'enrgy'.*'energy'"):
    scores.build("enrgy")
