"""Tests of the model zoo: architecture sizes, call contract, BatchNorm/dropout modes,
data-parallel BatchNorm, registry errors, and a numpy port of the reference WRN."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrobust import models
from jaxrobust.models import get_model, layers, list_models, register_model, registry, resnet

TINY_WRN = dict(depth=10, width=1)  # 1 block per group, widths 16/32/64


def _images(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _init_shapes(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny_wrn():
  model = get_model("wrn", num_classes=7, **TINY_WRN)
  x = _images((2, 16, 16, 3))
  # Jitted: one compilation instead of one per operation (seconds on 2 cores).
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  return model, variables


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name, num_classes, shape, kwargs, expected", [
    # Hendrycks et al. CIFAR WRN-40-2 (outlier-exposure / pre-training code).
    ("wrn_40_2", 10, (1, 32, 32, 3), {}, 2_243_546),
    ("wrn_28_10", 10, (1, 32, 32, 3), {}, 36_479_194),
    ("wrn", 10, (1, 32, 32, 3), dict(depth=40, width=2, dropout_rate=0.3), 2_243_546),
    # torchvision resnet50.
    ("resnet50", 1000, (1, 224, 224, 3), {}, 25_557_032),
    # torchvision resnet101: ResNet(Bottleneck, [3, 4, 23, 3]).
    ("resnet50", 1000, (1, 224, 224, 3), dict(layers=(3, 4, 23, 3)), 44_549_160),
    # He et al. 2016 with the final BN-ReLU; pytorch-cifar PreActResNet18 without it.
    ("preact_resnet18", 10, (1, 32, 32, 3), {}, 11_172_170),
    ("preact_resnet18", 10, (1, 32, 32, 3), dict(final_norm=False), 11_171_146),
    ("small_cnn", 10, (1, 32, 32, 1), {}, 65_834),
])
def test_parameter_counts(name, num_classes, shape, kwargs, expected):
  variables = _init_shapes(get_model(name, num_classes=num_classes, **kwargs), shape)
  assert _count(variables["params"]) == expected
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


@pytest.mark.parametrize("name, kwargs, sizes, channels, feat_dim", [
    ("wrn", TINY_WRN, (16, 32, 64), 3, 64),
    ("wrn_40_2", {}, (32,), 3, 128),
    ("wrn_28_10", {}, (32,), 3, 640),
    ("preact_resnet18", {}, (16, 32), 3, 512),
    ("resnet50", {}, (64, 224), 3, 2048),
    ("small_cnn", {}, (32, 28), 1, 64),
])
def test_output_and_feature_shapes(name, kwargs, sizes, channels, feat_dim):
  model = get_model(name, num_classes=5, **kwargs)
  variables = _init_shapes(model, (1, sizes[0], sizes[0], channels))
  for size in sizes:
    x = jax.ShapeDtypeStruct((3, size, size, channels), jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    logits, feats = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, return_features=True), variables, x)
    assert feats.shape == (3, feat_dim) and feats.dtype == jnp.float32
    assert variables["params"]["head"]["kernel"].shape == (feat_dim, 5)


def test_resnet50_stage_resolutions():
  model = get_model("resnet50", num_classes=10)
  variables = _init_shapes(model, (1, 224, 224, 3))
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True), variables, x)
  inter = state["intermediates"]
  # torchvision: 56x56x256, 28x28x512, 14x14x1024, 7x7x2048 after each stage.
  for stage, blocks, (hw, c) in zip(range(1, 5), (3, 4, 6, 3),
                                    [(56, 256), (28, 512), (14, 1024), (7, 2048)]):
    assert inter[f"layer{stage}_block{blocks}"]["__call__"][0].shape == (1, hw, hw, c)
  assert inter["conv1"]["__call__"][0].shape == (1, 112, 112, 64)


@pytest.mark.parametrize("layers", [(3, 4, 6), (3, 4, 0, 3), (1.5, 1, 1, 1)])
def test_resnet_layers_are_checked(layers):
  with pytest.raises(ValueError, match=r"layers must be four block counts.*model.kwargs.layers"):
    _init_shapes(get_model("resnet50", num_classes=10, layers=layers), (1, 32, 32, 3))


@pytest.mark.parametrize("zero_init", [False, True])
def test_zero_init_residual(zero_init):
  assert get_model("resnet50", num_classes=10, zero_init_residual=zero_init).zero_init_residual \
      == zero_init
  block = resnet.Bottleneck(8, 2, zero_init, jnp.float32, None)
  params = block.init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)), train=False)["params"]
  np.testing.assert_array_equal(params["bn3"]["scale"], 0.0 if zero_init else 1.0)
  np.testing.assert_array_equal(params["bn2"]["scale"], 1.0)
  assert params["conv2"]["kernel"].shape == (3, 3, 8, 8)
  assert params["downsample_conv"]["kernel"].shape == (1, 1, 16, 32)


# ---------------------------------------------------------- reference numerics

def _np_conv(x, kernel, stride):
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[1] + 2 * pad - k) // stride + 1
  wo = (x.shape[2] + 2 * pad - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ kernel[i, j]
  return out


def _np_wrn_forward(params, stats, x, depth, train):
  """numpy port of hendrycks CIFAR/models/wrn.py forward (BN: PyTorch's update
  rule -- the running variance from the unbiased batch variance)."""
  new_stats = {}

  def bn(path, x):
    p, s = params, stats
    for k in path:
      p, s = p[k], s[k]
    if train:
      mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
      _set(new_stats, path, {"mean": 0.9 * s["mean"] + 0.1 * mean,
                             "var": 0.9 * s["var"] + 0.1 * x.var((0, 1, 2), ddof=1)})
    else:
      mean, var = s["mean"], s["var"]
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

  relu = lambda a: np.maximum(a, 0.0)
  out = _np_conv(x, params["stem"]["kernel"], 1)
  n = (depth - 4) // 6
  for g, stride in zip((1, 2, 3), (1, 2, 2)):
    for b in range(1, n + 1):
      name = f"group{g}_block{b}"
      blk = params[name]
      s = stride if b == 1 else 1
      equal_in_out = out.shape[-1] == blk["conv1"]["kernel"].shape[-1]
      pre = relu(bn((name, "bn1"), out))
      y = relu(bn((name, "bn2"), _np_conv(pre, blk["conv1"]["kernel"], s)))
      y = _np_conv(y, blk["conv2"]["kernel"], 1)
      out = (out if equal_in_out else _np_conv(pre, blk["shortcut"]["kernel"], s)) + y
  feats = relu(bn(("bn",), out)).mean((1, 2))
  return feats @ params["head"]["kernel"] + params["head"]["bias"], feats, new_stats


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_wrn_matches_numpy_port_of_reference(train):
  # depth 16, width 1: identity blocks (16 -> 16) and projection blocks (16 -> 32).
  model = get_model("wrn", num_classes=5, depth=16, width=1)
  x = _images((4, 8, 8, 3))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
  # Non-trivial BN parameters and running statistics.
  rng = np.random.RandomState(2)
  variables = jax.tree.map(
      lambda a: a + 0.1 * rng.rand(*a.shape).astype(np.float32) if a.ndim == 1 else a, variables)
  np_vars = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  ref_logits, ref_feats, ref_stats = _np_wrn_forward(
      np_vars["params"], np_vars["batch_stats"], np.asarray(x, np.float64), 16, train)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=train, return_features=True,
                                           mutable=["batch_stats"]))
  (logits, feats), state = apply(variables, x)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats, ref_feats, rtol=1e-4, atol=1e-4)
  if train:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 state["batch_stats"], ref_stats)
  assert "shortcut" not in variables["params"]["group1_block1"]
  assert "shortcut" in variables["params"]["group2_block1"]


@pytest.mark.slow
def test_pytorch_initialisation(tiny_wrn):
  conv = layers.conv(512, 3, dtype=jnp.float32)
  kernel = np.asarray(conv.init(jax.random.key(0), jnp.zeros((1, 3, 3, 512)))["params"]["kernel"])
  assert kernel.shape == (3, 3, 512, 512)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 512)), rtol=0.01)
  assert abs(kernel.mean()) < 1e-4
  head = nn.Dense(10, kernel_init=layers.torch_linear_init).init(
      jax.random.key(1), jnp.zeros((1, 4096)))["params"]["kernel"]
  assert 0.99 / 64 < np.abs(head).max() <= 1 / 64  # uniform(+-1/sqrt(fan_in))
  bias = layers.torch_linear_bias_init(4096)(jax.random.key(2), (1000,))
  assert 0.99 / 64 < np.abs(bias).max() <= 1 / 64
  _, variables = tiny_wrn
  params = variables["params"]
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)  # WRN zeroes the head bias
  np.testing.assert_array_equal(params["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(params["bn"]["bias"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["var"], 1.0)
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], 0.0)


# ------------------------------------------------------------------ call contract

def test_return_features_logits_equal_plain(tiny_wrn):
  model, variables = tiny_wrn
  x = _images((3, 16, 16, 3))
  plain = model.apply(variables, x, train=False)
  logits, feats = model.apply(variables, x, train=False, return_features=True)
  np.testing.assert_array_equal(plain, logits)
  head = variables["params"]["head"]
  np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5)


def test_batchnorm_train_vs_eval(tiny_wrn):
  model, variables = tiny_wrn
  x = _images((4, 16, 16, 3), seed=3)
  eval_logits, eval_state = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, eval_state["batch_stats"], variables["batch_stats"])
  _, train_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), train_state["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Eval mode is per-example; train mode normalises with the batch statistics.
  np.testing.assert_allclose(model.apply(variables, x[:1], train=False), eval_logits[:1],
                             rtol=1e-5, atol=1e-5)
  train_one, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
  train_all, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(train_one, train_all[:2], atol=1e-3)
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, x, train=True)  # batch_stats must be mutable in train mode


@pytest.mark.slow
def test_dropout_only_in_train():
  model = get_model("wrn", num_classes=3, dropout_rate=0.5, **TINY_WRN)
  x = _images((2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  a = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(a, model.apply(variables, x, train=False))
  run = lambda seed: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(seed)})[0]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2), atol=1e-4)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])
  no_dropout = get_model("wrn", num_classes=3, **TINY_WRN)
  b1 = no_dropout.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  b2 = no_dropout.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  np.testing.assert_array_equal(b1, b2)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = get_model("small_cnn", num_classes=4, dtype=jnp.bfloat16)
  x = _images((2, 32, 32, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  (logits, feats), state = model.apply(variables, x, train=True, return_features=True,
                                       mutable=["batch_stats"])
  assert logits.dtype == jnp.float32 and feats.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))
  ref = get_model("small_cnn", num_classes=4).apply(variables, x, train=False)
  np.testing.assert_allclose(model.apply(variables, x, train=False), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n.startswith("cmt") else n  # 6-13 s each
    for n in list_models() if registry.has_classes(n)])
def test_head_can_be_swapped_for_new_classes(name):
  channels = 1 if name == "small_cnn" else 3
  # VGG's classifier takes 32x32 inputs only; CMT multiples of 32 (16 for cmt_ti_32).
  size = 32 if name.startswith(("vgg", "cmt")) else 16
  x = _images((2, size, size, channels))
  source = get_model(name, num_classes=10)
  target = get_model(name, num_classes=3)
  src_vars = _init_shapes(source, x.shape)
  tgt_head = _init_shapes(target, x.shape)["params"]["head"]
  params = dict(src_vars["params"], head=tgt_head)
  out = jax.eval_shape(lambda p, s: target.apply({"params": p, "batch_stats": s}, x, train=False),
                       params, src_vars.get("batch_stats", {}))
  assert out.shape == (2, 3)
  assert set(src_vars["params"]["head"]) == {"kernel", "bias"}


# -------------------------------------------------------------------- bad input

@pytest.mark.parametrize("shape, dtype, error, match", [
    ((2, 3, 16, 16), jnp.float32, ValueError, "NCHW"),
    ((16, 16, 3), jnp.float32, ValueError, "rank 4"),
    ((2, 1, 16, 16, 3), jnp.float32, ValueError, "rank 4"),
    ((2, 16, 16, 3), jnp.uint8, TypeError, "floating-point"),
])
def test_bad_input_raises(tiny_wrn, shape, dtype, error, match):
  model, variables = tiny_wrn
  with pytest.raises(error, match=match):
    model.apply(variables, jnp.zeros(shape, dtype), train=False)


def test_bad_architecture_arguments():
  with pytest.raises(ValueError, match="6n\\+4"):
    _init_shapes(get_model("wrn", num_classes=10, depth=12), (1, 8, 8, 3))
  with pytest.raises(ValueError, match="stage_widths"):
    _init_shapes(get_model("small_cnn", num_classes=10, stage_widths=()), (1, 8, 8, 1))


# ---------------------------------------------------------------------- registry

def test_registry_lists_and_builds():
  assert {"wrn", "wrn_40_2", "wrn_28_10", "preact_resnet18", "resnet50",
          "small_cnn", "vgg13", "vgg13_bn", "dcgan_generator",
          "dcgan_discriminator"} <= set(list_models())
  model = get_model("wrn_40_2", num_classes=100, dropout_rate=0.3, bn_axis_name="batch")
  assert isinstance(model, models.WideResNet)
  assert (model.depth, model.width, model.dropout_rate, model.num_classes,
          model.bn_axis_name) == (40, 2, 0.3, 100, "batch")
  assert get_model("wrn_28_10", num_classes=10).width == 10


def test_registry_errors():
  with pytest.raises(ValueError, match="did you mean 'wrn_40_2'"):
    get_model("wrn_40-2", num_classes=10)
  with pytest.raises(ValueError, match="known: .*resnet50"):
    get_model("vgg16", num_classes=10)
  with pytest.raises(ValueError, match=r"'wrn'.*\['widen_factor'\]"):
    get_model("wrn", num_classes=10, widen_factor=2)
  with pytest.raises(ValueError, match=r"'wrn_40_2' fixes \['depth'\]"):
    get_model("wrn_40_2", num_classes=10, depth=28)
  with pytest.raises(ValueError, match="num_classes"):
    get_model("small_cnn", num_classes=0)
  with pytest.raises(ValueError, match="already registered"):
    register_model("small_cnn")(models.SmallCNN)


def test_register_custom_model():
  @register_model("_test_linear", hidden=4)
  class Linear(layers.ImageClassifier):
    hidden: int = 8

    @nn.compact
    def __call__(self, x, *, train, return_features=False):
      feats = nn.Dense(self.hidden)(x.reshape(x.shape[0], -1))
      return layers.classify(feats, self.num_classes, dtype=self.dtype,
                             return_features=return_features)

  try:
    model = get_model("_test_linear", num_classes=2)
    assert model.hidden == 4 and "_test_linear" in list_models()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)
    assert variables["params"]["head"]["kernel"].shape == (4, 2)
  finally:
    registry.MODELS.unregister("_test_linear")


# -------------------------------------------------------- data-parallel BatchNorm

def _train_apply(model, variables, x):
  return model.apply(variables, x, train=True, mutable=["batch_stats"])


@pytest.mark.slow
def test_batchnorm_sharded_jit_equals_single_device():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
  model = get_model("wrn", num_classes=5, **TINY_WRN)
  x = _images((16, 8, 8, 3), seed=4) * 2 + 1
  variables = model.init(jax.random.key(0), x[:2], train=False)
  fn = jax.jit(lambda v, x: _train_apply(model, v, x))
  ref_logits, ref_state = fn(variables, x)
  mesh = jax.make_mesh((8,), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  vs = jax.device_put(variables, NamedSharding(mesh, P()))
  logits, state = fn(vs, xs)
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               state["batch_stats"], ref_state["batch_stats"])


@pytest.mark.slow
def test_batchnorm_pmap_with_axis_name_equals_single_device():
  ndev = jax.device_count()
  x = _images((2 * ndev, 8, 8, 3), seed=5) * 2 + 1
  model = get_model("wrn", num_classes=5, **TINY_WRN)
  variables = model.init(jax.random.key(0), x[:2], train=False)
  ref_logits, ref_state = jax.jit(lambda v, x: _train_apply(model, v, x))(variables, x)

  pmodel = get_model("wrn", num_classes=5, bn_axis_name="batch", **TINY_WRN)
  stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (ndev,) + a.shape), variables)
  logits, state = jax.pmap(lambda v, x: _train_apply(pmodel, v, x), axis_name="batch")(
      stacked, x.reshape(ndev, 2, *x.shape[1:]))
  np.testing.assert_allclose(np.asarray(logits).reshape(ref_logits.shape), ref_logits,
                             rtol=1e-5, atol=1e-5)
  for d in range(ndev):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[d], b, rtol=1e-5, atol=1e-5),
                 state["batch_stats"], ref_state["batch_stats"])
  # Without the axis name each device would use its own 2-image statistics.
  _, local = jax.pmap(lambda v, x: _train_apply(model, v, x), axis_name="batch")(
      stacked, x.reshape(ndev, 2, *x.shape[1:]))
  assert not np.allclose(local["batch_stats"]["bn"]["mean"][0],
                         ref_state["batch_stats"]["bn"]["mean"], atol=1e-4)


def test_max_pool_2x2_equals_flax_max_pool_including_odd_sizes():
  import flax.linen as nn
  from jaxrobust.models.layers import max_pool_2x2
  rng = np.random.default_rng(0)
  for shape in [(2, 8, 8, 3), (1, 7, 9, 2)]:
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  # Without ties the gradients agree too (one maximum per window).
  x = jnp.asarray(rng.permutation(2 * 8 * 8 * 3).reshape(2, 8, 8, 3).astype(np.float32))
  g1 = jax.grad(lambda v: jnp.sum(max_pool_2x2(v) ** 2))(x)
  g2 = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) ** 2))(x)
  np.testing.assert_allclose(g1, g2)
