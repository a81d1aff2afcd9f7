"""Faults, table-driven (grows with every case): a damaged newest checkpoint
is skipped with one line and the run resumes from the previous intact one,
ending identical to an uninterrupted run; none intact is one clear error;
init_from skips damaged steps too and accepts every kind of path."""

import glob
import logging
import os
import shutil

import numpy as np
import pytest

from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import trainer

# tensorstore reports the failed reads of damaged files from its event loop after the test
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _largest(pattern):
  return max(glob.glob(pattern, recursive=True), key=os.path.getsize)


def _truncate(step_dir):
  f = _largest(os.path.join(step_dir, "state", "**", "d", "*"))
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _remove_array_file(step_dir):
  os.remove(_largest(os.path.join(step_dir, "state", "**", "d", "*")))


def _remove_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _corrupt_meta(step_dir):
  with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
    f.write("{not json")


def _garbage_iterator_state(step_dir):
  with open(os.path.join(step_dir, "data_train", "process_0-of-1.json"), "w") as f:
    f.write("\x00garbage")


def _empty_step_directory(step_dir):
  for entry in os.listdir(step_dir):
    path = os.path.join(step_dir, entry)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


DAMAGE = {
    "truncated array file": _truncate,
    "missing array file": _remove_array_file,
    "missing state metadata": _remove_state_metadata,
    "corrupt run metadata": _corrupt_meta,
    "garbage data-iterator state": _garbage_iterator_state,
    "empty step directory": _empty_step_directory,
}


def _first_fast(cases):
  """The development tier keeps the first case; the others (each a run resumed, or a
  Python process started: seconds each) are marked slow."""
  return [case if i == 0 else pytest.param(*(case if isinstance(case, tuple) else (case,)),
                                           marks=pytest.mark.slow)
          for i, case in enumerate(cases)]


def _config(data_dir):
  from tiny_config import tiny_config
  c = tiny_config(data_dir, steps=6)
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  c.async_checkpointing = False
  return c


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  """A finished 6-step run (checkpoints 2, 4, 6) and its final parameters."""
  root = tmp_path_factory.mktemp("finished")
  trainer.train_and_evaluate(_config(data_dir), str(root / "run"))
  params, _ = ckpt_lib.load_pretrained(str(root / "run"))
  return root / "run", params


def _assert_same_params(a, b):
  flat_a = ckpt_lib.param_shapes(a)
  assert flat_a == ckpt_lib.param_shapes(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("damage", _first_fast(sorted(DAMAGE)))
def test_damaged_newest_checkpoint_falls_back_and_ends_identical(
    damage, finished_run, data_dir, tmp_path, caplog):
  run, final_params = finished_run
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  os.remove(copy / "results.json")
  DAMAGE[damage](str(copy / "checkpoints" / "6"))
  with caplog.at_level(logging.WARNING, logger="jaxrobust"):
    results = trainer.train_and_evaluate(_config(data_dir), str(copy))
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1 and "/6 is damaged" in lines[0] and "\n" not in lines[0]
  assert any("resumed from step 4" in r.getMessage() for r in caplog.records)
  assert (copy / "damaged_checkpoints" / "6").is_dir()  # set aside, not deleted
  params, _ = ckpt_lib.load_pretrained(str(copy))
  _assert_same_params(params, final_params)
  assert results["train/steps"] == 6
  # metrics.jsonl: the steps after 4 were dropped and written once again
  import json
  train_steps = [json.loads(line)["step"] for line in open(copy / "metrics.jsonl")
                 if "train/loss" in line]
  assert train_steps == sorted(set(train_steps))


def test_no_intact_checkpoint_is_one_clear_error(finished_run, data_dir, tmp_path):
  run, _ = finished_run
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  for step in ("2", "4", "6"):
    _remove_state_metadata(str(copy / "checkpoints" / step))
  with pytest.raises(ckpt_lib.CheckpointDamagedError,
                     match=r"no intact checkpoint in .*/checkpoints: 6 \(.*\); 4 .*; 2 "):
    trainer.train_and_evaluate(_config(data_dir), str(copy))


def test_init_from_skips_damaged_steps_and_takes_any_path(finished_run, tmp_path, monkeypatch):
  run, final_params = finished_run
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  step4, _ = ckpt_lib.load_pretrained(str(copy), step=4)
  _truncate(str(copy / "checkpoints" / "6"))
  params, _ = ckpt_lib.load_pretrained(str(copy))
  _assert_same_params(params, step4)
  # a workdir, its checkpoints/ and one step's directory, relative or absolute
  monkeypatch.chdir(tmp_path)
  for path, want in (("run", step4), ("run/checkpoints", step4), (str(copy), step4),
                     ("run/checkpoints/4", step4)):
    got, _ = ckpt_lib.load_pretrained(path)
    _assert_same_params(got, want)
  _assert_same_params(ckpt_lib.load_pretrained(str(run / "checkpoints" / "6"))[0], final_params)
  with pytest.raises(FileNotFoundError, match="checkpoint of step 4, not of step 2"):
    ckpt_lib.load_pretrained("run/checkpoints/4", step=2)
  for step in ("2", "4"):
    _remove_state_metadata(str(copy / "checkpoints" / step))
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match="no intact checkpoint"):
    ckpt_lib.load_pretrained("run")



@pytest.mark.parametrize("override, message", _first_fast([
    ("--config.optimzer.learning_rate=0.1",
     "--config.optimzer.learning_rate: the config has no key 'optimzer'; did you mean "
     "'optimizer'?"),
    ("--config.optimizer.learning_rat=0.1",
     "--config.optimizer.learning_rat: the config has no key 'learning_rat'; did you mean "
     "'learning_rate'?"),
    ("--config.zzz=1", "--config.zzz: the config has no key 'zzz'."),
    ("--config.optimizer.learning_rate=-1",
     "config.optimizer.learning_rate must be >= 0, got -1.0."),
    ("--config.optimizer.weight_decay=-1", "config.optimizer.weight_decay must be >= 0, got -1.0."),
    ("--config.optimizer.schedule=cosinus", "config.optimizer: unknown config.optimizer.schedule "
     "'cosinus'; known: cosine, constant, linear, step."),
    ("--config.mesh=(('data',3),)", "config.mesh (('data', 3),) needs 3 devices; "),
    ("--config.losses.oe.name=outlier_exposur", "config.losses.oe: unknown loss term "
     "'outlier_exposur' (did you mean 'outlier_exposure'?)"),
    ("--config.streams.train.batchsize=8", "config.streams.train has unknown key(s) "
     "['batchsize'] (did you mean 'batch_size'?)"),
]))
def test_command_line_errors_are_one_line_without_traceback(override, message, tmp_path):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config", "configs/default.py", override,
       "--workdir", str(tmp_path / "w")], cwd=repo, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


def test_a_damaged_prepared_dataset_names_itself_and_how_to_rebuild(tmp_path):
  from jaxrobust.data import pipeline, sources
  sources.prepare("digits", data_dir=str(tmp_path))
  f = sorted(glob.glob(str(tmp_path / "digits" / "**" / "*train.array_record*"),
                       recursive=True))[0]
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)
  with pytest.raises(sources.DatasetDamagedError,
                     match=r"dataset 'digits' \(split 'train'\) in .*/digits is damaged: .*"
                           r"Delete .*/digits and run again"):
    pipeline.load_split("digits", "train", data_dir=str(tmp_path))


def test_free_form_entries_can_be_added_from_the_command_line():
  """A new OOD set, a new stream and a new loss term from flags (absl's
  config flags only override existing keys); the result validates."""
  from configs import default
  from jaxrobust import config as config_lib
  from launch import train
  train._FREE_FORM_OVERRIDES.clear()
  kept = train._split_free_form([
      "prog", "--config.num_steps=2", "--config.evaluators.ood.sets.letters=glyphs/lower:test",
      "--config.streams.outliers.data=glyphs/upper", "--config.streams.outliers.batch_size=16",
      "--config.streams.outliers.labels=unlabeled", "--config.losses.oe.name=outlier_exposure",
      "--config.losses.oe.stream=outliers", "--config.optimizer.learning_rate=0.05"])
  assert kept == ["prog", "--config.num_steps=2", "--config.optimizer.learning_rate=0.05"]
  c = default.get_config()
  train._apply_free_form(c)
  assert c.evaluators.ood.sets.letters == "glyphs/lower:test"
  assert c.streams.outliers.batch_size == 16 and c.losses.oe.stream == "outliers"
  config_lib.validate(c)
  train._FREE_FORM_OVERRIDES.clear()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes_bit_identically(tmp_path, data_dir):
  """SIGTERM mid-training: the step finishes, a checkpoint of that step is
  written, the process exits with 143 and one line; the same command resumes
  and ends with the parameters of an uninterrupted run."""
  import signal
  import subprocess
  import sys
  import time
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def launch(workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", "--config", "tests/run_configs/two_streams.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.num_steps=40",
         "--config.checkpoint_every_steps=1000", "--config.log_every_steps=2",
         "--config.progress_bar=False"],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  straight = launch(tmp_path / "straight")
  proc = launch(tmp_path / "term")
  metrics = tmp_path / "term" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("preempted (SIGTERM) at step ") and "run the same command" in last
  step = int(last.split("at step ")[1].split(":")[0])
  assert 4 <= step < 40  # signalled after step 4 was logged: never stops before it
  assert ckpt_lib.Checkpointer(str(tmp_path / "term" / "checkpoints"),
                               read_only=True).latest_step() == step
  resumed = launch(tmp_path / "term")
  _, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  _, err = straight.communicate(timeout=600)
  assert straight.returncode == 0, err[-3000:]
  for x, y in zip(_leaves(ckpt_lib.load_pretrained(str(tmp_path / "term"))[0]),
                  _leaves(ckpt_lib.load_pretrained(str(tmp_path / "straight"))[0])):
    np.testing.assert_array_equal(x, y)


def test_config_differences_name_every_differing_leaf():
  """What processes started with different command lines are told (the
  multi-process check itself: tests/test_multiprocess.py)."""
  from jaxrobust.distributed import config_differences
  a = {"config": {"seed": 0, "streams": {"train": {"batch_size": 32}}}, "workdir": "/runs/a"}
  b = {"config": {"seed": 0, "streams": {"train": {"batch_size": 48, "pp": "flip"}}},
       "workdir": "/runs/b"}
  assert config_differences(b, a) == [("config.streams.train.batch_size", 48, 32),
                                      ("config.streams.train.pp", "flip", None),
                                      ("workdir", "/runs/b", "/runs/a")]
  assert config_differences(a, a) == []


# --- the command line with the default config, and write failures (issue 17) ----------

@pytest.mark.parametrize("config_args", [
    pytest.param([], id="default config"),
    pytest.param(["--config", "configs/default.py"], id="--config given", marks=pytest.mark.slow)])
@pytest.mark.parametrize("override, message", _first_fast([
    ("--config.foo=1", "--config.foo: the config has no key 'foo'."),
    ("--config.optimzer.learning_rate=0.1",
     "--config.optimzer.learning_rate: the config has no key 'optimzer'; did you mean "
     "'optimizer'?"),
    ("--config.optimizer.learning_rate=abc", "flag --config.optimizer.learning_rate=abc: could "
     "not convert string to float: 'abc'"),
]))
def test_unknown_keys_are_one_line_with_and_without_a_config_file(config_args, override,
                                                                   message, tmp_path):
  """With the README's quick start (no --config) a bad key ended in three
  chained tracebacks raised while absl defined the flag."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "launch.train", *config_args, override,
       "--workdir", str(tmp_path / "w")], cwd=repo, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [f"error: {message}"]
  assert not os.path.exists(tmp_path / "w")


def _write_failure_config(data_dir, steps=6):
  from tiny_config import tiny_config
  c = tiny_config(data_dir, steps=steps)
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 5
  c.plots = True
  c.evaluators.ood.sets = {"blobs": "blobs/gray:validation"}
  return c


@pytest.mark.slow
def test_a_failed_plot_write_is_one_error_and_the_next_run_resumes(tmp_path, data_dir,
                                                                  monkeypatch):
  """An injected ENOSPC in the PNG writer (the first write to fail in the
  README's default run on a 2 MB tmpfs): WriteError naming the plot; the final
  checkpoint is intact, no temporary file is left, and the same command then
  finishes with the results of an uninterrupted run."""
  import errno

  from matplotlib.figure import Figure

  from jaxrobust import files, stages
  reference = stages.run(_write_failure_config(data_dir), str(tmp_path / "reference"))

  savefig = Figure.savefig

  def full_disk_after_training(self, path, *args, **kwargs):  # the step-0 sample grids fit
    if "samples_" not in os.path.basename(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return savefig(self, path, *args, **kwargs)
  monkeypatch.setattr(Figure, "savefig", full_disk_after_training)
  work = tmp_path / "run"
  with pytest.raises(files.WriteError,
                     match=r"could not write the plot .*/run/plots/\w+\.png: No space left on "
                           r"device\.$"):
    stages.run(_write_failure_config(data_dir), str(work))
  assert not os.path.exists(work / "results.json")
  assert sorted(int(s) for s in os.listdir(work / "checkpoints")) == [3, 6]
  assert not [f for f in glob.glob(str(work / "**" / ".*tmp*"), recursive=True)]
  monkeypatch.undo()
  results = stages.run(_write_failure_config(data_dir), str(work))
  for k, v in reference.items():
    if "seconds" not in k and "per_second" not in k:
      assert results[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def _can_mount_tmpfs(path) -> bool:
  import subprocess
  os.makedirs(path, exist_ok=True)
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", str(path)], capture_output=True)
  return ok


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not _can_mount_tmpfs("/tmp/jaxrobust-tmpfs-probe"),
                    reason="mounting a tmpfs needs root")
def test_a_full_tmpfs_ends_the_run_with_one_line_and_the_next_run_resumes(tmp_path, data_dir):
  """A real full disk: the workdir on a 1 MiB tmpfs holds the step-3
  checkpoint but not the step-6 one; the run stops with one line, exit 2, no
  traceback; with more room the same command resumes from step 3 and ends
  with the results of an uninterrupted run."""
  import json
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  args = [sys.executable, "-m", "launch.train", "--config", "configs/default.py:smoke",
          f"--config.data.data_dir={data_dir}", "--config.progress_bar=False",
          "--config.plots=False", "--config.checkpoint_every_steps=3",
          "--config.keep_checkpoints=5"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ref = subprocess.run(args + ["--workdir", str(tmp_path / "ref")], cwd=repo, env=env,
                       capture_output=True, text=True)
  assert ref.returncode == 0, ref.stderr[-2000:]
  from configs import default
  from jaxrobust import build
  c = default.get_config("smoke")
  c.data.data_dir = str(data_dir)
  need = ckpt_lib.space_needed(build.build_run(c, str(tmp_path / "probe")).abstract)
  # Room for the step-3 checkpoint (and the logs), not for a second one beside it.
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need + (128 << 10)}", "tmpfs",
                  str(mnt)], check=True)
  try:
    out = subprocess.run(args + ["--workdir", str(mnt / "w")], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the checkpoint of step 6 in {mnt}/w/"
                           "checkpoints: No space left on device"), last
    assert sorted(os.listdir(mnt / "w" / "checkpoints")) == ["3"]
    subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
    again = subprocess.run(args + ["--workdir", str(mnt / "w")], cwd=repo, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 3" in again.stderr
    got = json.load(open(mnt / "w" / "results.json"))
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)
  want = json.load(open(tmp_path / "ref" / "results.json"))
  for k, v in want.items():
    if "seconds" not in k and "per_second" not in k:
      assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
