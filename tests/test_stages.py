"""Recipes: stages in data-flow order, artifacts passed forward (a predict
dump, a derived K×K matrix read through constants), done markers, results under
each stage's name, clear errors before any compilation, and kill-and-resume in
the second stage."""

import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import traces
from jaxrobust import artifacts as artifacts_lib
from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import losses, stages
from jaxrobust import train_step as step_lib
from jaxrobust.registry import RegistryError
from tiny_config import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A tiny method: the per-class mean of predicted probabilities over a split
# (GLC's estimate of the corruption matrix) as a stage task, and a loss term
# that reads the matrix through config.constants.
if "_test_class_mean_probs" not in stages.TASKS:
  @stages.TASKS.register("_test_class_mean_probs")
  def _class_mean_probs(ctx, *, predictions: str, size: int = 0):
    d = ctx.artifacts.load(predictions)
    probs, labels = d["probs"], d["label"]
    k = size or probs.shape[1]
    c = np.stack([probs[labels == i, :k].mean(0) for i in range(k)])
    ctx.artifacts.save("C", {"C": c.astype(np.float32)})
    return {"trace": float(np.trace(c))}

if "_test_uses_matrix" not in losses.LOSSES:
  @losses.LOSSES.register("_test_uses_matrix",
                          info={"constants": lambda o, k: {o["matrix"]: (k, k)}})
  def _uses_matrix(inputs, *, matrix="C"):
    return jnp.zeros(()), {"matrix_trace": jnp.trace(inputs.constants[matrix])}


def _tiny(data_dir, steps=3):
  return tiny_config(data_dir, steps)


def _recipe(data_dir, matrix_size=0):
  c = _tiny(data_dir)
  c.stages = {
      "base": {"task": "train"},
      "dump": {"task": "predict", "checkpoint": "artifact:base/checkpoint", "split": "validation",
               "fields": ("probs", "label", "msp")},
      "matrix": {"task": "_test_class_mean_probs", "predictions": "artifact:dump/predictions",
                 "size": matrix_size},
      "corrected": {"task": "train", "config": {
          "constants": {"C": "artifact:matrix/C"},
          "losses": {"uses": {"name": "_test_uses_matrix", "matrix": "C", "weight": 0.0}}}},
  }
  return c


@pytest.mark.slow
def test_recipe_passes_artifacts_and_reports_every_stage(tmp_path, data_dir):
  results = stages.run(_recipe(data_dir), str(tmp_path))
  # Stages ran in data-flow order, each in its own directory, each marked done.
  for s in ("base", "dump", "matrix", "corrected"):
    assert os.path.exists(tmp_path / s / stages.DONE)
  assert {"base/test/accuracy", "corrected/test/accuracy", "matrix/trace",
          "dump/predictions/num_examples"} <= set(results)
  assert json.load(open(tmp_path / "results.json")) == pytest.approx(results)
  # The dump is in dataset index order and matches the checkpoint's predictions.
  d = np.load(tmp_path / "dump" / "artifacts" / "predictions.npz", allow_pickle=False)
  np.testing.assert_array_equal(d["index"], np.arange(180))
  from jaxrobust.data import pipeline
  src = pipeline.load_split("digits", "validation", data_dir=str(data_dir))
  np.testing.assert_array_equal(d["label"], src.labels)
  np.testing.assert_allclose(d["msp"], d["probs"].max(1), rtol=1e-6)
  # The corrected stage read the K x K matrix through config.constants.
  c = np.load(tmp_path / "matrix" / "artifacts" / "C.npz")["C"]
  metrics = [json.loads(l) for l in open(tmp_path / "corrected" / "metrics.jsonl")]
  traces = [m["train/matrix_trace"] for m in metrics if "train/matrix_trace" in m]
  np.testing.assert_allclose(traces[-1], np.trace(c), rtol=1e-5)


def test_finished_stages_are_skipped_on_restart(tmp_path, data_dir):
  c = _tiny(data_dir)
  c.stages = {"a": {"task": "train"},
              "b": {"task": "predict", "after": ("a",), "checkpoint": "artifact:a/checkpoint",
                    "split": "test"}}
  first = stages.run(c, str(tmp_path))
  assert list(stages.stage_configs(c)) == ["a", "b"]
  stamps = {s: os.path.getmtime(tmp_path / s / stages.DONE) for s in ("a", "b")}
  with mock.patch.object(step_lib, "make_train_step", side_effect=AssertionError("ran again")):
    again = stages.run(c, str(tmp_path))
  assert again == pytest.approx(first)
  assert stamps == {s: os.path.getmtime(tmp_path / s / stages.DONE) for s in ("a", "b")}


def test_a_finished_stage_made_differently_is_an_error_not_skipped(tmp_path, data_dir):
  """Skipping a finished stage whose record was made by another config would
  report that config's numbers as this one's: one error naming the stage and
  the differing keys, before any stage runs."""
  c = _tiny(data_dir)
  c.stages = {"a": {"task": "train"},
              "b": {"task": "predict", "after": ("a",), "checkpoint": "artifact:a/checkpoint",
                    "split": "test"}}
  stages.run(c, str(tmp_path))
  record = json.load(open(tmp_path / "b" / stages.DONE))
  assert record["made"]["options"]["split"] == "test"
  assert record["made"]["config"]["optimizer"]["learning_rate"] == c.optimizer.learning_rate
  changed = _tiny(data_dir)
  changed.stages = {"a": {"task": "train", "config": {"optimizer": {"learning_rate": 0.5}}},
                    "b": {"task": "predict", "after": ("a",),
                          "checkpoint": "artifact:a/checkpoint", "split": "validation"}}
  stamp = os.path.getmtime(tmp_path / "b" / stages.DONE)
  with _no_compilation(), pytest.raises(ValueError, match=r"config\.stages\.a: .*"
                                        r"config\.optimizer\.learning_rate.*0\.5 now.*new workdir"):
    stages.run(changed, str(tmp_path))
  assert os.path.getmtime(tmp_path / "b" / stages.DONE) == stamp
  del changed.stages.a.config  # only b's option differs now
  with pytest.raises(ValueError, match=r"config\.stages\.b: .*options\.split: 'test' there, "
                                       r"'validation' now"):
    stages.run(changed, str(tmp_path))
  # A record from before the stage's recipe was recorded is trusted, as before.
  json.dump({"task": record["task"], "results": record["results"]},
            open(tmp_path / "b" / stages.DONE, "w"))
  assert stages.run(changed, str(tmp_path))["b/predictions/num_examples"] > 0


def _no_compilation():
  return mock.patch.object(step_lib, "make_train_step",
                           side_effect=AssertionError("compiled before the error"))


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.stages.dump.update({"checkpoint": "artifact:bsae/checkpoint"}),
     artifacts_lib.ArtifactError, r"stages.dump: checkpoint='artifact:bsae/checkpoint' refers "
                                  r"to stage 'bsae', which is not in the recipe \(did you mean "
                                  r"'base'"),
    (lambda c: c.stages.update({"x": {"task": "trian"}}),
     RegistryError, r"config.stages.x: unknown stage task 'trian' \(did you mean 'train'"),
    (lambda c: c.stages.dump.update({"feilds": ("probs",)}),
     RegistryError, r"stages.dump: stage task 'predict' got unknown option\(s\) \['feilds'\]"),
    (lambda c: c.stages.corrected.config.update({"optimizer": {"learnig_rate": 0.1}}),
     ValueError, r"stages.corrected.config.optimizer.learnig_rate: no such key.*learning_rate"),
    (lambda c: c.stages.base.update({"after": ("corrected",)}),
     ValueError, "depend on each other"),
])
def test_recipe_errors_before_anything_runs(tmp_path, data_dir, edit, error, match):
  c = _recipe(data_dir)
  edit(c)
  with _no_compilation(), pytest.raises(error, match=match):
    stages.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "base")


def test_missing_artifact_and_wrong_matrix_shape_fail_before_the_stage_compiles(
    tmp_path, data_dir):
  c = _recipe(data_dir, matrix_size=3)  # a 3x3 matrix for a 10-class task
  c.stages.matrix.task = "_test_class_mean_probs"
  results_dir = str(tmp_path)
  # Run the first three stages, then the fourth must fail on the shape.
  with pytest.raises(RegistryError, match=r"config.losses.uses: constant 'C' has shape "
                                          r"\(3, 3\); this term needs \(10, 10\)"):
    with traces.each_traced_at_most(step_lib, "make_train_step", 1,
                                    lambda *a, **k: "train_step") as made:
      try:
        stages.run(c, results_dir)
      finally:
        # base trained (one step, traced once); corrected failed before building one.
        assert [n for _, n in made] == [1]
  c = _recipe(data_dir, matrix_size=3)  # the finished stages as they were made
  c.stages.corrected.config.constants = {"C": "artifact:matrix/D"}
  with pytest.raises(artifacts_lib.ArtifactError,
                     match=r"config.constants.C: 'artifact:matrix/D': stage 'matrix' has no "
                           r"artifact 'D'; it has: C"):
    stages.run(c, results_dir)


def test_artifacts_round_trip_without_pickle(tmp_path):
  a = artifacts_lib.Artifacts(str(tmp_path), ["s", "t"], "s")
  ref = a.save("arrays", {"x": np.arange(3), "y": np.ones((2, 2))})
  a.save("one", np.eye(2))
  a.save("info", {"note": "json", "k": 3})
  b = artifacts_lib.Artifacts(str(tmp_path), ["s", "t"], "t")
  assert ref == "artifact:s/arrays"
  np.testing.assert_array_equal(b.load("artifact:s/arrays:x"), np.arange(3))
  assert sorted(b.load("artifact:s/arrays")) == ["x", "y"]
  np.testing.assert_array_equal(b.load("artifact:s/one"), np.eye(2))
  assert b.load("artifact:s/info") == {"note": "json", "k": 3}
  assert b.load("artifact:s/info:k") == 3
  with pytest.raises(artifacts_lib.ArtifactError, match="can only use artifacts of earlier"):
    artifacts_lib.Artifacts(str(tmp_path), ["s", "t"], "s").load("artifact:s/one")


def _launch(workdir, data_dir):
  cmd = [sys.executable, "-m", "launch.train", "--config", "tests/run_configs/two_stage.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_recipe_killed_in_its_second_stage_resumes_bit_identically(tmp_path, data_dir):
  killed = tmp_path / "killed"
  # The uninterrupted reference runs meanwhile, in its own process.
  straight = _launch(tmp_path / "straight", data_dir)
  proc = _launch(killed, data_dir)
  ckpts = killed / "finetune" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
    if any(4 <= s < 30 for s in done):
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(killed / "pretrain" / stages.DONE)
  assert not os.path.exists(killed / "finetune" / stages.DONE)
  done_mtime = os.path.getmtime(killed / "pretrain" / stages.DONE)

  resumed = _launch(killed, data_dir)
  out = resumed.communicate(timeout=600)[0].decode()
  assert resumed.returncode == 0, out[-3000:]
  assert os.path.getmtime(killed / "pretrain" / stages.DONE) == done_mtime  # skipped
  out = straight.communicate(timeout=600)[0].decode()
  assert straight.returncode == 0, out[-3000:]
  a, _ = ckpt_lib.load_pretrained(str(killed / "finetune"))
  b, _ = ckpt_lib.load_pretrained(str(tmp_path / "straight" / "finetune"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ra = json.load(open(killed / "results.json"))
  rb = json.load(open(tmp_path / "straight" / "results.json"))
  assert ra["finetune/test/nll"] == rb["finetune/test/nll"]
  assert ra["pretrain/validation/accuracy"] == rb["pretrain/validation/accuracy"]


def test_a_locked_recipe_as_config_flags_gives_it_is_merged(data_dir):
  """`--config recipe.py` hands the recipe over locked; stages still add new
  keys to free-form sub-dicts (constants, loss terms, evaluators)."""
  c = _recipe(data_dir)
  c.stages.corrected.config["evaluators"] = {"extra": {"type": "classification",
                                                       "splits": ("test",)}}
  c.lock()
  merged = stages.stage_configs(c)["corrected"][2]
  assert merged.constants.C == "artifact:matrix/C" and "uses" in merged.losses
  assert merged.evaluators.extra.splits == ("test",)


# --- SIGTERM in a recipe (jaxrobust.preemption) -----------------------------------

if "_test_sigterm_self" not in stages.TASKS:
  @stages.TASKS.register("_test_sigterm_self")
  def _sigterm_self(ctx):
    """A stage during which the scheduler's SIGTERM arrives."""
    del ctx
    os.kill(os.getpid(), signal.SIGTERM)
    return {"signalled": 1.0}

  @stages.TASKS.register("_test_mark")
  def _mark(ctx):
    return {"ran": 1.0}


def _signal_recipe(data_dir, order):
  c = _tiny(data_dir)
  c.stages = {name: {"task": task, **({"after": (order[i - 1][0],)} if i else {})}
              for i, (name, task) in enumerate(order)}
  return c


def test_sigterm_in_a_stage_stops_the_recipe_after_it_and_the_same_command_resumes(
    tmp_path, data_dir):
  """SIGTERM during a task that is not a training loop (which used to be
  swallowed, or to kill the process mid-task): the stage finishes and is
  recorded, the recipe stops before the next one with one message, the
  handler is given back, and running again skips the finished stage."""
  from jaxrobust.preemption import PreemptedError
  before = signal.getsignal(signal.SIGTERM)
  c = _signal_recipe(data_dir, [("a", "_test_sigterm_self"), ("b", "_test_mark"),
                                ("c", "_test_mark")])
  with pytest.raises(PreemptedError, match=r"^preempted \(SIGTERM\) after stage a: it is done "
                                           r"and recorded; .* resume from stage b\.$"):
    stages.run(c, str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) == before
  assert os.path.exists(tmp_path / "a" / stages.DONE)
  assert not os.path.exists(tmp_path / "b" / stages.DONE)
  results = stages.run(c, str(tmp_path))  # a is skipped: it does not signal again
  assert results == {"a/signalled": 1.0, "b/ran": 1.0, "c/ran": 1.0}


def test_sigterm_in_the_last_stage_still_stops_the_caller(tmp_path, data_dir):
  """A reproduction runs seeds one recipe after another: SIGTERM in a
  recipe's last stage must stop it too (the results are written first)."""
  from jaxrobust.preemption import PreemptedError
  c = _signal_recipe(data_dir, [("a", "_test_mark"), ("z", "_test_sigterm_self")])
  with pytest.raises(PreemptedError, match="during the last stage, z: the recipe is done"):
    stages.run(c, str(tmp_path))
  assert json.load(open(tmp_path / "results.json")) == {"a/ran": 1.0, "z/signalled": 1.0}
  assert stages.run(c, str(tmp_path)) == {"a/ran": 1.0, "z/signalled": 1.0}


@pytest.mark.slow
def test_sigterm_during_a_final_evaluation_stops_the_recipe_after_that_stage(tmp_path, data_dir):
  """The training loop checks SIGTERM after each step; one arriving in the
  final evaluation (after the last check) used to be dropped when the loop
  gave the handler back, and the recipe went on to its next stage."""
  from jaxrobust import evaluators as evaluators_lib
  from jaxrobust.preemption import PreemptedError
  c = _signal_recipe(data_dir, [("base", "train"), ("after", "_test_mark")])
  real_run = evaluators_lib.run

  def run_then_signal(*args, final=False, **kwargs):
    out = real_run(*args, final=final, **kwargs)
    if final:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  with mock.patch.object(evaluators_lib, "run", run_then_signal):
    with pytest.raises(PreemptedError, match="after stage base: .* resume from stage after"):
      stages.run(c, str(tmp_path))
  assert os.path.exists(tmp_path / "base" / stages.DONE)
  assert not os.path.exists(tmp_path / "after")
