"""Checkpoints across topologies: a run saved on 8 devices resumes on 4, on
1, on 2 processes × 4 devices, and with FSDP-sharded instead of replicated
parameters (and one saved FSDP-sharded resumes replicated), ending where an
uninterrupted 8-device run ends (constant learning rate, so stopping at step 2
and going on to step 4 is the same trajectory)."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrobust import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each test resumes a real run in a new process (the module fixture runs three).
pytestmark = pytest.mark.slow

FSDP = "--config.sharding_rules=(('.*', \"fsdp(axis='data', min_size=1)\"),)"


def _args(workdir, data_dir, steps):
  return ["--config", "tests/run_configs/two_streams.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.num_steps={steps}",
          "--config.checkpoint_every_steps=2", "--config.optimizer.schedule=constant",
          "--config.progress_bar=False"]


def _run(cmd):
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "XLA_FLAGS": ""})
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out.stdout + out.stderr


def _train(workdir, data_dir, steps, devices, *extra):
  return _run([sys.executable, "-m", "launch.train", f"--host_devices={devices}",
               *_args(workdir, data_dir, steps), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("topology")
  _train(root / "straight", data_dir, 4, 8)
  _train(root / "half", data_dir, 2, 8)
  _train(root / "half_fsdp", data_dir, 2, 8, FSDP)
  return root


@pytest.mark.parametrize("how", ["4 devices", "1 device",
                                 pytest.param("2 processes x 4", marks=pytest.mark.multiprocess),
                                 "fsdp on 8", "replicated on 8 from fsdp"])
def test_resume_on_another_topology_ends_like_the_straight_run(how, runs, data_dir, tmp_path):
  work = tmp_path / "resumed"
  shutil.copytree(runs / ("half_fsdp" if how.endswith("from fsdp") else "half"), work)
  os.remove(work / "results.json")
  if how == "2 processes x 4":
    log = _run([sys.executable, "-m", "launch.local_cluster", "--processes", "2",
                "--devices_per_process", "4", "--", *_args(work, data_dir, 4)])
  else:
    devices = {"4 devices": 4, "1 device": 1, "fsdp on 8": 8, "replicated on 8 from fsdp": 8}[how]
    log = _train(work, data_dir, 4, devices, *([FSDP] if how == "fsdp on 8" else []))
  assert "resumed from step 2" in log
  got = ckpt_lib.load_pretrained(str(work))[0]
  want = ckpt_lib.load_pretrained(str(runs / "straight"))[0]
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
