"""FGSM against a closed-form gradient, the ε-ball and [0, 1] box, and the
registered perturbation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import attacks
from jaxrobust.registry import RegistryError

RNG = np.random.default_rng(0)
W = RNG.normal(size=(12, 4)).astype(np.float64)
B = RNG.normal(size=4)
X = RNG.uniform(0, 1, size=(16, 12))
Y = RNG.integers(0, 4, 16)


def _np_fgsm(x, y, eps):
  """FGSM on a linear softmax model: d CE / d x = W (softmax(xW + b) - onehot(y))."""
  z = x @ W + B
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = (p - np.eye(4)[y]) @ W.T
  return np.clip(x + eps * np.sign(grad), 0, 1)


def _loss(x, y):
  logits = x @ jnp.asarray(W) + jnp.asarray(B)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def test_fgsm_matches_the_closed_form_gradient():
  with jax.enable_x64(True):
    out = attacks.fgsm(_loss, jnp.asarray(X), jnp.asarray(Y), eps=0.03)
    np.testing.assert_allclose(np.asarray(out), _np_fgsm(X, Y, 0.03), atol=1e-6)


def test_fgsm_stays_in_the_eps_ball_and_the_box():
  out = np.asarray(attacks.fgsm(_loss, jnp.asarray(X, jnp.float32), jnp.asarray(Y), eps=8 / 255))
  assert np.all(np.abs(out - X) <= 8 / 255 + 1e-6)
  assert out.min() >= 0 and out.max() <= 1
  assert np.all(_loss(jnp.asarray(out), jnp.asarray(Y)) >= _loss(jnp.asarray(X, jnp.float32),
                                                                  jnp.asarray(Y)) - 1e-5)


def test_registered_perturbation_uses_the_context():
  ctx = attacks.PerturbContext(
      logits_fn=lambda x: x @ jnp.asarray(W, jnp.float32) + jnp.asarray(B, jnp.float32),
      x=jnp.asarray(X, jnp.float32), labels=jnp.asarray(Y), mask=jnp.ones(16, bool),
      rng=jax.random.PRNGKey(0), num_classes=4)
  fn = attacks.build("fgsm(eps=0.03)")
  np.testing.assert_allclose(np.asarray(fn(ctx)), _np_fgsm(X, Y, 0.03), atol=1e-5)
  # Masked or unlabelled examples are not attacked.
  masked = ctx.__class__(**{**ctx.__dict__, "mask": jnp.zeros(16, bool)})
  np.testing.assert_allclose(np.asarray(fn(masked)), X, atol=1e-6)


def test_bad_options_are_named():
  with pytest.raises(RegistryError, match=r"streams.train.perturb: perturbation 'fgsm': eps "
                                          r"must be >= 0"):
    attacks.build("fgsm(eps=-0.1)", where="config.streams.train.perturb")
  with pytest.raises(RegistryError, match="labels must be 'true' or 'predicted'"):
    attacks.build("fgsm(labels='gold')")
  with pytest.raises(RegistryError, match="unknown perturbation 'fsgm'.*'fgsm'"):
    attacks.build("fsgm")
