"""Tests of CMT (:mod:`jaxrobust.models.cmt`): parameter counts against the
reference code and the paper, the 32x32 variant's forward pass, train/eval
modes, bf16, input-size errors, sharding specs, and one block against a
PyTorch port of the reference block (``tests/reference_cmt.py``).

Full-size networks are only traced (``jax.eval_shape``); the behaviour tests
use a tiny variant added to :data:`cmt.VARIANTS` for the test, so they compile
in seconds."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrobust import sharding
from jaxrobust.models import cmt, get_model, layers, list_models

# Counted with the reference's own builders (cmt_pytorch/cmt.py, cmt_ti(img_size=160), ...).
REFERENCE_PARAMS = {"ti": (160, 9_492_426), "xs": (192, 15_247_208), "s": (224, 26_256_160),
                    "b": (256, 45_715_076)}
PAPER_PARAMS = {"ti": 9.49e6, "xs": 15.24e6, "s": 25.14e6, "b": 45.72e6}  # Table 1
TINY = cmt.Variant((8, 16, 16, 16), (1, 1, 1, 1), 2.0, 8, 32, 0.0, 0.0, 0.0)


def _images(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _init_shapes(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _random_variables(init, seed=0):
  """The variables ``init()`` would make, filled with numpy draws: N(0, 0.3)
  weights, scales and variances near 1. Skips compiling ``init``, whose
  per-parameter random draws take XLA:CPU ~20 s even for the tiny model."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    if sharding.path_str(path).endswith(("scale", "var")):
      return jnp.asarray(1.0 + 0.1 * np.abs(rng.randn(*leaf.shape)), leaf.dtype)
    return jnp.asarray(0.3 * rng.randn(*leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture
def tiny(monkeypatch):
  """A tiny CMT (dims 8/16/16/16, 4 blocks) on 16x16 inputs (stem stride 1)."""
  monkeypatch.setitem(cmt.VARIANTS, "tiny", TINY)

  def build(**kwargs):
    return cmt.CMT(num_classes=5, variant="tiny", stem_stride=1, **kwargs)

  return build


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("variant", sorted(REFERENCE_PARAMS))
def test_parameter_counts_at_the_paper_resolution(variant):
  size, reference = REFERENCE_PARAMS[variant]
  assert cmt.VARIANTS[variant].resolution == size
  variables = _init_shapes(get_model(f"cmt_{variant}", num_classes=1000), (1, size, size, 3))
  n = _count(variables["params"])
  assert n == reference
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  rel = n / PAPER_PARAMS[variant] - 1
  if variant == "s":
    # The reference code's CMT-S (dims 64..512, depths 3/3/16/3, R 4, stem 32)
    # is 4.4% above the paper's 25.14M (documented in the module docstring).
    assert 0.04 < rel < 0.05
  else:
    assert abs(rel) < 0.03 and abs(rel) < 1e-3


def test_relative_position_tables_follow_the_reference():
  """[heads, N, N / k^2] per stage, shared by the stage's blocks."""
  params = _init_shapes(get_model("cmt_ti", num_classes=10), (1, 160, 160, 3))["params"]
  shapes = {k: v.shape for k, v in params.items() if k.startswith("relative_pos")}
  assert shapes == {"relative_pos_a": (1, 1600, 25), "relative_pos_b": (2, 400, 25),
                    "relative_pos_c": (4, 100, 25), "relative_pos_d": (8, 25, 25)}
  assert not any("relative" in k for k in params["blocks_a_0"])
  assert params["head"]["kernel"].shape == (1280, 10)
  assert len([k for k in params if k.startswith("blocks_c_")]) == 10


def test_registry_names_and_presets():
  assert {"cmt", "cmt_ti", "cmt_xs", "cmt_s", "cmt_b", "cmt_ti_32"} <= set(list_models())
  m = get_model("cmt_ti_32", num_classes=10)
  assert isinstance(m, cmt.CMT) and (m.variant, m.stem_stride) == ("ti", 1)
  assert get_model("cmt", num_classes=10, variant="b").variant == "b"
  ti = _init_shapes(get_model("cmt_ti", num_classes=10), (1, 64, 64, 3))["params"]
  ti32 = _init_shapes(m, (1, 32, 32, 3))["params"]
  # Same weights apart from the position tables (a 32x32 input at stride 16
  # has the token grids of a 64x64 input at stride 32).
  assert jax.tree.map(lambda a: a.shape, ti) == jax.tree.map(lambda a: a.shape, ti32)
  assert ti32["relative_pos_a"].shape == (1, 256, 4)


# ---------------------------------------------------------------------- behaviour

@pytest.mark.slow
def test_cmt_ti_32_forward_is_finite():
  model = get_model("cmt_ti_32", num_classes=10)
  x = _images((2, 32, 32, 3))

  def run(key, x):
    variables = model.init(key, x, train=False)
    return model.apply(variables, x, train=False, return_features=True)

  logits, features = jax.jit(run)(jax.random.key(0), x)
  assert logits.shape == (2, 10) and features.shape == (2, 1280)
  assert logits.dtype == jnp.float32
  assert np.isfinite(logits).all() and np.isfinite(features).all()
  assert not np.allclose(logits[0], logits[1])


@pytest.mark.slow
def test_train_and_eval_modes(tiny):
  model = tiny(dropout_rate=0.5, stochastic_depth_rate=0.5)
  plain = tiny(dropout_rate=0.0, stochastic_depth_rate=0.0)
  x = _images((4, 16, 16, 3))

  variables = _random_variables(lambda: model.init(jax.random.key(0), x, train=False))

  @jax.jit
  def run(variables):  # one compilation (seconds on 2 shared cores)
    train = lambda k: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(k)})
    (t1, state), (t2, _) = train(1), train(2)
    return (model.apply(variables, x, train=False), plain.apply(variables, x, train=False),
            t1, t2, state)

  e1, e_plain, t1, t2, state = run(variables)
  # Eval: no rng needed, the rates change nothing; deterministic.
  np.testing.assert_allclose(e_plain, e1, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(run(variables)[0], e1)
  # Train: batch statistics and random drops; running averages updated.
  assert np.isfinite(t1).all() and not np.allclose(t1, t2)
  assert not np.allclose(t1, e1)
  before = variables["batch_stats"]["blocks_a_0"]["mlp"]["conv1_bn"]["mean"]
  after = state["batch_stats"]["blocks_a_0"]["mlp"]["conv1_bn"]["mean"]
  assert not np.allclose(before, after)
  with pytest.raises(Exception, match="dropout"):  # the rng is required in train mode
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)


def test_stochastic_depth_rates_follow_the_zoo_rule(tiny):
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.StochasticDepth) and context.method_name == "__call__":
      seen.append((context.module.name, context.module.rate))
    return next_fun(*args, **kwargs)

  model = tiny(stochastic_depth_rate=0.5)
  variables = _init_shapes(model, x.shape)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(0)}), variables, x)
  # Blocks 1..3 of 4 (block 0's rate is 0: no module), both branches each:
  # rate * i / N as every model of the zoo.
  expected = [(f"drop_path{j}", 0.5 * i / 4) for i in range(1, 4) for j in (1, 2)]
  assert [(n, pytest.approx(r)) for n, r in seen] == expected
  # Default: the reference's --drop-path for the variant.
  assert get_model("cmt_b", num_classes=2).stochastic_depth_rate is None
  assert cmt.VARIANTS["ti"].drop_path == 0.1 and cmt.VARIANTS["b"].drop_path == 0.25
  with pytest.raises(ValueError, match="stochastic_depth_rate"):
    _init_shapes(tiny(stochastic_depth_rate=1.0), x.shape)


@pytest.mark.slow
def test_bfloat16_compute_float32_params_and_logits(tiny):
  x = _images((2, 16, 16, 3))
  f32, bf16 = tiny(), tiny(dtype=jnp.bfloat16)

  @jax.jit
  def run(variables):  # one compilation
    return (bf16.apply(variables, x, train=True, return_features=True, mutable=["batch_stats"]),
            f32.apply(variables, x, train=False), bf16.apply(variables, x, train=False))

  variables = _random_variables(lambda: f32.init(jax.random.key(0), x, train=False))
  ((logits, feats), state), ref, out = run(variables)
  assert logits.dtype == jnp.float32 and feats.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(
      jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False))))
  assert np.isfinite(out).all() and not np.array_equal(out, ref)
  np.testing.assert_allclose(out, ref, rtol=0.1, atol=0.1)


# -------------------------------------------------------------------- bad input

def test_input_size_not_matching_the_tables_is_named():
  model = get_model("cmt_ti_32", num_classes=10)
  variables = _init_shapes(model, (1, 32, 32, 3))
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"cmt_ti_32.*relative_pos_a.*32x32 inputs.*64x64 input"):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  paper = get_model("cmt_s", num_classes=10)
  variables = _init_shapes(paper, (1, 224, 224, 3))
  with pytest.raises(ValueError, match=r"cmt_s.*224x224 inputs.*this 160x160 input"):
    jax.eval_shape(lambda v, x: paper.apply(v, x, train=False), variables,
                   jax.ShapeDtypeStruct((1, 160, 160, 3), jnp.float32))


@pytest.mark.parametrize("name, size, stride", [("cmt_ti", 48, 32), ("cmt_ti_32", 40, 16)])
def test_input_size_not_a_multiple_of_the_stride(name, size, stride):
  with pytest.raises(ValueError, match=rf"{name} needs .*multiples of {stride}.*{size}x{size}"):
    _init_shapes(get_model(name, num_classes=10), (1, size, size, 3))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="variant must be one of"):
    _init_shapes(get_model("cmt", num_classes=10, variant="m"), (1, 32, 32, 3))
  with pytest.raises(ValueError, match="stem_stride"):
    _init_shapes(get_model("cmt", num_classes=10, stem_stride=4), (1, 64, 64, 3))
  with pytest.raises(ValueError, match="NCHW"):
    _init_shapes(get_model("cmt_ti_32", num_classes=10), (1, 3, 32, 32))


# --------------------------------------------------------------------- sharding

def test_fsdp_and_replicated_specs_for_cmt_params():
  params = _init_shapes(get_model("cmt_ti", num_classes=1000), (1, 160, 160, 3))["params"]
  mesh = sharding.make_mesh((("data", 8),))
  fsdp = sharding.tree_shardings(params, mesh, (("relative_pos", "fsdp"),
                                                (".*", "fsdp(min_size=4096)")))
  flat = {sharding.path_str(p): (leaf.shape, s.spec) for (p, leaf), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(fsdp))}
  for name, (shape, spec) in flat.items():
    for dim, axis in enumerate(spec):
      if axis is not None:
        assert shape[dim] % 8 == 0, name
  assert flat["relative_pos_a"][1] == P(None, "data", None)  # the 1600 token axis
  assert flat["head/kernel"][1] == P("data", None)  # 1280 x 1000
  assert flat["blocks_c_0/attn/q/kernel"][1] in (P("data", None), P(None, "data"))
  assert flat["blocks_a_0/norm1/scale"][1] == P()  # 46 values: below min_size
  sharded = sum(int(np.prod(s)) for s, spec in flat.values() if any(a for a in spec))
  assert sharded > 0.9 * _count(params)
  replicated = sharding.tree_shardings(params, mesh, ((".*", "replicate"),))
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))


# ------------------------------------------------------- parity with the reference

@pytest.mark.slow
@pytest.mark.parametrize("sr, train", [(2, True), (2, False), (1, True)])
def test_block_matches_torch_port_of_reference(sr, train):
  torch = pytest.importorskip("torch")
  from tests import reference_cmt

  dim, heads, h = 16, 2, 8
  block = cmt.CMTBlock(heads, sr, 2.5, 0.0, jnp.float64, None)
  rng = np.random.RandomState(0)
  x = rng.randn(3, h, h, dim)
  pos = rng.randn(heads, h * h, (h // sr) ** 2)
  with jax.enable_x64(True):
    # Non-trivial BatchNorm/LayerNorm state so eval mode tests it.
    variables = _random_variables(
        lambda: block.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(pos), False), seed=1)
    out, state = block.apply(variables, jnp.asarray(x), jnp.asarray(pos), train,
                             mutable=["batch_stats"])
    out, state = np.asarray(out), jax.tree.map(np.asarray, state)
  ref = reference_cmt.TorchBlock(dim, heads, sr, 2.5).double()
  reference_cmt.load_block(ref, variables["params"], variables["batch_stats"])
  ref.train(train)
  with torch.no_grad():
    tokens = torch.tensor(x.reshape(3, h * h, dim))
    expected = ref(tokens, h, h, torch.tensor(pos)).numpy().reshape(3, h, h, dim)
  # Eval mode: the zoo's BatchNorm takes rsqrt of its float32 running variance.
  tol = 1e-9 if train else 1e-5
  np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
  # Running averages (stored in float32, hence the tolerance), PyTorch's update rule.
  bn = state["batch_stats"]["mlp"]["proj_bn"]
  np.testing.assert_allclose(bn["mean"], ref.mlp.proj_bn.running_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(bn["var"], ref.mlp.proj_bn.running_var.numpy(), rtol=1e-6)
