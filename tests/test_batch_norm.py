"""jaxrobust's BatchNorm (issue 18): PyTorch's running-variance rule by
default, flax's exactly with ``running_variance='biased'``, and row masks that
make a pass over a subset of a static-shape batch equal to a pass over the
subset alone (GLC's separate gold and silver passes)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.models import layers

X = np.random.default_rng(0).normal(1.0, 2.0, (6, 3, 3, 4)).astype(np.float32)


def _run(bn, x, variables=None, rows=None):
  variables = variables or bn.init(jax.random.PRNGKey(0), x)
  with layers.batch_norm_rows(None if rows is None else jnp.asarray(rows)):
    y, mutated = bn.apply(variables, x, mutable=["batch_stats"])
  return np.asarray(y), jax.tree.map(np.asarray, mutated["batch_stats"]), variables


def test_running_variance_is_pytorchs_unbiased_rule():
  bn = layers.BatchNorm(use_running_average=False)
  y, stats, _ = _run(bn, X)
  n = 6 * 3 * 3
  mean, var = X.mean((0, 1, 2)), X.var((0, 1, 2))
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  np.testing.assert_allclose(y, (X - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_biased_rule_is_flax_two_pass_batchnorm():
  ours = layers.BatchNorm(use_running_average=False, running_variance="biased")
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                         use_fast_variance=False)
  y, stats, variables = _run(ours, X)
  y_ref, mutated = flax_bn.apply(variables, X, mutable=["batch_stats"])
  np.testing.assert_allclose(y, np.asarray(y_ref), rtol=1e-6, atol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats[k], np.asarray(mutated["batch_stats"][k]), rtol=1e-6)


def test_two_pass_variance_survives_a_large_mean():
  """float32 with a mean 1e3 times the spread: the two-pass variance is right
  (flax's default one-pass E[x²] − E[x]² is not)."""
  x = (1000.0 + np.random.default_rng(1).normal(0, 1, (64, 2, 2, 3))).astype(np.float32)
  bn = layers.BatchNorm(use_running_average=False, running_variance="biased")
  _, stats, _ = _run(bn, x)
  want = 0.9 + 0.1 * x.astype(np.float64).var((0, 1, 2))
  np.testing.assert_allclose(stats["var"], want, rtol=1e-4)
  fast = nn.BatchNorm(use_running_average=False, momentum=0.9)
  _, mutated = fast.apply(fast.init(jax.random.PRNGKey(0), x), x, mutable=["batch_stats"])
  assert not np.allclose(np.asarray(mutated["batch_stats"]["var"]), want, rtol=1e-2)


def test_a_row_mask_is_a_pass_over_the_subset_alone():
  bn = layers.BatchNorm(use_running_average=False)
  rows = np.array([True, False, True, True, False, False])
  y_mask, stats_mask, variables = _run(bn, X, rows=rows)
  y_sub, stats_sub, _ = _run(bn, X[rows], variables)
  np.testing.assert_allclose(y_mask[rows], y_sub, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats_mask[k], stats_sub[k], rtol=1e-5, atol=1e-6)
  # no row: running statistics kept, outputs finite
  y_none, stats_none, _ = _run(bn, X, variables, rows=np.zeros(6, bool))
  assert np.all(np.isfinite(y_none))
  for k in ("mean", "var"):
    np.testing.assert_array_equal(stats_none[k], np.asarray(variables["batch_stats"][k]))


def test_a_row_mask_on_a_sharded_batch_equals_one_device():
  bn = layers.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), X)
  rows = jnp.asarray([True, False, True, True, False, True, True, False])
  x = np.concatenate([X, X[:2] * 3.0])
  fn = lambda v, x, r: _masked_apply(bn, v, x, r)
  single = jax.jit(fn)(variables, x, rows)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = jax.jit(fn)(variables, jax.device_put(x, data), jax.device_put(rows, data))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               single, sharded)


def _masked_apply(bn, variables, x, rows):
  with layers.batch_norm_rows(rows):
    return bn.apply(variables, x, mutable=["batch_stats"])


def test_bad_running_variance_is_named():
  with pytest.raises(ValueError, match="running_variance must be one of"):
    layers.BatchNorm(use_running_average=False, running_variance="pytorch").init(
        jax.random.PRNGKey(0), X)


@pytest.mark.slow
def test_passes_by_group_equal_separate_passes_over_each_group():
  """Passes by group in a given order (here gold, then silver; GLC's recipe
  runs silver first): each group through the
  network alone (the step with passes_by_group=(1, 0)) equals two passes over
  the two sub-batches written out by hand, parameters and statistics."""
  from jaxrobust import losses, models, optim
  from jaxrobust import train_state as state_lib
  from jaxrobust import train_step as step_lib
  from jaxrobust.config import base_config
  from jaxrobust.data import pp
  from jaxrobust.modules import Module, masked_tx
  model = models.get_model("wrn", num_classes=4, depth=10, width=1)
  opt = base_config().optimizer
  opt.weight_decay = 0.0
  schedule = optim.learning_rate_schedule(opt, total_steps=2, steps_per_epoch=1)
  m = Module(name="classifier", model=model, num_classes=4, input_shape=(8, 8, 1), mean=(0.5,),
             std=(0.5,), tx=masked_tx(optim.create_optimizer(opt, schedule), ".*"),
             schedule=schedule)
  rng = np.random.default_rng(0)
  group = np.array([1, 0, 0, 1, 0, 0, 1, 0], np.int32)
  batch = {"train": {"image": rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8),
                     "label": rng.integers(0, 4, 8).astype(np.int32), "group": group,
                     "index": np.arange(8, dtype=np.int32), "mask": np.ones(8, bool)}}
  loss_fn = losses.build_loss(base_config().losses)
  spec = step_lib.StepSpec(
      modules={"classifier": m},
      streams={"train": step_lib.StreamStep("train", passes_by_group=(1, 0))},
      updates=[step_lib.Update("classifier", "classifier", loss_fn, ("train",))],
      num_classes=4)
  state = state_lib.create_state({"classifier": m}, jax.random.PRNGKey(0))
  new, _ = jax.jit(step_lib.make_train_step(spec))(state, batch, jax.random.PRNGKey(1), {})

  params, stats = state.modules["classifier"].params, state.modules["classifier"].batch_stats
  x = pp.to_unit_range(jnp.asarray(batch["train"]["image"]))
  y = jnp.asarray(batch["train"]["label"])

  def loss(p):
    total, st = 0.0, stats
    for g in (1, 0):
      rows = group == g
      out, st = m.apply_outputs({"params": p, "batch_stats": st}, x[rows], train=True)
      total = total - jnp.sum(jax.nn.log_softmax(out["logits"])[jnp.arange(rows.sum()), y[rows]])
    return total / 8, st

  grads, want_stats = jax.grad(loss, has_aux=True)(params)
  updates, _ = m.tx.update(grads, state.modules["classifier"].opt_state, params)
  want_params = optax_apply(params, updates)
  got = new.modules["classifier"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got.params, want_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got.batch_stats, want_stats)


def optax_apply(params, updates):
  import optax
  return optax.apply_updates(params, updates)
