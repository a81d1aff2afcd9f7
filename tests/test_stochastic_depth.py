"""Tests of stochastic depth (Huang et al. 2016; the Noisy Student students'
"drop connect"): the shared ``layers.drop_path`` / ``StochasticDepth``, the per-block
rule ``rate * i / N``, and its use in WRN, the ResNets and EfficientNet.

Statistical checks draw from fixed keys (deterministic) and allow 4 binomial
standard deviations, so a correct implementation fails with probability < 1e-4
per check for an arbitrary key."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.models import efficientnet, get_model, layers, resnet

# name, kwargs, input shape (one image), number of residual blocks N.
MODELS = [
    ("wrn", dict(depth=10, width=1), (8, 8, 3), 3),
    ("preact_resnet18", {}, (4, 4, 3), 8),
    ("resnet50", {}, (16, 16, 3), 16),
    # 10 blocks, identity skips (the only ones that drop) at blocks 0, 1, 4, 6, 8.
    ("efficientnet", dict(width_coefficient=0.25, depth_coefficient=0.5, small_image_model=True,
                          dropout_rate=0.0), (16, 16, 3), 10),
]
MODEL_IDS = [m[0] for m in MODELS]
# Compiling a model's train pass takes seconds: the development tier keeps the WRN case.
WRN_FAST = [pytest.param(*m, id=m[0], marks=() if m[0] == "wrn" else pytest.mark.slow)
            for m in MODELS]


def _random_variables(model, shape, seed=0):
  """Variables with He-scaled random kernels (no init compile: the statistics
  below do not depend on the initialisation)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape),
                                             train=False))
  rng = np.random.RandomState(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return np.full(s.shape, 1.0 if "var" in name else 0.0, np.float32)
    if len(s.shape) == 1:
      return (("scale" in name) + 0.1 * rng.randn(*s.shape)).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.randn(*s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _block_order(names):
  """Residual block names in network order ('layer2_block10' after 'layer2_block9')."""
  return sorted((n for n in names if "block" in n),
                key=lambda n: [int(t) for t in re.findall(r"\d+", n)])


def _images(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


# ------------------------------------------------------------------ the rule

def test_per_block_rate_rule():
  rates = [layers.stochastic_depth_rate(0.2, i, 16) for i in range(16)]
  np.testing.assert_allclose(rates, 0.2 * np.arange(16) / 16)
  assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1875)  # EfficientNet-B0 default


# ------------------------------------------------------------ drop_path itself

@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_drop_path_is_per_example_and_unbiased(rate):
  n = 20_000
  x = jnp.broadcast_to(jnp.arange(1.0, 7.0).reshape(1, 3, 2), (n, 3, 2))
  out = np.asarray(jax.jit(lambda x, k: layers.drop_path(x, rate, k))(x, jax.random.key(0)))
  kept = np.all(out == np.asarray(x[:1]) / (1 - rate), axis=(1, 2))
  dropped = np.all(out == 0.0, axis=(1, 2))
  assert np.all(kept ^ dropped)  # one draw per example; kept paths scaled by 1/(1-rate)
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(dropped.mean() - rate) < 4 * sigma
  # Expectation preserved: mean of (mask / keep) is 1 within 4 sigma.
  np.testing.assert_allclose(out.mean(axis=0), x[0], rtol=4 * sigma / (1 - rate))
  assert layers.drop_path(x[:4].astype(jnp.bfloat16), rate, jax.random.key(1)).dtype == \
      jnp.bfloat16


def test_stochastic_depth_module_modes():
  x = _images((64, 4, 4, 2))
  module = layers.StochasticDepth(0.5)
  # Eval mode and rate 0 are the identity and draw nothing (no rng given).
  np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(layers.StochasticDepth(0.0).apply({}, x, deterministic=False), x)
  with pytest.raises(Exception, match="dropout"):
    module.apply({}, x, deterministic=False)
  a = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(
      a, module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)}))
  assert 0 < int(np.all(np.asarray(a) == 0, axis=(1, 2, 3)).sum()) < 64
  for bad in (1.0, -0.1, 1.5, True, "0.1"):
    with pytest.raises(ValueError, match=r"rate must be a float in \[0, 1\)"):
      layers.StochasticDepth(bad).apply({}, x, deterministic=True)


# --------------------------------------------------------------- the models

@pytest.mark.parametrize("name, kwargs, shape, num_blocks", MODELS, ids=MODEL_IDS)
def test_rate_zero_leaves_the_model_unchanged(name, kwargs, shape, num_blocks):
  default = get_model(name, num_classes=5, **kwargs)
  off = get_model(name, num_classes=5, **{**kwargs, "stochastic_depth_rate": 0.0})
  on = get_model(name, num_classes=5, **{**kwargs, "stochastic_depth_rate": 0.3})
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  init = lambda m: jax.eval_shape(
      lambda: m.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  shapes = {off: init(off), on: init(on)}
  # Stochastic depth adds no variables.
  assert jax.tree.structure(shapes[off]) == jax.tree.structure(shapes[on])
  assert jax.tree.map(lambda a: a.shape, shapes[off]) == jax.tree.map(lambda a: a.shape, shapes[on])
  # At rate 0 train mode draws no random numbers (a dropout-free model needs no rng).
  jax.eval_shape(lambda v, x: off.apply(v, x, train=True, mutable=["batch_stats"]),
                 shapes[off], x)
  if name != "efficientnet":  # EfficientNet's reference default is 0.2
    assert default.stochastic_depth_rate == 0.0
  else:
    assert default.stochastic_depth_rate == 0.2


@pytest.mark.slow
def test_eval_mode_is_the_identity():
  """WRN with dropout: rate 0.5 in eval mode gives the rate-0 output bit for bit
  (stochastic depth is the identity at eval); in train mode it changes it."""
  x = _images((4, 8, 8, 3), seed=1)
  make = lambda r: get_model("wrn", num_classes=5, depth=10, width=1, dropout_rate=0.3,
                             stochastic_depth_rate=r)
  base, half = make(0.0), make(0.5)
  variables = _random_variables(base, (8, 8, 3))

  @jax.jit
  def outputs(v, x):
    rngs = {"dropout": jax.random.key(5)}
    run = lambda m, train: m.apply(v, x, train=train, mutable=["batch_stats"], rngs=rngs)[0]
    return run(base, False), run(half, False), run(base, True), run(half, True)

  base_eval, half_eval, base_train, half_train = outputs(variables, x)
  np.testing.assert_array_equal(base_eval, half_eval)
  assert not np.allclose(base_train, half_train, atol=1e-4)


@pytest.mark.parametrize("name, kwargs, shape, num_blocks", WRN_FAST)
def test_drop_frequency_per_block(name, kwargs, shape, num_blocks):
  """Train mode, rate r = 0.6: block i drops its branch for a fraction r*i/N of
  the examples (4 binomial sigmas over batch x draws examples)."""
  rate = 0.6
  model = get_model(name, num_classes=5, **{**kwargs, "stochastic_depth_rate": rate})
  batch, draws = (128, 2) if name == "resnet50" else (256, 4)
  variables = _random_variables(model, shape)
  x = _images((batch,) + shape, seed=2)
  is_sd = lambda mdl, _: isinstance(mdl, layers.StochasticDepth)
  run = jax.jit(lambda v, x, k: model.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=is_sd,
      rngs={"dropout": k})[1]["intermediates"])
  dropped = {}
  for d in range(draws):
    inter = run(variables, x, jax.random.key(d))
    for block, sub in inter.items():
      out = np.asarray(sub["stochastic_depth"]["__call__"][0])
      dropped.setdefault(block, []).append(np.all(out == 0, axis=(1, 2, 3)))
  blocks = _block_order(variables["params"])
  assert len(blocks) == num_blocks
  if name == "efficientnet":  # only identity-skip blocks, and never block 0
    assert sorted(dropped, key=blocks.index) == ["blocks_1", "blocks_4", "blocks_6", "blocks_8"]
  else:  # every block but the first (rate 0)
    assert sorted(dropped, key=blocks.index) == blocks[1:]
  n = batch * draws
  for block, flags in dropped.items():
    p = rate * blocks.index(block) / num_blocks
    freq = np.concatenate(flags).mean()
    assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), (block, freq, p)
  last = max(dropped, key=blocks.index)
  assert np.concatenate(dropped[last]).mean() > 0.4  # last skip block: 0.6 * (N-1)/N or 0.48


# ------------------------------------------------ expectation, block by block

def _tiled_train(block, variables, x, k, rate_key):
  """Block applied in train mode to x tiled k times (same BN batch statistics as
  x alone), returning (output, intermediates) reshaped to [k, batch, ...]."""
  xs = jnp.tile(x, (k, 1, 1, 1))
  out, state = block.apply(variables, xs, train=True, capture_intermediates=True,
                           mutable=["batch_stats", "intermediates"],
                           rngs={"dropout": rate_key})
  split = lambda a: a.reshape((k,) + x.shape[:1] + a.shape[1:])
  return split(out), jax.tree.map(split, state["intermediates"])


@pytest.mark.parametrize("kind", ["preact_identity",
                                  pytest.param("preact_projection", marks=pytest.mark.slow),
                                  "bottleneck", pytest.param("mbconv", marks=pytest.mark.slow)])
def test_expectation_preserved_and_shortcut_kept(kind):
  """Mean over k draws of the train-mode block output (the residual sum, before
  the bottleneck's final ReLU) equals the rate-0 output: each example's branch is
  0 or branch / (1 - rate), and the shortcut is never dropped."""
  rate, k = 0.4, 2048
  x = _images((2, 4, 4, 16), seed=3)
  if kind.startswith("preact"):
    make = lambda r: layers.PreActBasicBlock(16 if kind == "preact_identity" else 32,
                                             1 if kind == "preact_identity" else 2, 0.0,
                                             jnp.float32, None, r)
    branch_name = "conv2"
  elif kind == "bottleneck":
    make = lambda r: resnet.Bottleneck(8, 2, False, jnp.float32, None, r)
    branch_name = "bn3"
  else:
    make = lambda r: efficientnet.MBConvBlock(3, 1, 6, 16, 16, 0.25, r, jnp.float32, None)
    branch_name = "project_bn"
  block, plain = make(rate), make(0.0)
  variables = jax.jit(lambda key: block.init(key, x, train=False))(
      jax.random.key(0, impl="unsafe_rbg"))
  fn = jax.jit(lambda v, x, key: _tiled_train(block, v, x, k, key))
  out, inter = fn(variables, x, jax.random.key(1))
  sd_out = inter["stochastic_depth"]["__call__"][0]
  branch = inter[branch_name]["__call__"][0]
  ref = jax.jit(lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"])[0])(
      variables, x)
  keep = 1 - rate
  dropped = np.all(np.asarray(sd_out) == 0, axis=(2, 3, 4))
  np.testing.assert_allclose(np.where(dropped[..., None, None, None], branch / keep, sd_out),
                             branch / keep, rtol=1e-5, atol=1e-6)
  sigma = np.sqrt(rate / (keep * k))  # std of mean(mask) / keep over k draws
  np.testing.assert_allclose(sd_out.mean(axis=0), branch[0], rtol=0,
                             atol=4 * sigma * float(np.abs(branch).max()))
  if kind == "bottleneck":  # out = relu(shortcut + branch): check before the ReLU
    return
  # Block output = rate-0 output - branch + dropped-or-scaled branch.
  np.testing.assert_allclose(out, ref[None] - branch + sd_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.mean(axis=0), ref, rtol=0,
                             atol=4 * sigma * float(np.abs(branch).max()) + 1e-5)


# -------------------------------------------------------------- bad rates

@pytest.mark.parametrize("name, kwargs, shape, num_blocks", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("rate", [1.0, -0.1, 2.0])
def test_rate_outside_unit_interval_raises(name, kwargs, shape, num_blocks, rate):
  model = get_model(name, num_classes=5, **{**kwargs, "stochastic_depth_rate": rate})
  with pytest.raises(ValueError, match=r"stochastic_depth_rate must be a float in \[0, 1\)"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False))
