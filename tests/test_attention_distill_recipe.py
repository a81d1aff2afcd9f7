"""The A-SKD recipe (``configs/recipes/attention_distill.py``): its plan and
errors, and teacher -> askd_4 end to end through the trainer (smoke: 3 steps
per stage), with the teacher frozen and the attention-similarity term logged."""

import json
import os

import jax
import numpy as np
import pytest

from configs.recipes import attention_distill as recipe
from jaxrobust import config as config_lib
from jaxrobust import stages


def test_plan_arms_factors_and_low_resolution_evaluation():
  c = recipe.get_config("factors=2+8")
  config_lib.validate(c)
  plan = stages.stage_configs(c)
  assert set(plan) == {"teacher"} | {f"{a}_{f}" for a in recipe.ARMS for f in (2, 8)}
  _, _, askd = plan["askd_8"]
  assert askd.streams.train.pp == "downsample(8)"
  assert askd.evaluators.classification.pp == "downsample(8)"
  assert askd.evaluators.verification.pp == "downsample(8)"
  assert askd.evaluators.verification.data == "glyphs/lower:test"
  assert askd.losses.attention_similarity.weight == 5.0
  assert askd.modules.teacher.init_from.path == "artifact:teacher/checkpoint"
  assert askd.modules.teacher.model.kwargs.cbam
  _, _, alone = plan["student_2"]
  assert "teacher" not in alone.modules and set(alone.losses) == {"cross_entropy"}
  assert plan["teacher"][2].evaluators.classification.pp == ""
  # No stage scores OOD sets (A-SKD reports none), the teacher included: its
  # evaluators come from the base config, where {"sets": {}} must not merge away.
  assert all(not cfg.evaluators.ood.sets for _, _, cfg in plan.values())
  assert set(stages.stage_configs(recipe.get_config("mode=askd,factors=4"))) == {
      "teacher", "askd_4"}


@pytest.mark.parametrize("arg, match", [
    ("factors=1", "factors"), ("factors=2+x", "factors"), ("variant=face", "data="),
    ("mode=nope", "mode"), ("loss=l2", "loss"), ("data=cifar10", "variant=face")])
def test_bad_arguments_name_the_key(arg, match):
  with pytest.raises(ValueError, match=match):
    recipe.get_config(arg)


@pytest.mark.slow
def test_teacher_then_askd_trains_through_the_trainer(tmp_path):
  from jaxrobust.checkpoint import load_pretrained
  c = recipe.get_config("mode=askd,factors=4,smoke=True")
  results = stages.run(c, str(tmp_path))
  assert results["askd_4/train/steps"] == 3.0
  for stage in ("teacher", "askd_4"):
    for key in ("test/accuracy", "test/verification_accuracy", "test/tar_at_far_1e-3"):
      assert np.isfinite(results[f"{stage}/{key}"]), (stage, key)
  with open(tmp_path / "askd_4" / "metrics.jsonl", encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  train = [r for r in logged if "train/loss/attention_similarity" in r]
  assert train and train[-1]["train/loss/attention_similarity"] > 0
  assert "train/attention_distance/spatial" in train[-1]
  # The teacher module of the student's run is the teacher stage's model, unchanged.
  t_params, t_stats = load_pretrained(str(tmp_path / "teacher"))
  s_params, s_stats = load_pretrained(str(tmp_path / "askd_4"), module="teacher")
  jax.tree.map(np.testing.assert_array_equal, s_params, t_params)
  jax.tree.map(np.testing.assert_array_equal, s_stats, t_stats)
  # ... while the student moved away from its initialisation and from the teacher.
  c_params, _ = load_pretrained(str(tmp_path / "askd_4"))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(c_params),
                                                       jax.tree.leaves(t_params)))
  assert os.path.exists(tmp_path / "askd_4" / "DONE.json")


@pytest.mark.parametrize("quick", [True, False])
def test_shin2022_recipe_covers_its_arms_and_claims(quick):
  from launch.papers import shin2022
  plan = stages.stage_configs(shin2022.recipe(0, quick))
  arms = set(shin2022.PAPER.arms)
  if quick:
    assert set(plan) == {"teacher", "student_4", "kd_4", "askd_4"}
  else:
    assert set(plan) == arms
  for claim in shin2022.PAPER.claims:
    assert {a for _, a, _ in claim.side("better") + claim.side("worse")} <= arms
  gain = [c for c in shin2022.PAPER.claims if "-" in c.better]
  assert gain and gain[0].side("worse") == [(1.0, "askd_2", "test/accuracy"),
                                            (-1.0, "student_2", "test/accuracy")]
  assert plan["askd_4"][2].evaluators.classification.save
