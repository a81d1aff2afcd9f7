"""Optimizers and learning-rate schedules from config, built with optax.

``name`` is sgd, adam, adamw, rmsprop (Noisy Student's optimiser) or lars
(SimCLR's). Defaults follow Hendrycks et al. (2019) and Liu et al. (2020): SGD with Nesterov
momentum 0.9, L2 weight decay 5e-4 added to the gradient *before* momentum on all
parameters (PyTorch ``SGD(weight_decay=...)``; ``weight_decay_on='kernels'``
excludes biases and BatchNorm), cosine annealing per step. Their code anneals to
1e-6 (``end_learning_rate=1e-6``).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: float) -> optax.Schedule:
  """The per-step learning rate described by ``config.optimizer``.

  Update ``t`` (0-based) uses ``schedule(t + schedule_offset)``: 0 is optax's
  convention; 1 is the PyTorch reference code that calls
  ``scheduler.step()`` before ``optimizer.step()`` in every iteration
  (Hendrycks et al.'s ``tune.py``/``baseline.py``, the OE and energy code),
  whose first update is already annealed one step and whose last uses the
  final learning rate.
  """
  lr = float(cfg.learning_rate)
  end = float(cfg.end_learning_rate)
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps and warmup > 0:
    raise ValueError(
        f"config.optimizer.warmup_epochs={cfg.warmup_epochs} is {warmup} steps, not fewer "
        f"than the {total_steps} training steps.")
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  elif cfg.schedule == "step":
    boundaries = {int(round(e * steps_per_epoch)) - warmup: cfg.step_factor
                  for e in cfg.step_epochs}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise ValueError(
        f"unknown config.optimizer.schedule {cfg.schedule!r}; known: cosine, constant, linear, step.")
  schedule = main if warmup <= 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  offset = int(cfg.get("schedule_offset", 0))
  if offset not in (0, 1):
    raise ValueError(f"config.optimizer.schedule_offset must be 0 or 1, got {offset!r}.")
  return schedule if offset == 0 else (lambda step: schedule(step + offset))


def _kernel_mask(params: Any) -> Any:
  """True for weight matrices/filters (ndim > 1): no decay on biases and BN."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule
                     ) -> optax.GradientTransformation:
  """The optax transformation described by ``config.optimizer``."""
  if cfg.weight_decay_on not in ("all", "kernels"):
    raise ValueError(
        f"config.optimizer.weight_decay_on must be 'all' or 'kernels', got {cfg.weight_decay_on!r}.")
  mask = None if cfg.weight_decay_on == "all" else _kernel_mask
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  name = cfg.name
  if name in ("sgd", "adam", "rmsprop") and cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
  if name == "sgd":
    parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif name == "adam":
    parts.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  elif name == "adamw":
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=mask))
  elif name == "rmsprop":
    parts.append(optax.rmsprop(schedule, decay=cfg.b2, eps=cfg.eps,
                               momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif name == "lars":
    # SimCLR (Chen et al. 2020): LARS with momentum 0.9; with weight_decay_on='kernels'
    # biases and BatchNorm get neither weight decay nor the trust ratio, as in their code.
    parts.append(optax.lars(schedule, weight_decay=cfg.weight_decay,
                            weight_decay_mask=mask or True, trust_ratio_mask=mask or True,
                            momentum=cfg.momentum, nesterov=cfg.nesterov))
  else:
    raise ValueError(f"unknown config.optimizer.name {name!r}; known: sgd, adam, adamw, "
                     "rmsprop, lars.")
  return optax.chain(*parts)
