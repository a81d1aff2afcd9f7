"""ArcFace: logits and gradients against arcface-pytorch ports, m = 0 limit, the head and term."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrobust import losses as losses_lib
from jaxrobust.methods import arcface as af
from jaxrobust.models import heads as heads_lib
from jaxrobust.registry import RegistryError
from tests import reference_arcface as ref


def _data(seed=0, b=8, d=5, k=4):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(b, d)).astype(np.float32)
  w = rng.normal(size=(d, k)).astype(np.float32)
  y = rng.integers(0, k, size=b)
  f[0] = -w[:, y[0]] * 3  # θ = π: the θ + m > π fallback
  f[1] = w[:, y[1]] * 2  # θ = 0
  return f, w, y


@pytest.mark.parametrize("m,easy", [(0.5, False), (0.3, False), (0.5, True)])
def test_logits_match_reference(m, easy):
  f, w, y = _data()
  y[2] = -1
  got = af.arcface_logits(f, w, y, s=64.0, m=m, easy_margin=easy)
  want = ref.arcface_logits_np(f, w, y, s=64.0, m=m, easy_margin=easy)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=1e-4)
  # the fallback branch was exercised: θ = π gives cos θ - mm on the target
  if not easy:
    assert got[0, y[0]] == pytest.approx(64 * (-1 - math.sin(math.pi - m) * m), abs=1e-3)


def test_gradients_match_torch_autograd():
  f, w, y = _data(1)
  f[1] = f[1] + 0.1  # keep away from θ = 0, where the reference's gradient is infinite
  loss, g = jax.value_and_grad(lambda a, b: af.arcface_loss(a, b, y, s=16.0, m=0.5),
                               argnums=(0, 1))(jnp.asarray(f), jnp.asarray(w))
  t_loss, t_gf, t_gw = ref.arcface_loss_torch(f, w, y, s=16.0, m=0.5)
  assert float(loss) == pytest.approx(t_loss, rel=1e-4)
  np.testing.assert_allclose(np.asarray(g[0]), t_gf, atol=2e-4, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(g[1]), t_gw, atol=2e-4, rtol=1e-3)


def test_gradient_finite_at_zero_angle():
  w = np.eye(3, dtype=np.float32)
  f = w[:, :2].T.copy()  # cos θ_y = 1 exactly
  g = jax.grad(lambda a: af.arcface_loss(a, w, np.array([0, 1]), s=8.0, m=0.5))(jnp.asarray(f))
  assert np.all(np.isfinite(np.asarray(g)))


def test_zero_margin_is_normalised_softmax():
  f, w, y = _data(2)
  got = af.arcface_loss(f, w, y, s=10.0, m=0.0)
  cos = ref._normalize(f.astype(np.float64), 1) @ ref._normalize(w.astype(np.float64), 0)
  want = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(10 * cos), jnp.asarray(y))
  assert float(got) == pytest.approx(float(want.mean()), rel=1e-5)
  assert float(af.arcface_loss(f, w, y, s=10.0, m=0.5)) > float(got)  # a margin costs


def test_mask_and_unlabelled_rows():
  f, w, y = _data(3)
  mask = np.array([True] * 4 + [False] * 4)
  full = af.arcface_loss(f[:4], w, y[:4], s=8.0, m=0.5)
  assert float(af.arcface_loss(f, w, y, mask, s=8.0, m=0.5)) == pytest.approx(float(full),
                                                                                rel=1e-6)
  y2 = y.copy()
  y2[4:] = -1
  assert float(af.arcface_loss(f, w, y2, s=8.0, m=0.5)) == pytest.approx(float(full), rel=1e-6)


def test_head_and_loss_term():
  specs = heads_lib.build_specs({"arcface": "arcface(features=4)"})
  head = dict(specs[0][1])["cls"](features=4)
  f, w, y = _data(4)
  variables = head.init(jax.random.PRNGKey(0), jnp.asarray(f), False)
  assert variables["params"]["kernel"].shape == (5, 4)
  cos = head.apply(variables, jnp.asarray(f), False)
  assert float(jnp.max(jnp.abs(cos))) <= 1.0 + 1e-6
  terms = losses_lib.build_terms({"arcface": dict(s=8.0, m=0.5)}, num_classes=4,
                                 streams=["train"])
  mask = np.ones(8, bool)
  inputs = losses_lib.LossInputs(
      outputs={"train": {"logits": jnp.zeros((8, 4)), "features": jnp.asarray(f)}},
      batch={"train": {"label": jnp.asarray(y), "mask": jnp.asarray(mask)}}, num_classes=4,
      params={"heads": {"arcface": {"kernel": jnp.asarray(w)}}}, rng=jax.random.PRNGKey(0),
      step=jnp.zeros((), jnp.int32))
  value, metrics = losses_lib.compose(terms)(inputs)
  assert float(value) == pytest.approx(float(af.arcface_loss(f, w, y, s=8.0, m=0.5)), rel=1e-6)
  assert "train/arcface_accuracy" in metrics
  bare = dataclasses_replace(inputs, params={})
  with pytest.raises(RegistryError, match="arcface_head"):
    losses_lib.compose(terms)(bare)


def dataclasses_replace(x, **kw):
  import dataclasses
  return dataclasses.replace(x, **kw)


@pytest.mark.parametrize("opts,key", [(dict(m=-0.1), "m"), (dict(s=0.0), "s"),
                                      (dict(s=-1.0), "s")])
def test_bad_scale_or_margin(opts, key):
  with pytest.raises(RegistryError, match=rf"config\.losses\.arc.*\b{key} \("):
    losses_lib.build_terms({"arc": dict(name="arcface", **opts)}, num_classes=4)
  with pytest.raises(RegistryError, match=rf"\b{key} \("):
    af.arcface_logits(np.ones((1, 2)), np.ones((2, 3)), np.zeros(1, int), **{"s": 1.0, **opts})
