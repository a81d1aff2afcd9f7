"""jaxrobust's own train step built from a stage config, for timing (shared by benchmarks)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxrobust import build, config as config_lib
from jaxrobust import train_state as state_lib
from jaxrobust import train_step as step_lib


def engine_step(c, image: tuple[int, int, int], num_classes: int) -> Callable[[], None]:
  """One call = one ``make_train_step`` step of config ``c`` (jitted, state
  donated) on a fixed random uint8 batch of the train stream's size, blocking
  until done. Every module starts from random parameters: ``init_from``
  (e.g. a teacher's checkpoint) fixes values, not cost, and is dropped."""
  for module in c.get("modules", {}).values():
    if "init_from" in module:
      module.init_from = {}
  config_lib.validate(c)
  modules = build.build_modules(c, num_classes=num_classes, image_shape=image, total_steps=1000,
                                steps_per_epoch=100.0)
  streams = build.build_stream_steps(c)
  updates = build.build_updates(c, modules, streams, {})
  spec = step_lib.StepSpec(modules=modules, streams=streams, updates=updates,
                           num_classes=num_classes)
  state = state_lib.create_state(modules, jax.random.PRNGKey(0))
  step = jax.jit(step_lib.make_train_step(spec), donate_argnums=(0,))
  b = c.streams.train.batch_size
  r = np.random.default_rng(0)
  batch = {"train": {"image": r.integers(0, 256, (b,) + tuple(image), dtype=np.uint8),
                     "label": r.integers(0, num_classes, b).astype(np.int32),
                     "mask": np.ones(b, bool), "index": np.arange(b, dtype=np.int32)}}
  rng = jax.random.PRNGKey(1)
  holder = [state]

  def run():
    holder[0], m = step(holder[0], batch, rng, {})
    jax.block_until_ready(m)
  return run
