"""A recipe whose second stage fails on one process only (``arg``, default 1)
while the others enter a collective: without error propagation they would
wait there forever. For the multi-process fault tests."""

import jax
from jax.experimental import multihost_utils

from jaxrobust import stages
from tests.run_configs import train_predict


def fail_on_process(ctx, *, process: int = 1):
  del ctx
  if jax.process_index() == process:
    raise ValueError(f"injected failure on process {process}")
  multihost_utils.sync_global_devices("never reached by the failing process")
  return {}


stages.TASKS.unregister("fail_on_process")  # the config file may be loaded twice
stages.TASKS.register("fail_on_process")(fail_on_process)


def get_config(arg=None):
  c = train_predict.get_config()
  c.stages = {"fail": {"task": "fail_on_process", "process": int(arg or 1)}}
  return c
