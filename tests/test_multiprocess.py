"""Real multi-process runs on JAX's distributed runtime: 2 localhost
processes × 4 CPU devices (gloo collectives, `launch.local_cluster`) against
1 process × 8 devices -- the trainer, the evaluators, a checkpoint, and a
`predict` stage whose artifact is written once, in dataset index order."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from jaxrobust import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "tests/run_configs/train_predict.py", "--config.progress_bar=False"]


def _run(cmd, env=None):
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out.stdout


def test_two_processes_match_one_process(tmp_path, data_dir):
  data = f"--config.data.data_dir={data_dir}"
  env = {"XLA_FLAGS": ""}  # each side sets its own device count
  log = _run([sys.executable, "-m", "launch.local_cluster", "--processes", "2",
              "--devices_per_process", "4", "--", *ARGS, data, f"--workdir={tmp_path / 'two'}"],
             env)
  assert "[0]" in log and "[1]" in log
  _run([sys.executable, "-m", "launch.train", "--host_devices", "8", *ARGS, data,
        f"--workdir={tmp_path / 'one'}"], env)
  a = json.load(open(tmp_path / "two" / "results.json"))
  b = json.load(open(tmp_path / "one" / "results.json"))
  assert a.keys() == b.keys()
  for k in ("train/test/nll", "train/test/accuracy", "train/validation/nll"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
  pa = ckpt_lib.load_pretrained(str(tmp_path / "two" / "train"))[0]
  pb = ckpt_lib.load_pretrained(str(tmp_path / "one" / "train"))[0]
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  za = np.load(tmp_path / "two" / "predict" / "artifacts" / "predictions.npz")
  zb = np.load(tmp_path / "one" / "predict" / "artifacts" / "predictions.npz")
  np.testing.assert_array_equal(za["label"], zb["label"])  # dataset index order
  np.testing.assert_allclose(za["logits"], zb["logits"], atol=1e-4)
  # written once, by process 0: one artifact file, no leftovers
  assert sorted(os.listdir(tmp_path / "two" / "predict" / "artifacts")) == ["predictions.npz"]
