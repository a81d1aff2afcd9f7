"""DFR (Kirichenko et al. 2023) as stages: the recipe's defaults, the ``dfr``
task writing a model that predicts like the fitted logistic regression, the
``group_balanced`` sampler, and the errors on bad input."""

import json
import os

import numpy as np
import pytest

from configs.recipes import dfr as dfr_recipe
from jaxrobust import config as config_lib
from jaxrobust import stages
from jaxrobust.methods import dfr
from jaxrobust.registry import RegistryError


def _recipe(data_dir, arg="smoke=True", steps=3):
  c = dfr_recipe.get_config(arg)
  c.data.data_dir = str(data_dir)
  c.progress_bar = False
  c.num_steps = steps
  c.num_epochs = -1.0
  c.eval_batch_size = 256
  return c


def test_recipe_carries_the_reference_defaults():
  c = dfr_recipe.get_config("mode=compare")
  config_lib.validate(c)
  assert set(c.stages) == {"erm", "features_train", "features_validation", "dfr_val", "dfr_tr",
                           "retrain_val", "erm_balanced"}
  assert c.stages.dfr_val.variant == "tr_val" and c.stages.dfr_tr.variant == "tr_tr"
  assert c.stages.dfr_val.num_retrains == 20 == dfr.TR_VAL_RETRAINS
  assert dfr.C_GRID == (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
  assert dfr.TR_TR_RETRAINS == 10
  assert tuple(c.stages.features_train.fields) == ("features", "label", "group")
  assert c.stages.retrain_val.config.streams.train.split == "validation"
  assert c.stages.retrain_val.config.streams.train.sampler == "group_balanced"
  assert c.data.name == "spurious_glyphs" and c.evaluators.groups.type == "groups"
  w = dfr_recipe.get_config("variant=waterbirds,pretrained=/ckpt")
  assert (w.model.name, w.data.image_size, w.streams.train.batch_size) == ("resnet50", 224, 32)
  assert (w.optimizer.learning_rate, w.optimizer.weight_decay) == (1e-3, 1e-3)
  assert w.num_epochs == 100 and w.stages.erm.config.init_from.path == "/ckpt"
  a = dfr_recipe.get_config("variant=celeb_a")
  assert (a.streams.train.batch_size, a.optimizer.weight_decay, a.num_epochs) == (128, 1e-4, 50)


@pytest.mark.parametrize("arg, message", [("variant=mnist", "unknown variant"),
                                          ("mode=erm", "mode must")])
def test_bad_recipe_arguments(arg, message):
  with pytest.raises(ValueError, match=message):
    dfr_recipe.get_config(arg)


@pytest.mark.slow
def test_dfr_stage_writes_a_model_that_predicts_like_the_logistic_regression(data_dir, tmp_path):
  c = _recipe(data_dir)
  c.stages = {k: c.stages[k] for k in ("erm", "features_train", "features_validation", "dfr_val")}
  c.stages.dfr_val.num_retrains = 3
  results = stages.run(c, str(tmp_path))
  assert results["dfr_val/dfr/c"] in dfr.C_GRID
  # The written checkpoint, read by the predict task like a trained one.
  c2 = _recipe(data_dir)
  c2.stages = {"pred": {"task": "predict", "checkpoint": str(tmp_path / "dfr_val" / "checkpoints"),
                        "split": "test", "fields": ("logits", "features", "label", "group")}}
  stages.run(c2, str(tmp_path / "pred"))
  with np.load(tmp_path / "pred" / "pred" / "artifacts" / "predictions.npz") as z:
    logits, features, labels, groups = z["logits"], z["features"], z["label"], z["group"]
  with np.load(tmp_path / "dfr_val" / "artifacts" / "dfr.npz") as z:
    coef, b, mean, scale = z["coef"], z["intercept"][0], z["mean"], z["scale"]
  z_std = ((features - mean) / scale) @ coef + b
  np.testing.assert_allclose(logits[:, 1] - logits[:, 0], z_std, rtol=1e-4, atol=1e-4)
  pred = logits.argmax(1)
  clear = np.abs(z_std) > 1e-3
  np.testing.assert_array_equal(pred[clear], (z_std[clear] > 0).astype(int))
  # The stage's evaluators ran on the new head: its worst-group accuracy is the numpy one.
  accs = [np.mean(pred[groups == g] == labels[groups == g]) for g in range(4)]
  assert results["dfr_val/test/worst_group_accuracy"] == pytest.approx(min(accs), abs=1e-6)
  with open(tmp_path / "dfr_val" / "results.json") as f:
    assert "test/group_weighted_accuracy" in json.load(f)


def test_dfr_errors_name_the_key_before_any_stage_runs(data_dir, tmp_path):
  c = _recipe(data_dir)
  c.stages.dfr_val.c_grid = (1.0, 0.0)
  with pytest.raises(RegistryError, match=r"c_grid: C must be > 0"):
    stages.run(c, str(tmp_path / "a"))
  c = _recipe(data_dir)
  c.stages.dfr_val.variant = "tr_test"
  with pytest.raises(RegistryError, match=r"dfr_val.variant must be one of"):
    stages.run(c, str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "a" / "erm") and not os.path.exists(tmp_path / "b" / "erm")


@pytest.mark.slow
def test_dfr_on_a_dataset_without_groups_is_one_clear_error(data_dir, tmp_path):
  c = _recipe(data_dir, steps=1)
  c.data.name = "digits"
  c.data.mean, c.data.std = (0.5,), (0.5,)
  del c.evaluators["groups"]
  c.stages = {"erm": c.stages.erm, "dfr_val": c.stages.dfr_val}
  c.stages.dfr_val.train = c.stages.dfr_val.validation = ""
  del c.stages.dfr_val["config"]
  with pytest.raises(RegistryError, match=r"dfr_val: DFR needs a dataset with group annotations"):
    stages.run(c, str(tmp_path))


@pytest.mark.slow
def test_group_balanced_sampler_draws_every_group_equally(data_dir):
  from jaxrobust import artifacts as artifacts_lib
  from jaxrobust.data import sources, streams
  source = sources.get_source("spurious_glyphs", "train", data_dir=str(data_dir))
  data = streams.StreamData("train", source, 2, 0, artifacts_lib.Artifacts(),
                            "config.streams.train")
  population = np.arange(len(source))
  drawn = streams.SAMPLERS.get("group_balanced", "s")(data, population)(0)
  groups = np.asarray([source[int(i)]["group"] for i in drawn[:2000]])
  counts = np.bincount(groups, minlength=4) / 2000
  np.testing.assert_allclose(counts, 0.25, atol=0.04)  # train groups are [3500, 184, 56, 1060]
  digits = sources.get_source("digits", "train", data_dir=str(data_dir))
  bad = streams.StreamData("train", digits, 10, 0, artifacts_lib.Artifacts(),
                           "config.streams.train")
  with pytest.raises(RegistryError, match="group_balanced.*no group labels"):
    streams.SAMPLERS.get("group_balanced", "s")(bad, np.arange(len(digits)))
