"""Early stopping (config.early_stopping) on tiny runs with a fake metric
sequence: the evaluators' rounds are patched to report ``fake/metric`` by step."""

import json
import os

import jax
import numpy as np
import pytest

from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import config as config_lib
from jaxrobust import early_stopping as es_lib
from jaxrobust import evaluators as evaluators_lib
from jaxrobust import trainer
from tiny_config import tiny_config

# Rounds every 2 steps of 12; the final evaluation (step 12) is a round too.
# Best at 4 (0.7); 6, 8 and 10 do not beat it by more than min_delta 0.001.
SEQUENCE = {2: 0.5, 4: 0.7, 6: 0.69, 8: 0.7005, 10: 0.6, 12: 0.95}
REAL_RUN = evaluators_lib.run


def _config(data_dir, **es):
  c = tiny_config(data_dir, steps=12)
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 1
  c.async_checkpointing = False
  c.early_stopping.update({"metric": "fake/metric", "patience": 3, "min_delta": 0.001, **es})
  return c


class Interrupted(Exception):
  """Stands for a killed run."""


def _fake_rounds(monkeypatch, interrupt_at=None):
  """Patches the trainer's evaluation rounds: ``fake/metric`` from
  :data:`SEQUENCE`; records the params of the final evaluation's state."""
  real = REAL_RUN
  seen = {}

  def run(evaluators, state, *, step=None, plots_dir=None, final=False):
    if step is not None and step == interrupt_at:
      raise Interrupted(f"interrupted at {step}")
    out = real(evaluators, state, step=step, plots_dir=plots_dir, final=final)
    if final:
      seen["final_params"] = jax.device_get(state.modules["classifier"].params)
      return {**out, "fake/metric": SEQUENCE[12]}
    return {**out, "fake/metric": SEQUENCE[step]}

  monkeypatch.setattr(trainer.evaluators_lib, "run", run)
  return seen


def _steps(workdir):
  return sorted(ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True).all_steps())


def test_stops_after_patience_rounds_and_hands_on_the_best_step(tmp_path, data_dir,
                                                                 monkeypatch):
  seen = _fake_rounds(monkeypatch)
  results = trainer.train_and_evaluate(_config(data_dir), str(tmp_path))
  assert results["train/stopped_at_step"] == 10  # 6, 8, 10: three rounds without improvement
  assert results["train/best_step"] == 4 and results["train/best_metric"] == 0.7
  assert results["train/steps"] == 10
  # The newest (handed-on) checkpoint is the best step's, and the final
  # evaluation was of that state.
  assert _steps(tmp_path) == [4]
  best_params, _ = ckpt_lib.load_pretrained(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, seen["final_params"], best_params)
  state = json.load(open(tmp_path / es_lib.STATE_FILE))
  assert state["stopped_at"] == 10 and [s for s, _ in state["rounds"]] == [2, 4, 6, 8, 10]


def test_without_restore_best_the_run_ends_on_the_stopping_step(tmp_path, data_dir,
                                                               monkeypatch):
  _fake_rounds(monkeypatch)
  results = trainer.train_and_evaluate(_config(data_dir, restore_best=False), str(tmp_path))
  assert results["train/stopped_at_step"] == 10 and results["train/best_step"] == 4
  assert _steps(tmp_path)[-1] == 10


def test_resume_keeps_the_rounds_before_the_checkpoint(tmp_path, data_dir, monkeypatch):
  """Interrupted at the round of step 8 with a checkpoint at 6: the resumed
  run keeps rounds 2, 4, 6 (one without improvement) and stops at 10 like an
  uninterrupted one (a fresh rule would take 8 as its first best and run on)."""
  c = _config(data_dir)
  c.checkpoint_every_steps = 6
  _fake_rounds(monkeypatch, interrupt_at=8)
  with pytest.raises(Interrupted):
    trainer.train_and_evaluate(c, str(tmp_path))
  assert _steps(tmp_path) == [4, 6]  # the best (protected) and the newest
  seen = _fake_rounds(monkeypatch)
  results = trainer.train_and_evaluate(c, str(tmp_path))
  assert results["train/stopped_at_step"] == 10 and results["train/best_step"] == 4
  assert _steps(tmp_path) == [4]
  # Run again after it ended: nothing trains, the best state is evaluated.
  again = trainer.train_and_evaluate(c, str(tmp_path))
  assert again["train/best_step"] == 4 and again["test/accuracy"] == results["test/accuracy"]
  best_params, _ = ckpt_lib.load_pretrained(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, seen["final_params"], best_params)


@pytest.mark.slow
def test_disabled_by_default_changes_nothing(tmp_path, data_dir):
  c = tiny_config(data_dir, steps=6)
  assert not c.early_stopping.metric
  results = trainer.train_and_evaluate(c, str(tmp_path))
  assert results["train/steps"] == 6
  assert not any(k.startswith(("train/best", "train/stopped")) for k in results)
  assert not os.path.exists(tmp_path / es_lib.STATE_FILE)
  assert _steps(tmp_path) == [3, 6]  # keep_checkpoints as before: orbax prunes


def test_a_metric_the_evaluators_do_not_produce_is_named(tmp_path, data_dir):
  c = _config(data_dir, metric="validation/acuracy")
  with pytest.raises(ValueError, match=r"config.early_stopping.metric='validation/acuracy'.*"
                                       r"test/accuracy"):
    trainer.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("edit, match", [
    ({"mode": "maximum"}, r"early_stopping.mode"),
    ({"patience": 0}, r"early_stopping.patience"),
    ({"metric": "accuracy"}, r"early_stopping.metric"),
])
def test_bad_options_fail_in_validate(data_dir, edit, match):
  c = _config(data_dir, **edit)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_no_evaluation_rounds_is_an_error(data_dir):
  c = _config(data_dir)
  c.eval_every_steps = -1
  with pytest.raises(ValueError, match=r"early_stopping.metric.*eval_every_steps"):
    config_lib.validate(c)


@pytest.mark.slow
def test_pmap_path_restores_the_best_step(tmp_path, data_dir, monkeypatch):
  seen = _fake_rounds(monkeypatch)
  c = _config(data_dir)
  c.parallelism = "pmap"
  results = trainer.train_and_evaluate(c, str(tmp_path))
  assert results["train/best_step"] == 4 and _steps(tmp_path) == [4]
  best_params, _ = ckpt_lib.load_pretrained(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, seen["final_params"], best_params)


def test_pretrain_finetune_recipe_takes_pretrain_plateau():
  from configs import default
  from configs.recipes import pretrain_finetune
  pre = pretrain_finetune.get_config("mode=compare,pretrain=plateau").stages.pretrain.config
  assert pre.early_stopping.metric == default.PRETRAIN_STOPPING["metric"]
  assert pre.num_steps == default.PRETRAIN_MAX_EPOCHS * default.source_steps_per_epoch("glyphs")
  with pytest.raises(ValueError, match="pretrain='plateau'.*embedded"):
    pretrain_finetune.get_config("cifar10,pretrain=plateau")
  with pytest.raises(ValueError, match="pre-training length"):
    pretrain_finetune.get_config("pretrain=long")
