"""Saliency maps: guided back-propagation against a numpy reference, on the
zoo's models unedited, under jit, and its ReLU rewrite leaving nothing behind."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import relu as imported_relu

from jaxrobust import plots
from jaxrobust import saliency as sal
from jaxrobust.models import get_model

ORIGINAL_RELU = jax.nn.relu


def _images(b=3, h=4, w=4, c=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, c)), jnp.float32)


# ----------------------------------------------------------------------------- a hand-built MLP

def _mlp_params(d, seed=1):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=s).astype(np.float32) for s in ((d, 6), (6,), (6, 5), (5,), (5, 4))]


def _mlp(params, x):
  w1, b1, w2, b2, w3 = params
  h = x.reshape(x.shape[0], -1)
  h = jax.nn.relu(h @ w1 + b1)
  h = jax.nn.relu(h @ w2 + b2)
  return h @ w3


def _numpy_maps(params, x, target):
  """(guided, plain) gradients of the target logit, by hand: guided masks the
  backward signal by ``pre-activation > 0`` and ``signal > 0`` at each ReLU."""
  w1, b1, w2, b2, w3 = [np.asarray(p, np.float64) for p in params]
  x = np.asarray(x, np.float64)
  h0 = x.reshape(x.shape[0], -1)
  z1 = h0 @ w1 + b1
  z2 = np.maximum(z1, 0) @ w2 + b2
  g3 = np.eye(w3.shape[1])[np.asarray(target)] @ w3.T  # d logit / d relu(z2)
  out = []
  for guided in (True, False):
    g = g3 * (z2 > 0) * ((g3 > 0) if guided else 1)
    g = g @ w2.T
    g = g * (z1 > 0) * ((g > 0) if guided else 1)
    out.append((g @ w1.T).reshape(x.shape))
  return out


def test_guided_backprop_of_a_relu_mlp_equals_the_numpy_reference():
  x = _images()
  params = _mlp_params(x[0].size)
  target = jnp.array([0, 3, 2])
  guided_ref, plain_ref = _numpy_maps(params, x, target)
  assert np.abs(guided_ref - plain_ref).max() > 0.1  # the example exercises the guided mask
  f = functools.partial(_mlp, params)
  np.testing.assert_allclose(sal.guided_backprop(f, x, target), guided_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sal.input_gradients(f, x, target), plain_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sal.gradient_times_input(f, x, target),
                             np.asarray(x) * plain_ref, rtol=1e-5, atol=1e-5)
  # Forward values are those of the model, bit for bit.
  np.testing.assert_array_equal(sal.with_guided_relus(f)(x), f(x))


def test_without_relus_guided_backprop_is_the_input_gradient():
  x = _images()
  w = jnp.asarray(np.random.default_rng(2).normal(size=(x[0].size, 5)) / 10, jnp.float32)
  f = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) @ w)
  target = jnp.array([4, 0, 1])
  plain = sal.input_gradients(f, x, target)
  assert float(jnp.abs(plain).min()) > 0
  np.testing.assert_array_equal(sal.guided_backprop(f, x, target), plain)


def test_a_negative_gradient_through_a_relu_is_stopped():
  x = jnp.full((2, 1, 1, 2), 0.5)  # relu's input 1 > 0 in both rows

  def f(z):
    r = jax.nn.relu(z.sum(axis=(1, 2, 3)))
    return jnp.stack([-r, 2 * r], axis=1)

  target = jnp.array([0, 1])
  np.testing.assert_array_equal(sal.input_gradients(f, x, target)[:, 0, 0, :],
                                [[-1, -1], [2, 2]])
  np.testing.assert_array_equal(sal.guided_backprop(f, x, target)[:, 0, 0, :],
                                [[0, 0], [2, 2]])


# ----------------------------------------------------------------------------- how ReLUs are found

class _Net(nn.Module):
  """conv-ReLU-dense-ReLU-dense with the ReLU reached in four ways."""
  how: str = "attribute"
  act: Callable = nn.relu  # bound when the class is defined

  @nn.compact
  def __call__(self, x):
    relu = {"attribute": self.act, "jax": jax.nn.relu, "imported": imported_relu,
            "maximum": lambda v: jnp.maximum(v, 0.0)}[self.how]
    x = relu(nn.Conv(3, (3, 3))(x))
    x = relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    return nn.Dense(4)(x)


@pytest.mark.parametrize("how", ["attribute", "jax", "imported"])
def test_every_way_of_calling_relu_is_guided(how):
  x = _images(seed=3)
  target = jnp.array([1, 2, 3])
  variables = _Net().init(jax.random.key(0), x)
  f = functools.partial(_Net(how=how).apply, variables)
  reference = sal.input_gradients(
      functools.partial(_Net(act=sal.guided_relu).apply, variables), x, target)
  guided = sal.guided_backprop(f, x, target)
  np.testing.assert_allclose(guided, reference, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(guided - sal.input_gradients(f, x, target)).max()) > 1e-3


def test_bare_maximum_only_on_request_and_norm_layers_keep_their_gradient():
  x = _images(seed=4)
  target = jnp.array([0, 1, 2])
  variables = _Net().init(jax.random.key(0), x)
  f = functools.partial(_Net(how="maximum").apply, variables)
  reference = sal.input_gradients(
      functools.partial(_Net(act=sal.guided_relu).apply, variables), x, target)
  np.testing.assert_array_equal(sal.guided_backprop(f, x, target),
                                sal.input_gradients(f, x, target))
  np.testing.assert_allclose(sal.guided_backprop(f, x, target, bare_maximum=True), reference,
                             rtol=1e-6, atol=1e-7)
  # Zeros as a constant array or a broadcast zero count too; a non-zero floor does not.
  rng = np.random.default_rng(9)
  w = jnp.asarray(rng.normal(size=(x[0].size, 6)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  floors = {"constant": lambda h: jnp.maximum(np.zeros(h.shape, np.float32), h),
            "zeros_like": lambda h: jnp.maximum(h, jnp.zeros_like(h)),
            "guided": sal.guided_relu, "floor 0.1": lambda h: jnp.maximum(h, 0.1)}
  maps = {k: sal.guided_backprop(lambda z, floor=floor: floor(z.reshape(3, -1) @ w) @ w2, x,
                                 target, bare_maximum=True) for k, floor in floors.items()}
  np.testing.assert_array_equal(maps["constant"], maps["guided"])
  np.testing.assert_array_equal(maps["zeros_like"], maps["guided"])
  floor = lambda z: jnp.maximum(z.reshape(3, -1) @ w, 0.1) @ w2
  np.testing.assert_array_equal(maps["floor 0.1"], sal.input_gradients(floor, x, target))
  relu = lambda z: jax.nn.relu(z.reshape(3, -1) @ w) @ w2
  assert float(jnp.abs(maps["guided"] - sal.input_gradients(relu, x, target)).max()) > 1e-3
  # LayerNorm's max(0, variance) is not a ReLU: untouched by default.
  ln = nn.LayerNorm()
  lv = ln.init(jax.random.key(0), x.reshape(3, -1))
  g = lambda z: ln.apply(lv, z.reshape(3, -1))[:, :4]
  assert "max" in str(jax.make_jaxpr(g)(x))
  np.testing.assert_array_equal(sal.guided_backprop(g, x, target),
                                sal.input_gradients(g, x, target))


def test_relus_inside_scan_cond_remat_and_jit_are_guided():
  x = _images(seed=5)
  w = jnp.asarray(np.random.default_rng(6).normal(size=(x[0].size, x[0].size)) / 5, jnp.float32)
  target = jnp.array([0, 5, 9])

  def model(act):
    def f(z):
      h = z.reshape(z.shape[0], -1)
      h, _ = jax.lax.scan(lambda c, _: (act(c @ w), None), h, None, length=2)
      h = jax.lax.cond(h.sum() > -1e9, lambda v: act(v @ w), lambda v: v, h)
      h = jax.checkpoint(lambda v: act(v @ w))(h)
      h = jax.jit(lambda v: act(v @ w))(h)
      return h @ w
    return f

  guided = sal.guided_backprop(model(jax.nn.relu), x, target)
  np.testing.assert_allclose(guided, sal.input_gradients(model(sal.guided_relu), x, target),
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(guided - sal.input_gradients(model(jax.nn.relu), x, target)).max()) > 1e-3


def test_a_relu_the_rewrite_cannot_reach_is_an_error():
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
  f = jax.shard_map(lambda z: jax.nn.relu(z.reshape(z.shape[0], -1))[:, :3], mesh=mesh,
                    in_specs=P(), out_specs=P())
  with pytest.raises(NotImplementedError, match="shard_map"):
    sal.guided_backprop(f, _images(), jnp.array([0, 1, 2]))


# ----------------------------------------------------------------------------- jit

def test_jit_equals_eager_also_for_a_jitted_apply_fn_and_closed_over_tracers():
  x = _images()
  params = _mlp_params(x[0].size)
  target = jnp.array([0, 3, 2])
  guided_ref, _ = _numpy_maps(params, x, target)
  f = functools.partial(_mlp, params)
  jitted = jax.jit(functools.partial(sal.guided_backprop, f))
  np.testing.assert_allclose(jitted(x, target), guided_ref, rtol=1e-5, atol=1e-5)
  # A jit-compiled apply_fn already traced (its cache holds plain ReLUs).
  fj = jax.jit(f)
  fj(x)
  np.testing.assert_allclose(sal.guided_backprop(fj, x, target), guided_ref, rtol=1e-5, atol=1e-5)
  # Parameters as arguments of an outer jit, closed over by apply_fn.
  outer = jax.jit(lambda p, x, t: sal.guided_backprop(functools.partial(_mlp, p), x, t))
  np.testing.assert_allclose(outer(params, x, target), guided_ref, rtol=1e-5, atol=1e-5)
  for fn in (sal.input_gradients, sal.gradient_times_input):
    np.testing.assert_allclose(jax.jit(functools.partial(fn, f))(x, target), fn(f, x, target),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- the zoo's models

def _variables(model, x, seed=0):
  """Random parameters and running statistics (init's shapes; no init compile)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def leaf(path, sd):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 1.5, sd.shape), sd.dtype)
    scale = 1 / np.sqrt(max(1, int(np.prod(sd.shape[:-1]))))
    return jnp.asarray(rng.normal(0, scale, sd.shape), sd.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.mark.parametrize("name,kwargs,relus", [
    ("small_cnn", {"stage_widths": ((4,), (4, 4))}, 3),
    ("wrn", {"depth": 10, "width": 1}, 7),
    pytest.param("preact_resnet18", {}, 17, marks=pytest.mark.slow),  # ~10 s of compiling
])
@pytest.mark.slow
def test_zoo_models_are_guided_without_editing_them(name, kwargs, relus, monkeypatch):
  """Every ReLU of the model (as many as ``nn.relu`` calls) is rewritten; the
  map equals the model run with ``nn.relu`` swapped for the guided ReLU (the
  test's own reference) and differs from the plain gradient; eval mode,
  BatchNorm with non-trivial running statistics; one jit for all."""
  x = jnp.asarray(np.random.default_rng(7).uniform(size=(2, 8, 8, 3)), jnp.float32)
  target = jnp.array([1, 4])
  model = get_model(name, num_classes=5, **kwargs)
  variables = _variables(model, x)
  f = lambda z: model.apply(variables, z, train=False)
  guided_relu, rewritten, calls = sal.guided_relu, [], []

  def counting(fn, seen):
    return lambda v: seen.append(v.shape) or fn(v)

  def maps(x):
    monkeypatch.setattr(sal, "guided_relu", counting(guided_relu, rewritten))
    g = sal.guided_backprop(f, x, target)
    monkeypatch.setattr(nn, "relu", counting(guided_relu, calls))
    ref = sal.input_gradients(f, x, target)
    monkeypatch.undo()
    return g, ref, sal.input_gradients(f, x, target)

  g, ref, plain = jax.jit(maps)(x)
  assert len(rewritten) == len(calls) == relus
  assert nn.relu is ORIGINAL_RELU and sal.guided_relu is guided_relu
  np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g - plain).max()) > 1e-3 * float(jnp.abs(plain).max())
  if name != "preact_resnet18":  # forward values unchanged (the costly one left out)
    np.testing.assert_array_equal(sal.with_guided_relus(f)(x), f(x))


# ----------------------------------------------------------------------------- no state left behind

def _relu_is_normal():
  assert jax.nn.relu is ORIGINAL_RELU and nn.relu is ORIGINAL_RELU
  g = jax.grad(lambda v: -jax.nn.relu(v).sum())(jnp.array([1.0, -1.0]))
  np.testing.assert_array_equal(g, [-1.0, 0.0])


def test_relu_is_normal_after_a_call_and_after_an_exception():
  x = _images()
  params = _mlp_params(x[0].size)
  sal.guided_backprop(functools.partial(_mlp, params), x, jnp.array([0, 1, 2]))
  _relu_is_normal()

  def failing(z):
    jax.nn.relu(z)
    raise RuntimeError("model failed")

  with pytest.raises(RuntimeError, match="model failed"):
    sal.guided_backprop(failing, x, jnp.array([0, 1, 2]))
  _relu_is_normal()


# ----------------------------------------------------------------------------- errors

def test_clear_errors():
  x = _images()
  params = _mlp_params(x[0].size)
  f = functools.partial(_mlp, params)
  ok = jnp.array([0, 1, 2])
  for fn in (sal.guided_backprop, sal.input_gradients, sal.gradient_times_input):
    with pytest.raises(ValueError, match=r"target must be \[B\]"):
      fn(f, x, ok[:2])
    with pytest.raises(ValueError, match=r"target must be \[B\]"):
      fn(f, x, ok[:, None])
    with pytest.raises(TypeError, match="integer"):
      fn(f, x, ok.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"images \[B, H, W, C\]"):
      fn(f, x.reshape(3, 4, -1), ok)
    with pytest.raises(TypeError, match="floating"):
      fn(f, x.astype(jnp.int32), ok)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
      fn(f, x, jnp.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
      fn(f, x, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"logits \[B, K\]"):
      fn(lambda z: (f(z), z), x, ok)
  # Under jit the range cannot be checked: an out-of-range row's map is zero.
  m = jax.jit(functools.partial(sal.guided_backprop, f))(x, jnp.array([0, 9, 1]))
  assert float(jnp.abs(m[1]).max()) == 0 and float(jnp.abs(m[0]).max()) > 0


# ----------------------------------------------------------------------------- figure

def test_saliency_grid_writes_normalised_maps(tmp_path):
  rng = np.random.default_rng(8)
  images = rng.uniform(size=(3, 5, 5, 3))
  maps = {"cross-entropy": rng.normal(size=(3, 5, 5, 3)),
          "joint confidence": rng.normal(size=(3, 5, 5, 3)) * [[[[1]]], [[[100]]], [[[0]]]]}
  path = tmp_path / "fig" / "saliency.png"
  fig = plots.saliency_grid(images, maps, row_labels=["in", "in", "out"], path=str(path),
                            title="guided backprop")
  assert path.stat().st_size > 1000
  assert [p.name for p in path.parent.iterdir()] == ["saliency.png"]  # no temporary left
  axes = np.array(fig.axes).reshape(3, 3)
  assert [ax.get_title() for ax in axes[0]] == ["input", "cross-entropy", "joint confidence"]
  assert [ax.get_ylabel() for ax in axes[:, 0]] == ["in", "in", "out"]
  assert fig._suptitle.get_text() == "guided backprop"
  np.testing.assert_allclose(axes[1, 0].images[0].get_array(), images[1])
  for r in range(3):
    expected = np.abs(maps["joint confidence"][r]).max(-1)
    expected = expected / expected.max() if expected.max() else expected
    np.testing.assert_allclose(axes[r, 2].images[0].get_array(), expected, atol=1e-12)
  assert "normalised per image" in plots.saliency_grid(images, maps)._suptitle.get_text()
  with pytest.raises(ValueError, match="maps_by_model"):
    plots.saliency_grid(images, {"a": maps["cross-entropy"][:2]})
