"""Tests of EfficientNet-B0/B1/B2 against the Noisy Student TF reference
(google-research/noisystudent ``efficientnet_builder.py`` / ``efficientnet_model.py``):
parameter counts, block table and scaling, a numpy port of the MBConv block with TF
'SAME' padding, initialisation, train/eval modes, small images, bf16, bad attributes."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.models import efficientnet, get_model, layers
from jaxrobust.models.registry import RegistryError

# The reference's block strings (efficientnet_builder.efficientnet) and
# coefficients (efficientnet_params), written out here independently of the module.
REFERENCE_BLOCKS = [
    "r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25", "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25", "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
]
REFERENCE_PARAMS = {"efficientnet_b0": (1.0, 1.0, 224, 0.2),
                    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
                    "efficientnet_b2": (1.1, 1.2, 260, 0.3)}
# Trainable parameters at 1000 classes, as published for the TF/Keras
# reference (Keras EfficientNetB0-B2 "Trainable params"; also
# lukemelas/EfficientNet-PyTorch), and the number of MBConv blocks.
PUBLISHED = {"efficientnet_b0": (5_288_548, 16, 1280),
             "efficientnet_b1": (7_794_184, 23, 1280),
             "efficientnet_b2": (9_109_994, 23, 1408)}


def _decode(block: str) -> dict[str, float]:
  """The reference's BlockDecoder._decode_block_string."""
  out = {}
  for op in block.split("_"):
    key, value = re.split(r"(\d.*)", op)[:2]
    out[key] = float(value) if key == "se" else int(value[0]) if key == "s" else int(value)
  return out


def _reference_round_filters(filters, multiplier, divisor=8):
  filters *= multiplier
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  return int(new + divisor if new < 0.9 * filters else new)


def _reference_trainable_count(width, depth, num_classes=1000):
  """Counts the reference's trainable variables (conv kernels, SE biases, BN
  gamma/beta, dense kernel and bias), layer by layer, from the block strings."""
  f = lambda c: _reference_round_filters(c, width)
  bn = lambda c: 2 * c
  stem = f(32)
  total = 3 * 3 * 3 * stem + bn(stem)
  for block in map(_decode, REFERENCE_BLOCKS):
    cin, cout = f(block["i"]), f(block["o"])
    for r in range(int(math.ceil(depth * block["r"]))):
      cin = cin if r == 0 else cout
      hidden = cin * block["e"]
      if block["e"] != 1:
        total += cin * hidden + bn(hidden)
      total += block["k"] ** 2 * hidden + bn(hidden)  # depthwise
      se = max(1, int(cin * block["se"]))
      total += hidden * se + se + se * hidden + hidden
      total += hidden * cout + bn(cout)
  top = f(1280)
  return total + f(320) * top + bn(top) + top * num_classes + num_classes


def _shapes(model, shape=(1, 32, 32, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# A narrow, shallow EfficientNet for the tests that compile a real forward pass:
# 10 blocks (repeats [1, 1, 1, 2, 2, 2, 1]), 8 to 80 channels; blocks 0, 1, 4,
# 6 and 8 have an identity skip (stochastic depth rates 0, r/10, 4r/10, ...).
TINY = dict(width_coefficient=0.25, depth_coefficient=0.5, small_image_model=True)


def _images(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


@pytest.fixture(scope="module")
def tiny():
  """(model, variables, images, jitted eval-mode apply) of the TINY model.

  Initialised with an ``unsafe_rbg`` key: the same initialisers, but XLA:CPU
  compiles it about 3x faster than threefry's.
  """
  model = get_model("efficientnet", num_classes=7, **TINY)
  x = _images((4, 16, 16, 3), seed=2)
  variables = jax.jit(lambda k: model.init(k, x, train=False))(
      jax.random.key(0, impl="unsafe_rbg"))
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return model, variables, x, evaluate


# --------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_reference(name):
  published, num_blocks, feat_dim = PUBLISHED[name]
  width, depth, _, dropout = REFERENCE_PARAMS[name]
  assert _reference_trainable_count(width, depth) == published
  for small in (False, True):  # small_image_model changes strides only
    model = get_model(name, num_classes=1000, small_image_model=small)
    variables = _shapes(model)
    assert _count(variables["params"]) == published
    assert sum(k.startswith("blocks_") for k in variables["params"]) == num_blocks
    assert variables["params"]["head"]["kernel"].shape == (feat_dim, 1000)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  assert (model.width_coefficient, model.depth_coefficient) == (width, depth)
  assert model.head_dropout_rate() == dropout and model.stochastic_depth_rate == 0.2
  assert efficientnet.PARAMS[name] == REFERENCE_PARAMS[name]


def test_round_filters_and_repeats():
  # B2 (width 1.1) stage widths, as in the reference / Keras EfficientNetB2.
  widths = [efficientnet.round_filters(c, 1.1) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)]
  assert widths == [32, 16, 24, 48, 88, 120, 208, 352, 1408]
  for c in (3, 17, 32, 100, 1280):
    for w in (0.5, 1.0, 1.1, 1.4, 2.0, 4.3):
      assert efficientnet.round_filters(c, w) == _reference_round_filters(c, w)
  repeats = [efficientnet.round_repeats(r, 1.2) for r in (1, 2, 2, 3, 3, 4, 1)]
  assert repeats == [2, 3, 3, 4, 4, 5, 2]
  table = efficientnet.block_table(1.0, 1.0)
  assert [(b.kernel_size, b.stride, b.expand_ratio, b.input_filters, b.output_filters)
          for b in table[:4]] == [(3, 1, 1, 32, 16), (3, 2, 6, 16, 24), (3, 1, 6, 24, 24),
                                  (5, 2, 6, 24, 40)]
  small = efficientnet.block_table(1.0, 1.0, small_image_model=True)
  assert [b.stride for b in small] == [1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
  assert [b.stride for b in table] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("size, small, top_hw", [
    (224, False, 7), (32, False, 1), (28, False, 1), (32, True, 4), (28, True, 4), (64, True, 8)])
def test_spatial_sizes_and_outputs(size, small, top_hw):
  model = get_model("efficientnet_b0", num_classes=5, small_image_model=small)
  variables = _shapes(model)
  x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
  (logits, feats), state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, return_features=True,
                               capture_intermediates=True), variables, x)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert feats.shape == (3, 1280) and feats.dtype == jnp.float32
  inter = state["intermediates"]
  assert inter["top_conv"]["__call__"][0].shape == (3, top_hw, top_hw, 1280)
  if size == 224:  # 112x112x16, 56x56x24, 28x28x40, 14x14x80/112, 7x7x192/320
    stage_ends = {0: (112, 16), 2: (56, 24), 4: (28, 40), 7: (14, 80), 10: (14, 112),
                  14: (7, 192), 15: (7, 320)}
    for i, (hw, c) in stage_ends.items():
      assert inter[f"blocks_{i}"]["__call__"][0].shape == (3, hw, hw, c)
    assert inter["stem_conv"]["__call__"][0].shape == (3, 112, 112, 32)


# ------------------------------------------------------- numpy port of the block

def _np_same_pad(x, k, s):
  """TF 'SAME' padding: out = ceil(in / s), the extra pixel at the end."""
  pads = []
  for n in x.shape[1:3]:
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def _np_depthwise(x, kernel, s):
  k = kernel.shape[0]
  xp = _np_same_pad(x, k, s)
  ho, wo = -(-x.shape[1] // s), -(-x.shape[2] // s)
  out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
  for i in range(k):
    for j in range(k):
      out += xp[:, i:i + s * ho:s, j:j + s * wo:s, :] * kernel[i, j, 0]
  return out


def _np_mbconv(p, st, x, *, kernel, stride, expand, skip):
  """numpy port of efficientnet_model.MBConvBlock.call, eval mode."""
  swish = lambda a: a / (1 + np.exp(-a))
  bn = lambda a, n: ((a - st[n]["mean"]) / np.sqrt(st[n]["var"] + 1e-3) * p[n]["scale"]
                     + p[n]["bias"])
  y = x
  if expand != 1:
    y = swish(bn(y @ p["expand_conv"]["kernel"][0, 0], "expand_bn"))
  y = swish(bn(_np_depthwise(y, p["depthwise_conv"]["kernel"], stride), "depthwise_bn"))
  s = y.mean((1, 2), keepdims=True)
  s = swish(s @ p["se_reduce"]["kernel"][0, 0] + p["se_reduce"]["bias"])
  s = s @ p["se_expand"]["kernel"][0, 0] + p["se_expand"]["bias"]
  y = y / (1 + np.exp(-s))
  y = bn(y @ p["project_conv"]["kernel"][0, 0], "project_bn")
  return y + x if skip else y


@pytest.mark.parametrize("kernel, stride, expand, cin, cout, size", [
    # Each case compiles its block (seconds): the development tier keeps the odd size.
    pytest.param(5, 2, 6, 8, 16, 8, marks=pytest.mark.slow),  # stride 2 on an even size:
                                                              # asymmetric TF padding
    (3, 2, 6, 8, 16, 7),   # odd size
    pytest.param(3, 1, 1, 16, 16, 6, marks=pytest.mark.slow),  # no expansion, identity skip
])
def test_mbconv_block_matches_numpy_port_of_reference(kernel, stride, expand, cin, cout, size):
  block = efficientnet.MBConvBlock(kernel, stride, expand, cin, cout, 0.25, 0.0,
                                   jnp.float32, None)
  x = _images((2, size, size, cin), seed=1)
  variables = jax.jit(lambda k: block.init(k, x, train=False))(jax.random.key(0))
  rng = np.random.RandomState(3)
  variables = jax.tree.map(
      lambda a: a + 0.1 * rng.rand(*a.shape).astype(np.float32) if a.ndim == 1 else a, variables)
  np_vars = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  ref = _np_mbconv(np_vars["params"], np_vars["batch_stats"], np.asarray(x, np.float64),
                   kernel=kernel, stride=stride, expand=expand, skip=stride == 1 and cin == cout)
  out = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  params = variables["params"]
  assert params["depthwise_conv"]["kernel"].shape == (kernel, kernel, 1, cin * expand)
  assert params["se_reduce"]["kernel"].shape == (1, 1, cin * expand, max(1, int(cin * 0.25)))
  assert ("expand_conv" in params) == (expand != 1)
  # Train mode: batch statistics, running averages with momentum 0.99.
  _, state = jax.jit(lambda v, x: block.apply(v, x, train=True, capture_intermediates=True,
                                              mutable=["batch_stats", "intermediates"]))(
                                                  variables, x)
  batch_mean = state["intermediates"]["project_conv"]["__call__"][0].mean(axis=(0, 1, 2))
  old = variables["batch_stats"]["project_bn"]["mean"]
  np.testing.assert_allclose(state["batch_stats"]["project_bn"]["mean"],
                             0.99 * old + 0.01 * batch_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_reference_initialisation(tiny):
  _, variables, _, _ = tiny
  params = variables["params"]
  assert len([k for k in params if k.startswith("blocks_")]) == 10
  top = np.asarray(params["top_conv"]["kernel"])
  assert top.shape == (1, 1, 80, 320)
  np.testing.assert_allclose(top.std(), np.sqrt(2.0 / 320), rtol=0.03)  # fan_out = out
  dw = np.asarray(params["blocks_9"]["depthwise_conv"]["kernel"])
  assert dw.shape == (3, 3, 1, 288)
  np.testing.assert_allclose(dw.std(), np.sqrt(2.0 / 9), rtol=0.06)  # TF fan_out = k * k
  head = np.asarray(params["head"]["kernel"])
  assert head.shape == (320, 7)
  assert 0.99 / np.sqrt(7) < np.abs(head).max() <= 1 / np.sqrt(7)  # 1/sqrt(out_features)
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  np.testing.assert_array_equal(params["blocks_3"]["se_reduce"]["bias"], 0.0)
  np.testing.assert_array_equal(params["blocks_3"]["project_bn"]["scale"], 1.0)
  assert "bias" not in params["stem_conv"] and "bias" not in params["top_conv"]


# ---------------------------------------------------------------- modes

@pytest.mark.slow
def test_train_and_eval_differ_only_by_dropout_sd_and_bn(tiny):
  _, variables, x, evaluate = tiny
  plain = get_model("efficientnet", num_classes=7, dropout_rate=0.0, stochastic_depth_rate=0.0,
                    **TINY)
  train = jax.jit(lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, state = train(variables, x)  # no rng needed without dropout / SD
  # The BN running averages after one step, 0.99 old + 0.01 batch, give back the
  # batch statistics; evaluating with them reproduces the train-mode output
  # (eval mode ignores the dropout and SD rates).
  batch_stats = jax.tree.map(lambda new, old: (new - 0.99 * old) / 0.01,
                             state["batch_stats"], variables["batch_stats"])
  evaluated = evaluate({"params": variables["params"], "batch_stats": batch_stats}, x)
  # (The recovery loses ~2 digits of float32: tolerance 1e-3 of the logit scale.)
  scale = float(np.abs(logits).max())
  np.testing.assert_allclose(evaluated, logits, rtol=0, atol=1e-3 * scale)
  initial = evaluate(variables, x)  # running statistics 0 / 1
  assert np.abs(initial - logits).max() > 0.1 * scale


@pytest.mark.slow
def test_dropout_and_stochastic_depth_use_the_dropout_rng(tiny):
  model, variables, x, evaluate = tiny
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))
  train = jax.jit(lambda v, x, k: model.apply(v, x, train=True, mutable=["batch_stats"],
                                              rngs={"dropout": k})[0])
  a, b = train(variables, x, jax.random.key(1)), train(variables, x, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, train(variables, x, jax.random.key(2)), atol=1e-4)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                   variables, x)


def test_head_dropout_rates():
  assert [get_model(n, num_classes=2).head_dropout_rate() for n in sorted(PUBLISHED)] == \
      [0.2, 0.2, 0.3]
  assert get_model("efficientnet", num_classes=2, width_coefficient=1.2,
                   depth_coefficient=1.4).head_dropout_rate() == 0.3  # B3's
  assert get_model("efficientnet", num_classes=2, width_coefficient=0.5,
                   depth_coefficient=0.5).head_dropout_rate() == 0.2
  assert get_model("efficientnet_b2", num_classes=2, dropout_rate=0.0).head_dropout_rate() == 0.0


@pytest.mark.slow
def test_bfloat16_compute(tiny):
  _, variables, x, evaluate = tiny
  model = get_model("efficientnet", num_classes=7, dtype=jnp.bfloat16, **TINY)
  (logits, feats), state = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=True, return_features=True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(0)}), variables, x)
  assert logits.dtype == jnp.float32 and feats.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))
  ref = evaluate(variables, x)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert out.dtype == jnp.float32
  scale = float(np.abs(ref).max())
  np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05 * scale)


# -------------------------------------------------------------- bad attributes

@pytest.mark.parametrize("kwargs, match", [
    (dict(width_coefficient=0.0), "width_coefficient must be a positive"),
    (dict(depth_coefficient=-1.0), "depth_coefficient must be a positive"),
    (dict(dropout_rate=1.0), "dropout_rate must be a float in \\[0, 1\\)"),
    (dict(stochastic_depth_rate=1.0), "stochastic_depth_rate must be a float in \\[0, 1\\)"),
    (dict(stochastic_depth_rate=-0.1), "stochastic_depth_rate"),
    (dict(small_image_model="yes"), "small_image_model must be a bool"),
])
def test_bad_attributes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _shapes(get_model("efficientnet", num_classes=10, **kwargs), (1, 8, 8, 3))


def test_registry_errors():
  with pytest.raises(RegistryError, match="fixes \\['width_coefficient'\\]"):
    get_model("efficientnet_b0", num_classes=10, width_coefficient=2.0)
  with pytest.raises(RegistryError, match="unknown option.*drop_connect_rate"):
    get_model("efficientnet_b0", num_classes=10, drop_connect_rate=0.2)
  with pytest.raises(ValueError, match="NCHW"):
    _shapes(get_model("efficientnet_b0", num_classes=10), (1, 3, 32, 32))
  assert isinstance(get_model("efficientnet_b1", num_classes=3), efficientnet.EfficientNet)
  assert issubclass(efficientnet.EfficientNet, layers.ImageClassifier)
