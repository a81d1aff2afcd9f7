"""Real multi-process runs on JAX's distributed runtime: 2 localhost
processes × 4 CPU devices (gloo collectives, `launch.local_cluster`).

* against 1 process × 8 devices: a three-stage recipe -- the trainer, the
  evaluators (streaming accumulators merged across processes), a checkpoint,
  a `predict` stage whose artifact is written once, in dataset index order,
  and a stage that reads it on every process;
* per-process input: each process reads its slice of the same global batches,
  for streams with samplers, index rules and label sources;
* faults: SIGTERM to one process (all stop at one step and resume
  bit-identically), an error on one process, a killed process, different
  configs, a coordinator that never answers, a batch the processes cannot
  split -- each ends every process with one line, never a hang.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxrobust import checkpoint as ckpt_lib
from launch import local_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test starts several real processes (minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ARGS = ["--config", "tests/run_configs/train_predict.py", "--config.progress_bar=False"]


def _run(cmd, env=None):
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out.stdout


def _cluster(args, processes=2, devices=4, module="launch.train"):
  return _run([sys.executable, "-m", "launch.local_cluster", "--processes", str(processes),
               "--devices_per_process", str(devices), "--module", module, "--", *args],
              {"XLA_FLAGS": ""})


def _start(args, processes=2, devices=4, per_process=None):
  """The processes of one run, started directly (to signal one of them);
  ``per_process(i)`` adds arguments to process ``i``."""
  env = local_cluster.environment(devices)
  cmds = local_cluster.commands(args, processes, local_cluster.free_port())
  return [subprocess.Popen(cmd + (per_process(i) if per_process else []), cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i, cmd in enumerate(cmds)]


def _finish(procs, timeout):
  """(return code, stderr) of every process; fails if one outlives ``timeout``."""
  deadline, out = time.time() + timeout, []
  for p in procs:
    try:
      _, err = p.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"a process was still running after {timeout} s (a hang)")
    out.append((p.returncode, err))
  return out


def _last_line(err):
  lines = [l for l in err.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


def _wait_for_lines(path, n, procs, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
      return
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    time.sleep(0.05)
  pytest.fail(f"{path} did not get {n} lines in {timeout} s")


def _params(workdir):
  return [np.asarray(x) for x in jax.tree.leaves(ckpt_lib.load_pretrained(str(workdir))[0])]


def _written(root):
  """{directory: its files} outside checkpoints (whose iterator files are per
  process by design); TensorBoard event files by kind, their names hold a pid."""
  out = {}
  for d, _, files in os.walk(root):
    rel = os.path.relpath(d, root)
    if "checkpoints" not in rel.split(os.sep):
      out[rel] = sorted("tfevents" if "tfevents" in f else f for f in files)
  return out


def test_two_processes_match_one_process(tmp_path, data_dir):
  data = f"--config.data.data_dir={data_dir}"
  log = _cluster([*ARGS, data, f"--workdir={tmp_path / 'two'}"])
  assert "[0]" in log and "[1]" in log
  _run([sys.executable, "-m", "launch.train", "--host_devices", "8", *ARGS, data,
        f"--workdir={tmp_path / 'one'}"], {"XLA_FLAGS": ""})
  a = json.load(open(tmp_path / "two" / "results.json"))
  b = json.load(open(tmp_path / "one" / "results.json"))
  assert a.keys() == b.keys()
  # streaming accumulators (NLL, calibration bins, the OOD score histograms
  # behind AUROC/FPR95) merged over the processes' shards
  for k in ("train/test/nll", "train/test/accuracy", "train/validation/nll",
            "train/test/rms_calibration_error", "train/ood/msp/blobs/auroc",
            "train/ood/energy/blobs/fpr95", "train/test/num_examples"):
    assert k in a, sorted(a)
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  for x, y in zip(_params(tmp_path / "two" / "train"), _params(tmp_path / "one" / "train")):
    np.testing.assert_allclose(x, y, atol=1e-5)
  za = np.load(tmp_path / "two" / "predict" / "artifacts" / "predictions.npz")
  zb = np.load(tmp_path / "one" / "predict" / "artifacts" / "predictions.npz")
  np.testing.assert_array_equal(za["label"], zb["label"])  # dataset index order
  np.testing.assert_allclose(za["logits"], zb["logits"], atol=1e-4)
  # only process 0 writes: the same logs, results, plots and artifacts as 1 process
  assert _written(tmp_path / "two") == _written(tmp_path / "one")
  # written once, by process 0: one artifact file, no leftovers; read by both
  # processes in the next stage (its labels), which trains like 1 process's
  assert sorted(os.listdir(tmp_path / "two" / "predict" / "artifacts")) == ["predictions.npz"]
  for k in ("relabel/test/nll", "relabel/test/accuracy"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  for x, y in zip(_params(tmp_path / "two" / "relabel"), _params(tmp_path / "one" / "relabel")):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_each_process_reads_its_slice_of_the_same_global_batches(tmp_path, data_dir):
  """Over more than an epoch of every stream (corrupted labels, a
  class-balanced sampler over an imbalanced index with class weights, a
  sequential sampler over a per-class subset): process p's rows at step s
  are rows [p·B/2, (p+1)·B/2) of the 1-process global batch s, label fields
  included, and the global sequence is the sampler's epochs back to back --
  no example read twice, none skipped."""
  from jaxrobust import artifacts as artifacts_lib
  from jaxrobust import build
  from jaxrobust.data import sources
  from tests import input_probe
  from tests.run_configs import input_streams
  steps = 40
  _cluster(["--config", "tests/run_configs/input_streams.py", f"--config.data.data_dir={data_dir}",
            f"--out={tmp_path}", f"--steps={steps}"], module="tests.input_probe")
  per = [np.load(tmp_path / f"process_{p}.npz") for p in range(2)]
  config = input_streams.get_config()
  config.data.data_dir = str(data_dir)
  one = input_probe.read_streams(config, steps)
  assert sorted(per[0].files) == sorted(one)
  for k in one:
    np.testing.assert_array_equal(np.concatenate([per[0][k], per[1][k]], axis=1), one[k], k)
  spec = sources.get_spec(config.data.name, data_dir=str(data_dir))
  built, _ = build.build_streams(config, num_classes=spec.num_classes,
                                 image_shape=spec.image_shape,
                                   artifacts=artifacts_lib.Artifacts())
  for name, stream in built.streams.items():
    read = one[f"{name}/index"].reshape(-1)
    epochs = -(-len(read) // stream.examples_per_epoch)
    assert epochs >= 2, name  # crosses an epoch boundary inside a batch
    expected = np.concatenate([stream.epoch(e) for e in range(epochs)])[:len(read)]
    np.testing.assert_array_equal(read, expected, name)
  train = one["train/index"].reshape(-1)[:built.streams["train"].examples_per_epoch]
  assert sorted(train) == list(range(len(train)))  # shuffle: every example once per epoch


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_bit_identically(
    tmp_path, data_dir):
  """SIGTERM reaches process 1 only (as a maintenance event on one host):
  JAX's preemption sync point stops both processes after the same step, a
  checkpoint is written, both exit with 143 and one line; the same command
  resumes and ends exactly where an uninterrupted 2-process run ends."""
  def args(workdir):
    return ["--config", "tests/run_configs/train_predict.py:two_stage",
            "--config.progress_bar=False", f"--config.data.data_dir={data_dir}",
            f"--workdir={workdir}", "--config.evaluators.ood.sets={}",
            "--config.num_steps=30", "--config.checkpoint_every_steps=1000",
            "--config.log_every_steps=2"]
  straight = _start(args(tmp_path / "straight"))
  term = _start(args(tmp_path / "term"))
  _wait_for_lines(tmp_path / "term" / "train" / "metrics.jsonl", 2, term)
  term[1].send_signal(signal.SIGTERM)
  ended = _finish(term, 300)
  assert [code for code, _ in ended] == [143, 143], [err[-3000:] for _, err in ended]
  steps = set()
  for _, err in ended:
    assert "Traceback" not in err
    last = _last_line(err)
    assert last.startswith("preempted (SIGTERM) at step ") and "run the same command" in last
    steps.add(int(last.split("at step ")[1].split(":")[0]))
  assert len(steps) == 1 and 4 <= min(steps) < 30, steps  # signalled after step 4 was logged
  assert ckpt_lib.Checkpointer(str(tmp_path / "term" / "train" / "checkpoints"),
                               read_only=True).latest_step() == steps.pop()
  log = _cluster(args(tmp_path / "term"))
  assert "resumed from step" in log
  assert [code for code, _ in _finish(straight, 300)] == [0, 0]
  for x, y in zip(_params(tmp_path / "term" / "train"), _params(tmp_path / "straight" / "train")):
    np.testing.assert_array_equal(x, y)
  za = np.load(tmp_path / "term" / "predict" / "artifacts" / "predictions.npz")
  zb = np.load(tmp_path / "straight" / "predict" / "artifacts" / "predictions.npz")
  np.testing.assert_array_equal(za["logits"], zb["logits"])


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_on_one_process_ends_every_process_with_its_message(failing, tmp_path,
                                                                    data_dir):
  """Process ``failing`` raises while the other waits in a collective: both
  end within seconds -- the failing one with its error, the other naming the
  process that failed and its message (process 0 hosts the coordinator)."""
  procs = _start(["--config", f"tests/run_configs/fail_on_one_process.py:{failing}",
                  f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path}"])
  (code0, err0), (code1, err1) = _finish(procs, 90)
  codes, errs = {0: code0, 1: code1}, {0: err0, 1: err1}
  other = 1 - failing
  assert codes[failing] == 2, errs[failing][-2000:]
  assert _last_line(errs[failing]) == (
      f"error: process {failing}: injected failure on process {failing}")
  assert codes[other] == 1, errs[other][-2000:]
  assert _last_line(errs[other]) == (
      f"error: stopped because process {failing} failed: injected failure on process {failing}")
  assert "Traceback" not in errs[0] + errs[1]


def test_a_killed_process_ends_the_run_instead_of_a_hang(tmp_path, data_dir):
  """SIGKILL to process 1 mid-training (a lost host): process 0 ends within
  the heartbeat timeout -- with one line when its next collective fails, or
  with JAX's own message when it was waiting elsewhere (an asynchronous
  checkpoint's barrier) and the runtime's heartbeat caught the loss."""
  procs = _start([*ARGS, f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path}",
                  "--config.num_steps=400", "--config.log_every_steps=2",
                  "--heartbeat_timeout_seconds=10"])
  _wait_for_lines(tmp_path / "train" / "metrics.jsonl", 1, procs)
  t = time.time()
  procs[1].kill()
  (code0, err0), _ = _finish(procs, 60)
  assert code0 != 0 and time.time() - t < 40
  assert (_last_line(err0).startswith("error: process 0:")
          or "the JAX distributed service detected fatal errors" in err0), err0[-2000:]


def test_processes_started_with_different_configs_stop_naming_the_key(tmp_path, data_dir):
  procs = _start([*ARGS, f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path}"],
                 per_process=lambda i: [f"--config.streams.train.batch_size={32 + 16 * i}"])
  for code, err in _finish(procs, 90):
    assert code == 2, err[-2000:]
    last = _last_line(err)
    assert "different configs" in last and "config.streams.train.batch_size = 48 on process 1, " \
        "32 on process 0" in last, last
    assert "Traceback" not in err


def test_a_coordinator_that_never_answers_ends_with_one_line(tmp_path, data_dir):
  """Process 1 of 2 alone: process 0 (the coordinator) never starts."""
  env = local_cluster.environment(4)
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.train", *ARGS, f"--workdir={tmp_path}", "--multihost",
       f"--coordinator_address=localhost:{local_cluster.free_port()}", "--num_processes=2",
       "--process_id=1", "--coordinator_timeout_seconds=3"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  [(code, err)] = _finish([proc], 60)
  assert code == 2
  last = _last_line(err)
  assert last.startswith("error: the distributed run did not start within 3 s") \
      and "process 1 of 2" in last and "--coordinator_address" in last, last


def test_a_batch_the_processes_cannot_split_is_an_error_on_every_process(tmp_path, data_dir):
  procs = _start([*ARGS, f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path}",
                  "--config.streams.train.batch_size=33"], devices=1)
  for code, err in _finish(procs, 90):
    assert code == 2, err[-2000:]
    assert "batch_size=33" in _last_line(err), err[-2000:]
    assert "Traceback" not in err
