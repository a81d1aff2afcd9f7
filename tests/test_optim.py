"""Optimizer and schedule match the reference (PyTorch SGD + Hendrycks cosine)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrobust import optim
from jaxrobust.config import base_config


def _opt(**kw):
  cfg = base_config().optimizer
  cfg.update(kw)
  return cfg


def hendrycks_cosine(step, total, lr, lr_min):
  """HPT/OE `cosine_annealing` through LambdaLR: lr * (lr_min/lr + (1 - lr_min/lr) * ...)."""
  return lr * (lr_min / lr + (1 - lr_min / lr) * 0.5 * (1 + np.cos(step / total * np.pi)))


def torch_sgd_reference(p, grads, lrs, momentum, wd, nesterov):
  """numpy port of torch.optim.SGD.step (dampening 0)."""
  buf = None
  for g, lr in zip(grads, lrs):
    d = g + wd * p
    buf = d.copy() if buf is None else momentum * buf + d
    d = d + momentum * buf if nesterov else buf
    p = p - lr * d
  return p


def test_cosine_schedule_matches_hendrycks():
  cfg = _opt(learning_rate=0.1, end_learning_rate=1e-6)
  sched = optim.learning_rate_schedule(cfg, total_steps=1000, steps_per_epoch=10)
  for t in (0, 1, 250, 500, 999, 1000):
    np.testing.assert_allclose(sched(t), hendrycks_cosine(t, 1000, 0.1, 1e-6), rtol=1e-5, atol=1e-9)


def test_schedule_offset_is_scheduler_step_before_optimizer_step():
  """tune.py/baseline.py call scheduler.step() before optimizer.step(): update
  t uses LambdaLR's value after t + 1 scheduler steps; the last update uses
  the final learning rate."""
  cfg = _opt(learning_rate=0.1, end_learning_rate=1e-6, schedule_offset=1)
  sched = optim.learning_rate_schedule(cfg, total_steps=20, steps_per_epoch=10)
  want = [hendrycks_cosine(t + 1, 20, 0.1, 1e-6) for t in range(20)]
  np.testing.assert_allclose([sched(t) for t in range(20)], want, rtol=1e-5, atol=1e-9)
  assert float(sched(19)) == pytest.approx(1e-6, rel=1e-3)
  with pytest.raises(ValueError, match="schedule_offset must be 0 or 1, got 2"):
    optim.learning_rate_schedule(_opt(schedule_offset=2), total_steps=20, steps_per_epoch=10)


def test_warmup_then_cosine():
  cfg = _opt(learning_rate=0.2, warmup_epochs=1.0)
  sched = optim.learning_rate_schedule(cfg, total_steps=110, steps_per_epoch=10)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.1, 0.2], atol=1e-7)
  assert sched(109) < 0.01


def test_step_schedule():
  cfg = _opt(learning_rate=0.1, schedule="step", step_epochs=(6, 8), step_factor=0.1)
  sched = optim.learning_rate_schedule(cfg, total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([sched(59), sched(60), sched(80)], [0.1, 0.01, 0.001], rtol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_equals_pytorch_sgd_with_coupled_weight_decay(nesterov):
  cfg = _opt(learning_rate=0.1, nesterov=nesterov, weight_decay=5e-4)
  sched = optim.learning_rate_schedule(cfg, total_steps=6, steps_per_epoch=3)
  tx = optim.create_optimizer(cfg, sched)
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(6)]
  params, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  expected = torch_sgd_reference(p0.astype(np.float64), grads, [float(sched(t)) for t in range(6)],
                                 0.9, 5e-4, nesterov)
  np.testing.assert_allclose(params, expected, rtol=1e-5, atol=1e-6)


def test_weight_decay_on_kernels_skips_biases():
  cfg = _opt(learning_rate=1.0, momentum=0.0, weight_decay=0.1, weight_decay_on="kernels",
             schedule="constant")
  tx = optim.create_optimizer(cfg, optim.learning_rate_schedule(cfg, 10, 1))
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1)
  np.testing.assert_allclose(updates["bias"], 0.0)


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_other_optimizers_build_and_step(name):
  cfg = _opt(name=name, learning_rate=1e-3)
  tx = optim.create_optimizer(cfg, optim.learning_rate_schedule(cfg, 10, 1))
  p = jnp.ones(3)
  u, _ = tx.update(jnp.ones(3), tx.init(p), p)
  assert np.all(np.asarray(u) < 0)


def test_bad_optimizer_settings_are_named():
  with pytest.raises(ValueError, match="unknown config.optimizer.name 'sdg'"):
    optim.create_optimizer(_opt(name="sdg"), optax.constant_schedule(0.1))
  with pytest.raises(ValueError, match="unknown config.optimizer.schedule"):
    optim.learning_rate_schedule(_opt(schedule="cosin"), 10, 1)
  with pytest.raises(ValueError, match="warmup_epochs"):
    optim.learning_rate_schedule(_opt(warmup_epochs=20.0), 10, 1)
