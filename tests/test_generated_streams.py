"""Generated streams, named outputs, per-pass BatchNorm statistics and ordered
updates (jaxrobust.generated, jaxrobust.train_step), on a three-module toy GAN:
the engine's step equals the same three updates written out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from configs.recipes import confidence_gan as confidence_gan_recipe
from jaxrobust import build, config as config_lib, generated
from jaxrobust import train_state as state_lib
from jaxrobust import train_step as step_lib
from jaxrobust.methods import confidence_gan
from jaxrobust.methods.outlier_exposure import confidence_loss
from jaxrobust.models.registry import MODELS, register_model

NZ, B, K, IMAGE = 8, 6, 10, (32, 32, 1)
LR = 1e-2  # large enough that every update moves its parameters visibly


class ToyGenerator(nn.Module):
  num_classes: int = 0  # unused: a generator has no classes
  channels: int = 1
  dtype: jnp.dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, z, *, train: bool, return_features: bool = False):
    h = nn.Dense(32 * 32 * self.channels)(z)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name)(h)
    return {"images": nn.sigmoid(h).reshape((-1, 32, 32, self.channels))}


class ToyDiscriminator(nn.Module):
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool, return_features: bool = False):
    h = nn.Dense(16)(x.reshape((x.shape[0], -1)))
    h = nn.leaky_relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name)(h), 0.2)
    return {"score": nn.Dense(1)(h)[:, 0]}


class ToyClassifier(nn.Module):
  num_classes: int = K
  dtype: jnp.dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool, return_features: bool = False):
    h = nn.Dense(16)(x.reshape((x.shape[0], -1)))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name)(h))
    logits = nn.Dense(self.num_classes, name="head")(h)
    return (logits, h) if return_features else logits


class NoImages(nn.Module):
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, z, *, train: bool, return_features: bool = False):
    return {"score": nn.Dense(1)(z)[:, 0]}


TOYS = {"toy_generator": ToyGenerator, "toy_discriminator": ToyDiscriminator,
        "toy_classifier": ToyClassifier, "toy_no_images": NoImages}


@pytest.fixture(autouse=True, scope="module")
def toy_models():
  """The toy networks in the model registry for this module's tests only (the
  model tests enumerate the registry)."""
  for name, cls in TOYS.items():
    register_model(name)(cls)
  yield
  for name in TOYS:
    MODELS.unregister(name)

# SGD, not the reference's Adam: Adam's first step is lr * sign(g), which turns
# rounding-sized gradients (a BatchNorm bias before a sigmoid) into +-lr.
SGD = {"name": "sgd", "learning_rate": LR, "momentum": 0.9, "nesterov": False,
       "weight_decay": 0.0, "schedule": "constant"}


def gan_config(beta: float = 0.1, **stream_overrides):
  c = default.get_config()
  c.model.name, c.model.kwargs = "toy_classifier", {}
  c.optimizer.update(SGD)
  c.num_steps = 2
  # The recipe's joint step, with toy networks, SGD and 8-d noise.
  joint = confidence_gan_recipe.joint_overrides(beta=beta, batch=B, channels=1, width=8,
                                                epochs=1.0)
  joint["modules"]["generator"].update(model={"name": "toy_generator", "kwargs": {}},
                                       input_shape=(NZ,), optimizer=SGD)
  joint["modules"]["discriminator"].update(model={"name": "toy_discriminator", "kwargs": {}},
                                           optimizer=SGD)
  joint["streams"]["fake"].update(noise=f"normal({NZ})", **stream_overrides)
  del joint["evaluators"]
  c.modules, c.losses, c.updates = joint["modules"], joint["losses"], joint["updates"]
  c.streams.train.batch_size = B
  c.streams.train.pp = ""  # the hand-written step feeds the images as they are
  c.streams.fake = joint["streams"]["fake"]
  return c


def spec_of(c):
  config_lib.validate(c)
  modules = build.build_modules(c, num_classes=K, image_shape=IMAGE, total_steps=c.num_steps,
                                steps_per_epoch=float(c.num_steps))
  streams = build.build_stream_steps(c)
  updates = build.build_updates(c, modules, streams, {})
  return step_lib.StepSpec(modules=modules, streams=streams, updates=updates, num_classes=K)


def batch_of(seed=0):
  r = np.random.default_rng(seed)
  return {"train": {"image": r.integers(0, 256, (B,) + IMAGE, dtype=np.uint8),
                    "label": r.integers(0, K, B).astype(np.int32),
                    "mask": np.ones(B, bool), "index": np.arange(B, dtype=np.int32)}}


def hand_written_step(spec, state, batch, beta):
  """The reference's three updates (run_joint_confidence.py), one after the
  other, with the engine's modules as the networks and its noise keys."""
  mods = spec.modules
  G, D, C = mods["generator"], mods["discriminator"], mods["classifier"]
  s = {n: state.modules[n] for n in ("generator", "discriminator", "classifier")}
  x = jnp.asarray(batch["train"]["image"], jnp.float32) / 255.0
  y = jnp.asarray(batch["train"]["label"])
  fake_index = sorted(spec.streams).index("fake")
  z = generated.Noise("normal", NZ).sample(
      generated.noise_key(state.rng, state.step, fake_index, 0), B)
  z2 = generated.Noise("normal", NZ).sample(
      generated.noise_key(state.rng, state.step, fake_index, 3), B)

  def run(m, params, stats, inp, keep=True):
    out, new = m.apply_outputs({"params": params, "batch_stats": stats}, inp, train=True,
                               update_stats=keep)
    return out, (new if keep else stats)

  def apply(m, ms, grads):
    updates, opt = m.tx.update(grads, ms.opt_state, ms.params)
    return ms.replace(params=optax.apply_updates(ms.params, updates), opt_state=opt)

  # (1) D: netD(data), fake = netG(noise), netD(fake.detach())
  fake, g_stats = run(G, s["generator"].params, s["generator"].batch_stats, z)
  fake = fake["images"]

  def d_loss(p):
    o_real, st = run(D, p, s["discriminator"].batch_stats, x)
    o_fake, st = run(D, p, st, fake)
    return (confidence_gan.bce_with_logits(o_real["score"], 1.0)
            + confidence_gan.bce_with_logits(o_fake["score"], 0.0)), st
  (_, d_stats), grads = jax.value_and_grad(d_loss, has_aux=True)(s["discriminator"].params)
  s["discriminator"] = apply(D, s["discriminator"], grads).replace(batch_stats=d_stats)
  s["generator"] = s["generator"].replace(batch_stats=g_stats)

  # (2) G: netD(fake) -> real, beta * KL(U || model(fake)); D and C not updated
  def g_loss(p):
    f, _ = run(G, p, s["generator"].batch_stats, z, keep=False)
    o_d, d_st = run(D, s["discriminator"].params, s["discriminator"].batch_stats, f["images"])
    o_c, c_st = run(C, s["classifier"].params, s["classifier"].batch_stats, f["images"])
    return (confidence_gan.bce_with_logits(o_d["score"], 1.0)
            + beta * confidence_loss(o_c["logits"])), (d_st, c_st)
  (_, (d_stats, c_stats)), grads = jax.value_and_grad(g_loss, has_aux=True)(
      s["generator"].params)
  s["generator"] = apply(G, s["generator"], grads)
  s["discriminator"] = s["discriminator"].replace(batch_stats=d_stats)
  s["classifier"] = s["classifier"].replace(batch_stats=c_stats)

  # (3) classifier: NLL(model(data)), fresh fake = netG(noise'), beta * KL(U || model(fake))
  fake2, g_stats = run(G, s["generator"].params, s["generator"].batch_stats, z2)
  s["generator"] = s["generator"].replace(batch_stats=g_stats)

  def c_loss(p):
    o_in, st = run(C, p, s["classifier"].batch_stats, x)
    o_out, st = run(C, p, st, fake2["images"])
    ce = optax.softmax_cross_entropy_with_integer_labels(o_in["logits"], y).mean()
    return ce + beta * confidence_loss(o_out["logits"]), st
  (_, c_stats), grads = jax.value_and_grad(c_loss, has_aux=True)(s["classifier"].params)
  s["classifier"] = apply(C, s["classifier"], grads).replace(batch_stats=c_stats)
  return s


@pytest.fixture(scope="module")
def toy():
  c = gan_config()
  spec = spec_of(c)
  state = state_lib.create_state(spec.modules, jax.random.PRNGKey(0))
  step = jax.jit(step_lib.make_train_step(spec))
  return c, spec, state, step


def _assert_trees_close(a, b, what, atol=2e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  for u, v in zip(la, lb):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=atol, err_msg=what)


@pytest.mark.slow
def test_engine_step_equals_the_three_updates_written_by_hand(toy):
  c, spec, state, step = toy
  assert [u.name for u in spec.updates] == ["discriminator", "generator", "classifier"]
  # float32 (the engine's compute dtype): the two sides run the same ops in the
  # same order, so they agree to rounding.
  s_jax = state
  s_hand = {n: state.modules[n] for n in state.modules}
  for i in range(2):
    batch = batch_of(i)
    want = hand_written_step(spec, s_jax, batch, beta=0.1)
    s_jax, metrics = step(s_jax, batch, s_jax.rng, {})
    for n in want:
      _assert_trees_close(s_jax.modules[n].params, want[n].params, f"step {i}: {n} params")
      _assert_trees_close(s_jax.modules[n].batch_stats, want[n].batch_stats,
                          f"step {i}: {n} batch stats")
    assert {"discriminator/d_real", "generator/d_fake", "classifier/fake/msp"} <= set(metrics)
  del s_hand


@pytest.mark.slow
def test_each_update_changes_only_its_modules_parameters(toy):
  c, spec, state, _ = toy
  before = jax.device_get(state.modules)
  for u in spec.updates:
    one = step_lib.StepSpec(modules=spec.modules, streams=spec.streams, updates=[u],
                            num_classes=K)
    after, m = jax.jit(step_lib.make_train_step(one))(state, batch_of(0), state.rng, {})
    for n in before:
      changed = any(not np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(before[n].params), jax.tree.leaves(jax.device_get(after.modules[n].params))))
      assert changed == (n == u.module), (u.name, n)
    assert float(m["grad_norm"]) > 0, u.name


@pytest.mark.slow
def test_generator_gradient_flows_through_discriminator_and_classifier(toy):
  c, spec, state, _ = toy
  gen_update = [u for u in spec.updates if u.name == "generator"]
  norms = {}
  for beta in (0.0, 0.1):
    cb = gan_config(beta)
    sb = spec_of(cb)
    one = step_lib.StepSpec(modules=sb.modules, streams=sb.streams,
                            updates=[u for u in sb.updates if u.name == "generator"],
                            num_classes=K)
    after, _ = jax.jit(step_lib.make_train_step(one))(state, batch_of(0), state.rng, {})
    norms[beta] = jax.device_get(after.modules["generator"].params)
  assert gen_update
  # beta = 0: the gradient through D alone moves G; beta > 0 adds the classifier's.
  before = jax.device_get(state.modules["generator"].params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(norms[0.0])))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(norms[0.0]),
                                                   jax.tree.leaves(norms[0.1])))


@pytest.mark.slow
def test_beta_zero_reduces_the_classifier_update_to_cross_entropy(toy):
  _, _, state, _ = toy
  cz = gan_config(0.0)
  sz = spec_of(cz)
  only_c = step_lib.StepSpec(modules=sz.modules, streams=sz.streams,
                             updates=[u for u in sz.updates if u.name == "classifier"],
                             num_classes=K)
  got, _ = jax.jit(step_lib.make_train_step(only_c))(state, batch_of(0), state.rng, {})
  ce = gan_config(0.0)
  ce.losses = {"cross_entropy": {}}
  ce.updates = {}
  del ce.streams["fake"]
  ce.modules = {}
  sc = spec_of(ce)
  want, _ = jax.jit(step_lib.make_train_step(sc))(
      state.replace(modules={"classifier": state.modules["classifier"]}), batch_of(0),
      state.rng, {})
  _assert_trees_close(got.modules["classifier"].params, want.modules["classifier"].params,
                      "classifier params", atol=1e-7)


@pytest.mark.slow
def test_pmap_twin_runs_the_joint_step(toy):
  _, spec, state, _ = toy
  devices = jax.local_devices()[:2]
  c = gan_config()
  c.parallelism = "pmap"
  sp = spec_of(c)
  step = step_lib.pmap_train_step(step_lib.make_train_step(sp, axis_name="batch"))
  replicated = step_lib.replicate_for_pmap(state, devices)
  b = batch_of(0)
  sharded = jax.tree.map(lambda v: v.reshape((len(devices), -1) + v.shape[1:]), b)
  after, m = step(replicated, sharded, state.rng, {})
  after = step_lib.unreplicate(after)
  for n in ("generator", "discriminator", "classifier"):
    assert not np.allclose(jax.tree.leaves(after.modules[n].params)[0],
                           jax.tree.leaves(state.modules[n].params)[0]), n
  assert np.all(np.isfinite(np.asarray(m["classifier/loss"])))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.streams.fake.update(source="module:gen"), "no such module"),
    (lambda c: c.streams.fake.update(source="generator"), "module:<name>"),
    (lambda c: c.streams.fake.update(noise="gauss(8)"), "normal(d)"),
    (lambda c: c.streams.fake.update(noise="normal(9)"), "takes inputs of shape (8,)"),
    (lambda c: c.streams.fake.update(pp="flip"), "reads no data"),
    (lambda c: c.modules.generator.model.kwargs.update(channels=3),
     "generates images of shape (32, 32, 3)"),
    (lambda c: c.modules.generator.model.update(name="toy_no_images"), "returns no 'images'"),
    (lambda c: c.updates.classifier.update(fresh_noise=("train",)), "not a generated stream"),
])
def test_bad_generated_streams_are_one_clear_error(change, message):
  c = gan_config()
  change(c)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    spec_of(c)


def test_a_generated_stream_has_no_labels():
  b = generated.GeneratedBatch({"mask": np.ones(2, bool)}, "fake", "generator")
  with pytest.raises(KeyError, match="generated by module 'generator'"):
    b["label"]
