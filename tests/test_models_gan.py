"""The models of Lee et al. 2018 (joint confidence loss): VGG-13 and the DCGAN.

Against the PyTorch ports of ``alinlab/Confident_classifier``'s modules
(``tests/parity/torch_confident.py``; those tests skip without torch):
parameter counts, ``state_dict`` names and shapes, and forward passes from
the same weights in train mode (batch statistics, and the running averages
they update) and eval mode. Without torch: shapes, ranges, initialisation,
conversion round trips and errors, the registry without ``num_classes``,
dropout, bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrobust import convert
from jaxrobust.models import dcgan, get_model, list_models, registry, vgg

# name -> (get_model kwargs, convert arch, example input shape)
MODELS = {
    "vgg13": ({"num_classes": 10}, "vgg13", (32, 32, 3)),
    "vgg13_bn": ({"num_classes": 10}, "vgg13", (32, 32, 3)),
    "dcgan_generator": ({}, "dcgan_generator", (100,)),
    "dcgan_discriminator": ({}, "dcgan_discriminator", (32, 32, 3)),
}
# Parameters of the reference modules (torch ports: the same numbers) and
# len(state_dict()) (num_batches_tracked included).
COUNTS = {"vgg13": (9_935_434, 26), "vgg13_bn": (9_941_322, 76),
          "dcgan_generator": (3_448_576, 19), "dcgan_discriminator": (2_637_312, 14)}
# Max deviation (relative to the largest PyTorch value) of a float32 forward pass.
RTOL = 1e-5


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _input(name, batch, seed=0):
  shape = MODELS[name][2]
  rng = np.random.default_rng(seed)
  if name == "dcgan_generator":
    return rng.normal(size=(batch,) + shape).astype(np.float32)
  return rng.uniform(0, 1, (batch,) + shape).astype(np.float32)


@functools.cache
def _init(name, **kwargs):
  """(model, variables) of a real, jitted init. The key is an ``rbg`` one:
  XLA's generator compiles in a fraction of threefry's time (3 s instead of 15 s
  for VGG-13 on a loaded 2-core machine); the distributions are the same."""
  model = get_model(name, **{**MODELS[name][0], **kwargs})
  x = jnp.zeros((1,) + MODELS[name][2])
  key = jax.random.key(0, impl="rbg")
  return model, jax.jit(lambda k: model.init(k, x, train=False))(key)


def _shapes(name, **kwargs):
  model = get_model(name, **{**MODELS[name][0], **kwargs})
  x = jnp.zeros((1,) + MODELS[name][2])
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _random_tree(name, seed=0):
  _, v = _shapes(name)
  rng = np.random.default_rng(seed)
  fill = lambda s: rng.normal(size=s.shape).astype(np.float32)
  return jax.tree.map(fill, v["params"]), jax.tree.map(fill, v.get("batch_stats", {})), v["params"]


def _he_variables(name, seed=0):
  """Variables without compiling an init: kernels ``normal(0, sqrt(2 / fan_in))``
  (activations of order one), biases 0, BatchNorm at its initial state."""
  _, v = _shapes(name)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf == "kernel":
      return (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(np.float32)
    return np.full(s.shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(fill, v)


@pytest.fixture(scope="module")
def tc():
  pytest.importorskip("torch")
  from tests.parity import torch_confident
  return torch_confident


def _torch_module(tc, name):
  import torch
  torch.manual_seed(0)
  return {"vgg13": lambda: tc.vgg13(10), "vgg13_bn": lambda: tc.vgg13(10, batch_norm=True),
          "dcgan_generator": tc.generator, "dcgan_discriminator": tc.discriminator}[name]()


# ------------------------------------------------------------------ sizes and counts

@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_counts(name):
  _, v = _shapes(name)
  assert _count(v["params"]) == COUNTS[name][0]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_counts_and_state_dict_equal_torch(tc, name):
  import torch
  net = _torch_module(tc, name)
  assert sum(p.numel() for p in net.parameters()) == COUNTS[name][0]
  params, stats, _ = _random_tree(name)
  sd = convert.to_torch(params, stats, arch=MODELS[name][1])
  ref = net.state_dict()
  assert len(ref) == COUNTS[name][1]
  assert list(sd) == list(ref)  # the same names in the module order
  assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)


def test_output_shapes_and_ranges():
  gen, gv = _init("dcgan_generator")
  z = jnp.asarray(_input("dcgan_generator", 3))
  generate = jax.jit(lambda v, z: gen.apply(v, z, train=True, mutable=["batch_stats"])[0])
  out = generate(gv, z)
  assert set(out) == {"images"}
  images = out["images"]
  assert images.shape == (3, 32, 32, 3) and images.dtype == jnp.float32
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  assert float(images.std()) > 1e-3  # not a constant image
  # The reference's noise layout [B, nz, 1, 1], as NHWC [B, 1, 1, nz], gives the same images.
  np.testing.assert_array_equal(generate(gv, z[:, None, None, :])["images"], images)

  disc, dv = _init("dcgan_discriminator")
  out = jax.jit(lambda v, x: disc.apply(v, x, train=False, return_features=True))(dv, images)
  assert set(out) == {"score", "features"}
  assert out["score"].shape == (3,) and out["score"].dtype == jnp.float32
  assert out["features"].shape == (3, 4 * 4 * 64 * 8)
  x = jax.ShapeDtypeStruct(images.shape, images.dtype)
  assert set(jax.eval_shape(lambda v, x: disc.apply(v, x, train=False), dv, x)) == {"score"}

  model, v = _shapes("vgg13", num_classes=7)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits, feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, return_features=True), v, x)
  assert logits.shape == (2, 7) and feats.shape == (2, 512) and feats.dtype == jnp.float32
  assert v["params"]["head"]["kernel"].shape == (512, 7)
  assert set(v["params"]) == {f"conv{i}" for i in range(1, 11)} | {"fc1", "fc2", "head"}
  assert "batch_stats" not in v
  _, v = _shapes("vgg13_bn")
  assert set(v["batch_stats"]) == {f"bn{i}" for i in range(1, 11)}


def test_bad_inputs_raise():
  gen = get_model("dcgan_generator")
  with pytest.raises(ValueError, match=r"\[batch, 100\]"):
    jax.eval_shape(lambda: gen.init(jax.random.key(0), jnp.zeros((2, 64)), train=False))
  disc = get_model("dcgan_discriminator")
  with pytest.raises(ValueError, match="32, 32, 3"):
    jax.eval_shape(lambda: disc.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False))
  with pytest.raises(ValueError, match="NCHW"):
    jax.eval_shape(lambda: disc.init(jax.random.key(0), jnp.zeros((2, 3, 32, 32)), train=False))
  model = get_model("vgg13", num_classes=10)
  with pytest.raises(ValueError, match="32x32"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
  with pytest.raises(ValueError, match="dropout_rate"):
    _shapes("vgg13", dropout_rate=1.0)


def test_initialisation_follows_the_reference():
  p = _init("dcgan_generator")[1]["params"]
  kernel = np.asarray(p["deconv2"]["kernel"])
  assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.001
  scale = np.asarray(p["bn1"]["scale"])
  assert abs(scale.mean() - 1) < 0.005 and 0.015 < scale.std() < 0.025
  np.testing.assert_array_equal(p["bn1"]["bias"], 0)
  p = _init("dcgan_discriminator")[1]["params"]
  assert abs(np.asarray(p["conv3"]["kernel"]).std() - 0.02) < 0.002
  assert all(set(p[f"conv{i}"]) == {"kernel"} for i in range(1, 5))  # bias=False

  p = _init("vgg13_bn")[1]["params"]
  for i, out in [(1, 64), (5, 256), (10, 512)]:  # normal(0, sqrt(2 / (3 * 3 * out)))
    std = np.asarray(p[f"conv{i}"]["kernel"]).std()
    assert abs(std / np.sqrt(2 / (9 * out)) - 1) < 0.05
    np.testing.assert_array_equal(p[f"conv{i}"]["bias"], 0)
  for name in ("fc1", "fc2", "head"):  # normal(0, 0.01), bias 0
    assert abs(np.asarray(p[name]["kernel"]).std() / 0.01 - 1) < 0.05
    np.testing.assert_array_equal(p[name]["bias"], 0)
  np.testing.assert_array_equal(p["bn3"]["scale"], 1)


# -------------------------------------------------------------------- PyTorch parity

def _torch_outputs(net, name, x):
  """The reference's outputs in our layout: VGG (logits, 512-d features),
  generator images NHWC (and the last deconvolution's output), discriminator
  (pre-sigmoid logit, sigmoid, input of the last conv flattened in NHWC order)."""
  import torch
  if name == "dcgan_generator":
    pre = net.main[:-1](torch.from_numpy(x)[:, :, None, None])  # one pass, then the sigmoid
    return {"images": net.main[-1](pre).permute(0, 2, 3, 1), "pre_sigmoid": pre.permute(0, 2, 3, 1)}
  t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  if name == "dcgan_discriminator":
    hidden = net.main[:-2](t)  # one pass: train mode updates the running averages
    score = net.main[-2](hidden)
    return {"score": score.view(-1), "prob": net.main[-1](score).view(-1),  # net(t), sigmoid
            "features": hidden.permute(0, 2, 3, 1).reshape(len(x), -1)}  # NHWC order
  feats = net.features(t).view(len(x), -1)
  return {"logits": net.classifier(feats), "features": feats}


def _ours(name, out, intermediates=None):
  if isinstance(out, dict):
    out = dict(out)
    if intermediates:  # the generator's pre-sigmoid output
      out["pre_sigmoid"] = intermediates["deconv4"]["__call__"][0]
    return out
  return {"logits": out[0], "features": out[1]}


def _deviation(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_equals_torch(tc, name):
  """The reference's initial weights, converted: a train-mode pass (batch
  statistics; dropout off on both sides) gives the same outputs and running
  averages, then an eval-mode pass with those running averages."""
  import torch
  torch.set_num_threads(1)
  net = _torch_module(tc, name)
  for m in net.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0  # a deterministic train-mode pass; dropout is tested below
  kwargs, arch, _ = MODELS[name]
  model = get_model(name, **kwargs, **({"dropout_rate": 0.0} if "vgg" in name else {}))
  params, stats = convert.from_torch(net.state_dict(), arch=arch)
  variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
  x = _input(name, 8)

  net.train()
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in _torch_outputs(net, name, x).items()}
  capture = lambda mdl, _: mdl.name == "deconv4"

  @functools.partial(jax.jit, static_argnums=2)
  def apply(v, x, train):
    out, mutated = model.apply(v, x, train=train, return_features=True,
                               capture_intermediates=capture,
                               mutable=["batch_stats", "intermediates"])
    return _ours(name, out, mutated.get("intermediates")), mutated

  out, mutated = apply(variables, x, True)
  deviations = {f"train/{k}": _deviation(out[k], ref[k]) for k in out}
  if stats:  # the running averages PyTorch updated (momentum 0.1, unbiased variance)
    new_sd = convert.to_torch(params, mutated["batch_stats"], arch=arch)
    ref_sd = net.state_dict()
    deviations.update({f"stats/{k}": _deviation(new_sd[k], ref_sd[k].numpy())
                       for k in new_sd if "running" in k})
    variables = {"params": params, "batch_stats": mutated["batch_stats"]}

  net.eval()
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in _torch_outputs(net, name, x).items()}
  out = apply(variables, x, False)[0]
  deviations.update({f"eval/{k}": _deviation(out[k], ref[k]) for k in out})
  if name == "dcgan_discriminator":  # the reference's sigmoid output and BCELoss, from our logit
    deviations["eval/prob"] = _deviation(jax.nn.sigmoid(out["score"]), ref["prob"])
    for label in (0.0, 1.0):  # the reference's real_label / fake_label
      bce = torch.nn.BCELoss()(torch.from_numpy(ref["prob"]), torch.full((len(x),), label))
      ours = optax.sigmoid_binary_cross_entropy(out["score"], jnp.full((len(x),), label)).mean()
      deviations[f"eval/bce_{label:g}"] = _deviation(ours, bce.numpy())
  assert max(deviations.values()) < RTOL, deviations
  assert np.abs(ref[next(iter(ref))]).max() > 1e-6  # not a trivially zero output


# ------------------------------------------------------------------------ conversion

@pytest.mark.parametrize("name", list(MODELS))
def test_convert_round_trip(name):
  arch = MODELS[name][1]
  params, stats, template = _random_tree(name)
  sd = convert.to_torch(params, stats, arch=arch)
  assert len(sd) == COUNTS[name][1]
  for p, s in [convert.from_torch(sd, arch=arch),
               (convert.from_torch(sd, arch=arch, params_template=template)[0], stats)]:
    jax.tree.map(np.testing.assert_array_equal, p, params)
    jax.tree.map(np.testing.assert_array_equal, s, stats)


def test_convert_names_and_kernel_conventions():
  assert convert.VGG13 == vgg.VGG13 and convert.VGG_HIDDEN == vgg.HIDDEN
  params, stats, _ = _random_tree("vgg13")
  sd = convert.to_torch(params, stats, arch="vgg13")
  assert [k for k in sd if k.endswith("weight")][:10] == [
      f"features.{j}.weight" for j in (0, 2, 5, 7, 10, 12, 15, 17, 20, 22)]
  np.testing.assert_array_equal(sd["features.22.weight"],
                                params["conv10"]["kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd["classifier.3.bias"], params["fc2"]["bias"])
  np.testing.assert_array_equal(sd["classifier.6.weight"], params["head"]["kernel"].T)
  params, stats, _ = _random_tree("vgg13_bn")
  sd = convert.to_torch(params, stats, arch="vgg13")
  assert "features.32.running_var" in sd and "features.31.weight" in sd
  np.testing.assert_array_equal(sd["features.4.running_var"], stats["bn2"]["var"])

  params, stats, _ = _random_tree("dcgan_generator")
  sd = convert.to_torch(params, stats, arch="dcgan_generator")
  # ConvTranspose2d weights are [in, out, kh, kw] and flipped in space.
  np.testing.assert_array_equal(
      sd["main.3.weight"], params["deconv2"]["kernel"][::-1, ::-1].transpose(2, 3, 0, 1))
  assert sd["main.0.weight"].shape == (100, 512, 4, 4)
  assert sd["main.9.weight"].shape == (128, 3, 4, 4)
  np.testing.assert_array_equal(sd["main.7.running_mean"], stats["bn3"]["mean"])
  params, stats, _ = _random_tree("dcgan_discriminator")
  sd = convert.to_torch(params, stats, arch="dcgan_discriminator")
  assert sd["main.8.weight"].shape == (1, 512, 4, 4)
  np.testing.assert_array_equal(sd["main.6.weight"], params["bn3"]["scale"])


def test_convert_errors_name_the_key():
  params, stats, template = _random_tree("dcgan_generator")
  sd = convert.to_torch(params, stats, arch="dcgan_generator")
  with pytest.raises(ValueError, match=r"missing key\(s\) \['main.4.running_var'\]"):
    convert.from_torch({k: v for k, v in sd.items() if k != "main.4.running_var"},
                       arch="dcgan_generator")
  with pytest.raises(ValueError, match=r"unexpected key\(s\) \['main.10.weight'\]"):
    convert.from_torch({**sd, "main.10.weight": np.zeros(3)}, arch="dcgan_generator")
  with pytest.raises(ValueError, match="from_torch.*dcgan_discriminator"):
    convert.from_torch(sd, arch="dcgan_discriminator")
  small, small_stats, _ = _random_tree("dcgan_generator")
  small["deconv4"]["kernel"] = small["deconv4"]["kernel"][..., :1]  # a 1-channel generator
  with pytest.raises(ValueError, match=r"shape mismatch: main.9.weight: got \(128, 1, 4, 4\), "
                                       r"expected \(128, 3, 4, 4\)"):
    convert.from_torch(convert.to_torch(small, small_stats, arch="dcgan_generator"),
                       arch="dcgan_generator", params_template=template)
  with pytest.raises(ValueError, match="unexpected key"):
    convert.to_torch(dict(params, probe={"kernel": np.zeros((2, 2))}), stats,
                     arch="dcgan_generator")
  # A VGG-13 without BatchNorm is not a template for one with it, and vice versa.
  bn_params, bn_stats, bn_template = _random_tree("vgg13_bn")
  plain_sd = convert.to_torch(*_random_tree("vgg13")[:2], arch="vgg13")
  with pytest.raises(ValueError, match=r"missing key\(s\) \['features.1.weight'"):
    convert.from_torch(plain_sd, arch="vgg13", params_template=bn_template)
  with pytest.raises(ValueError, match="missing key 'classifier.6.weight'"):
    convert.from_torch(sd, arch="vgg13")
  with pytest.raises(ValueError, match="missing key 'deconv1/kernel'"):
    convert.to_torch(bn_params, bn_stats, arch="dcgan_generator")


# -------------------------------------------------------------------------- registry

def test_registry_without_num_classes():
  assert {"vgg13", "vgg13_bn", "dcgan_generator", "dcgan_discriminator"} <= set(list_models())
  gen = get_model("dcgan_generator", nz=64, ngf=32, dtype=jnp.bfloat16)
  assert isinstance(gen, dcgan.DCGANGenerator) and (gen.nz, gen.ngf, gen.nc) == (64, 32, 3)
  assert isinstance(get_model("dcgan_discriminator", bn_axis_name="batch"),
                    dcgan.DCGANDiscriminator)
  assert not registry.has_classes("dcgan_generator")
  assert registry.has_classes("vgg13") and registry.has_classes("wrn_40_2")
  with pytest.raises(ValueError, match="'dcgan_generator' has no classes"):
    get_model("dcgan_generator", num_classes=10)
  for name in ("vgg13", "wrn", "small_cnn"):
    with pytest.raises(ValueError, match=rf"model '{name}' is a classifier.*needs num_classes"):
      get_model(name)
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    get_model("vgg13", num_classes=0)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['ndf'\]"):
    get_model("dcgan_generator", ndf=8)
  with pytest.raises(ValueError, match="did you mean 'dcgan_generator'"):
    get_model("dcgan_generater")
  with pytest.raises(ValueError, match=r"'vgg13_bn' fixes \['batch_norm'\]"):
    get_model("vgg13_bn", num_classes=10, batch_norm=False)
  model = get_model("vgg13", num_classes=10, batch_norm=True)
  assert model.batch_norm and model.dropout_rate == 0.5 and model.layers == vgg.VGG13


def test_register_model_without_classes():
  @registry.register_model("_test_noise_mlp")
  def build(width: int = 4):
    return get_model("dcgan_discriminator", ndf=width)

  try:
    assert not registry.has_classes("_test_noise_mlp")
    assert get_model("_test_noise_mlp", width=2).ndf == 2
  finally:
    registry.MODELS.unregister("_test_noise_mlp")


# ---------------------------------------------------------------- dropout and dtype

def test_vgg13_dropout_only_in_train_with_a_dropout_rng():
  model, variables = get_model("vgg13", num_classes=10), _he_variables("vgg13")
  no_dropout = get_model("vgg13", num_classes=10, dropout_rate=0.0)
  x = jnp.asarray(_input("vgg13", 2))

  @jax.jit
  def run(v, x, k):
    rngs = {"dropout": k}
    return (model.apply(v, x, train=True, rngs=rngs), model.apply(v, x, train=False, rngs=rngs),
            model.apply(v, x, train=False), no_dropout.apply(v, x, train=True))

  a, eval_with_rng, eval_logits, train_no_dropout = run(variables, x, jax.random.key(1))
  b = run(variables, x, jax.random.key(2))[0]
  np.testing.assert_array_equal(a, run(variables, x, jax.random.key(1))[0])
  assert not np.allclose(a, b, rtol=1e-3, atol=0)
  assert not np.allclose(a, eval_logits, rtol=1e-3, atol=0)
  np.testing.assert_array_equal(eval_with_rng, eval_logits)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v: model.apply(v, x, train=True), variables)
  # dropout_rate=0: train mode is eval mode (no BatchNorm in vgg13).
  np.testing.assert_allclose(train_no_dropout, eval_logits, rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg13_bn", "dcgan_generator", "dcgan_discriminator"])
def test_bfloat16_runs(name):
  model32, variables = _init(name)
  model16 = get_model(name, **MODELS[name][0], dtype=jnp.bfloat16)
  x = jnp.asarray(_input(name, 4))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))

  @jax.jit
  def run(v, x):
    outs = [_ours(name, m.apply(v, x, train=True, return_features=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(1)})[0])
            for m in (model16, model32)]
    return outs

  out16, out32 = run(variables, x)
  for k, v in out16.items():
    assert v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all()
    assert _deviation(v, out32[k]) < 0.1, k  # bf16 arithmetic: ~1e-2
