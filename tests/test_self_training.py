"""Self-training (Zoph et al. 2020, Noisy Student): loss normalisation with
moving averages kept in the train state, the student's loss configs, joint
training's second head and stream, and teacher -> student rounds from one
recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recompute
from jaxrobust import losses as losses_lib
from jaxrobust.methods import self_training
from jaxrobust.registry import RegistryError


def _fake_inputs(h, p, stats, step):
  """Two streams whose cross-entropies are log(K) scaled by h and p."""
  logits_h = jnp.log(jnp.asarray([[h, 1.0, 1.0]] * 4))
  logits_p = jnp.log(jnp.asarray([[p, 1.0, 1.0]] * 4))
  batch = {s: {"label": jnp.zeros(4, jnp.int32), "mask": jnp.ones(4, bool)}
           for s in ("train", "unlabeled")}
  outputs = {"train": {"logits": logits_h, "features": jnp.zeros((4, 2))},
             "unlabeled": {"logits": logits_p, "features": jnp.zeros((4, 2))}}
  return losses_lib.LossInputs(
      outputs=losses_lib._Outputs(outputs, "classifier", ("train", "unlabeled")), batch=batch,
      num_classes=3, params={}, rng=jax.random.PRNGKey(0), step=jnp.asarray(step, jnp.int32),
      loss_stats=stats)


def test_without_normalization_the_pseudo_term_is_weighted_by_unlabel_ratio():
  """Noisy Student's main.py: (lab_loss·B_l + unl_loss·B_u) / B_l."""
  losses = self_training.student_losses(normalize=False, hard=False, unlabel_ratio=3.0)
  assert losses["pseudo"]["weight"] == 3.0
  assert losses["cross_entropy"] == {"label_smoothing": 0.1, "weight": 1.0}


def test_loss_normalization_uses_bias_corrected_moving_averages():
  alpha, m = 2.0, 0.9
  losses = self_training.student_losses(alpha=alpha, momentum=m, hard=False)
  terms = losses_lib.build_terms(losses, streams=["train", "unlabeled"])
  assert losses_lib.normalized_keys(terms) == ["cross_entropy", "pseudo"]
  fn = losses_lib.compose(terms)
  stats = {"cross_entropy": jnp.zeros(()), "pseudo": jnp.zeros(())}
  ema = {"cross_entropy": 0.0, "pseudo": 0.0}
  rng = np.random.default_rng(0)
  for step in range(6):
    h, p = rng.uniform(0.1, 3.0, 2)
    total, metrics = fn(_fake_inputs(h, p, stats, step))
    # the labelled term with Noisy Student's label smoothing 0.1 (lab_loss), K = 3
    l_h = -(0.9 + 0.1 / 3) * np.log(h / (h + 2)) - (0.1 / 3) * 2 * np.log(1 / (h + 2))
    l_p = -np.log(p / (p + 2))
    for k, v in (("cross_entropy", l_h), ("pseudo", l_p)):
      ema[k] = m * ema[k] + (1 - m) * v
    corr = 1 - m ** (step + 1)
    scale = (ema["cross_entropy"] / corr) / (ema["pseudo"] / corr)
    # L = (1/α)(L_h + α · (L̄_h / L̄_p) · L_p)
    assert float(total) == pytest.approx(l_h / alpha + scale * l_p, rel=1e-5)
    assert float(metrics["loss/pseudo/scale"]) == pytest.approx(scale, rel=1e-5)
    stats = {k: metrics[f"{losses_lib.STATS}{k}"] for k in stats}
  # at step 0 the corrected averages are the batch values: the per-batch rule
  total0, _ = fn(_fake_inputs(2.0, 0.5, {k: jnp.zeros(()) for k in stats}, 0))
  l_h = -(0.9 + 0.1 / 3) * np.log(2 / 4) - (0.1 / 3) * 2 * np.log(1 / 4)
  assert float(total0) == pytest.approx(l_h / alpha + l_h, rel=1e-5)


def test_student_loss_configs_and_bad_options():
  plain = self_training.student_losses(alpha=3.0, normalize=False)
  assert plain["pseudo"]["weight"] == 3.0 and "normalize_by" not in plain["pseudo"]
  assert plain["pseudo"]["label_smoothing"] == 0.1  # hard labels: Noisy Student's smoothing
  assert self_training.student_losses(hard=False)["pseudo"]["label_smoothing"] == 0.0
  with pytest.raises(RegistryError, match="alpha must be > 0"):
    self_training.student_losses(alpha=0.0)
  with pytest.raises(RegistryError, match="normalize_momentum must be in"):
    losses_lib.build_terms({"a": {"name": "cross_entropy"},
                            "b": {"name": "cross_entropy", "normalize_by": "a",
                                  "normalize_momentum": 1.0}})
  with pytest.raises(RegistryError, match="rounds must be a positive integer"):
    self_training.rounds("t", 0, student_config=lambda pl: {}, pseudo_label={},
                         labels_stage=str, student_stage=str)


@pytest.mark.slow
def test_noisy_student_rounds_and_joint_training_run(tmp_path, data_dir):
  """teacher -> labels_1 -> student_1 -> labels_2 -> student_2 from the
  recipe (the moving averages resume from the checkpoint's state); then joint
  training with a 62-way source head on glyphs."""
  from configs.recipes import self_training as recipe
  from jaxrobust import stages
  from jaxrobust.checkpoint import load_pretrained
  from tiny_config import tiny_config
  c = recipe.get_config("smoke=True,rounds=2,steps=3,threshold=0.0,labeled_per_class=7")
  c.data.data_dir = str(data_dir)
  c.progress_bar = False
  assert list(stages.stage_configs(c)) == ["teacher", "labels_1", "student_1", "labels_2",
                                           "student_2"]
  results = stages.run(c, str(tmp_path))
  assert results["labels_2/num_selected"] > 0
  # The last student's reported numbers are its checkpoint's; its test NLL is a
  # fixed-seed value, re-measured 2026-12-06 after Noisy Student's labelled label smoothing
  # and BatchNorm's two-pass variance, on this repository's pinned versions (CPU,
  # 8 host devices); a change means the computation changed.
  want = recompute.classification(stages.stage_configs(c)["student_2"][2], tmp_path / "student_2")
  assert results["student_2/test/accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
  assert results["student_2/test/nll"] == pytest.approx(want["nll"], rel=1e-6)
  assert results["student_2/test/nll"] == pytest.approx(2.60450577, rel=1e-4)
  lines = (tmp_path / "student_1" / "metrics.jsonl").read_text()
  assert "loss/pseudo/scale" in lines

  j = tiny_config(data_dir)
  j.stages = {"joint": {"task": "train", "config": self_training.joint_training(
      {}, source_data="glyphs/small", source_classes=62, batch_size=16)}}
  res = stages.run(j, str(tmp_path / "joint"))
  params, _ = load_pretrained(str(tmp_path / "joint" / "joint"))
  assert params["heads"]["source"]["dense"]["kernel"].shape[-1] == 62
  assert params["head"]["kernel"].shape[-1] == 10
  want = recompute.classification(stages.stage_configs(j)["joint"][2], tmp_path / "joint" / "joint")
  assert res["joint/test/accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
  assert res["joint/test/nll"] == pytest.approx(want["nll"], rel=1e-6)
  assert res["joint/test/nll"] == pytest.approx(2.3058256, rel=1e-4)  # fixed-seed, as above


def test_recipe_initialisations_and_compare_arms_are_valid_configs():
  """init=supervised|simclr puts that pre-training first and starts the
  teacher and every student from it (SimCLR's projection head skipped); the
  compare mode's stages all validate (artifact references included)."""
  from configs.recipes import self_training as recipe
  from jaxrobust import stages
  for init, stage, skip in (("supervised", "pretrain_sup", ""),
                            ("simclr", "pretrain_simclr", "heads/.*")):
    c = recipe.get_config(f"init={init},rounds=2")
    plan = stages.stage_configs(c)
    assert list(plan)[0] == stage
    for name in ("teacher", "student_1", "student_2"):
      assert plan[name][2].init_from.path == f"artifact:{stage}/checkpoint"
      assert plan[name][2].init_from.skip == skip
  plan = stages.stage_configs(recipe.get_config("mode=compare"))
  assert {"rand_s1", "sup_s4", "simclr_s4", "st_s4_r3", "st_nonorm_s4", "sup_st_s4",
          "joint_s4"} <= set(plan)
  assert plan["st_nonorm_s4"][2].losses.pseudo.get("normalize_by") is None
  assert plan["st_s4"][2].losses.pseudo.normalize_by == "cross_entropy"
  with pytest.raises(ValueError, match="init must be random or one of"):
    recipe.get_config("init=imagenet")
