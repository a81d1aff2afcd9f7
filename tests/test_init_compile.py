"""The initialisation program compiled with :func:`train_state.init_compiler_options`
(LLVM -O1 on CPU, for a faster compile) gives bitwise the same parameters as
XLA's default (-O3): for every kind of initialiser the models and heads use,
and for models built from the registry, initialised as ``Module.init`` does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxrobust import sharding
from jaxrobust import train_state as state_lib
from jaxrobust.models import registry

CPU_MESH = jax.sharding.Mesh(np.asarray(jax.devices("cpu")), ("data",))


def _both(fn, *args):
  """``fn(*args)`` compiled with XLA's defaults and with the init options."""
  options = state_lib.init_compiler_options(CPU_MESH)
  assert options == {"xla_backend_optimization_level": 1}
  out = sharding.replicated(CPU_MESH)
  default = jax.jit(fn, out_shardings=out)(*args)
  # A different function object: jit would otherwise serve the same executable.
  fast = jax.jit(lambda *a: fn(*a), out_shardings=out, compiler_options=options)(*args)
  return default, fast


def _assert_bitwise(a, b) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


INITIALIZERS = {
    "torch_conv (variance scaling, fan_out, normal)":
        jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    "torch_linear (variance scaling, fan_in, uniform)":
        jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
    "lecun_normal (flax Dense default, truncated normal)": nn.initializers.lecun_normal(),
    "normal(0.02)": nn.initializers.normal(0.02),
    "xavier_uniform": nn.initializers.xavier_uniform(),
}


def test_every_initializer_kind_is_bitwise_the_same():
  shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (64, 10), (7, 4)]

  def init(rng):
    return {name: [f(jax.random.fold_in(rng, i), s) for i, s in enumerate(shapes)]
            for name, f in INITIALIZERS.items()}
  _assert_bitwise(*_both(init, jax.random.PRNGKey(7)))


@pytest.mark.parametrize("name,kwargs,shape", [
    ("wrn", dict(depth=10, width=1, dropout_rate=0.3), (32, 32, 3)),
    ("small_cnn", dict(stage_widths=((8,), (16,))), (28, 28, 1)),
    ("dcgan_discriminator", dict(ndf=8), (32, 32, 3)),
])
def test_registered_models_initialise_bitwise_the_same(name, kwargs, shape):
  model = registry.get_model(name, num_classes=10 if registry.has_classes(name) else None,
                             **kwargs)
  x = jnp.zeros((1,) + shape)

  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    return model.init({"params": params_rng, "dropout": dropout_rng}, x, train=False)
  _assert_bitwise(*_both(init, jax.random.PRNGKey(3)))


def test_other_platforms_keep_their_defaults():
  class _Device:
    platform = "tpu"

  mesh = type("Mesh", (), {"devices": np.asarray([_Device()] * 4)})()
  assert state_lib.init_compiler_options(mesh) is None
