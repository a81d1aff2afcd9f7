"""launch.reproduce (launch.papers): aggregation over seeds, paired bootstrap intervals, claim
verdicts and the report, on synthetic runs; the hendrycks2019 bootstrap metrics
agree with jaxrobust.metrics."""

import dataclasses
import json
import os

import numpy as np
import pytest

from launch import papers as reproduce
from launch.papers import hendrycks2019 as h2019
from jaxrobust.metrics import calibration, ood


def test_bootstrap_metrics_match_the_library():
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.1, 1.0, 360)
  correct = (rng.uniform(size=360) < conf).astype(np.float64)
  np.testing.assert_allclose(h2019._rms(conf, correct),
                             float(calibration.rms_calibration_error(conf, correct)), rtol=1e-5)
  hpt = h2019._rms(conf, correct, drop_last_bin=True)
  np.testing.assert_allclose(hpt, float(calibration.rms_calibration_error(
      conf, correct, drop_last_bin=True)), rtol=1e-5)
  assert abs(hpt - h2019._rms(conf, correct)) > 1e-4  # 360 examples: the last bin holds 160
  s_in = np.round(rng.normal(1, 1, 300), 1)  # ties
  s_out = np.round(rng.normal(0, 1, 700), 1)
  np.testing.assert_allclose(h2019._auroc(s_in, s_out), float(ood.auroc(s_in, s_out)),
                             rtol=1e-6)


def _paper(claims):
  def acc(arts, idx):
    return float(arts["p"]["correct"][idx["test"]].mean())
  return reproduce.Paper(
      name="toy", title="toy", recipe=lambda seed, quick: None,
      arms={"good": "better arm", "bad": "worse arm"},
      metrics=(reproduce.Metric("test/accuracy", "accuracy", True, acc),
               reproduce.Metric("test/nll", "NLL", False)),
      claims=claims, protocol="synthetic",
      resample=lambda arts, rng: {"test": rng.integers(0, 200, 200)})


def _write_runs(root, p_good, p_bad, seeds=3):
  rng = np.random.default_rng(1)
  for s in range(seeds):
    for arm, p in (("good", p_good), ("bad", p_bad)):
      d = root / f"seed{s}" / arm
      os.makedirs(d / "artifacts")
      correct = (rng.uniform(size=200) < p).astype(np.float64)
      json.dump({"test/accuracy": correct.mean(), "test/nll": 1.0 - p + 0.01 * s},
                open(d / "results.json", "w"))
      np.savez(d / "artifacts" / "p.npz", correct=correct)


@pytest.mark.parametrize("p_good, p_bad, verdict", [
    (0.95, 0.60, "holds"), (0.70, 0.69, "inconclusive"), (0.60, 0.95, "does not hold")])
def test_claim_verdicts_and_report(tmp_path, p_good, p_bad, verdict):
  _write_runs(tmp_path, p_good, p_bad)
  paper = _paper((reproduce.Claim("good beats bad", "test/accuracy", "good", "bad", "toy §1"),
                  reproduce.Claim("good has lower NLL", "test/nll", "good", "bad")))
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2])
  row = summary["table"]["good"]["test/accuracy"]
  assert len(row["seeds"]) == 3 and row["ci95"][0] <= row["mean"] <= row["ci95"][1]
  claim = summary["claims"][0]
  assert claim["verdict"] == verdict
  for key in ("seed_ci95", "test_ci95"):
    lo, hi = claim[key]
    assert lo <= claim["difference"] <= hi
  # Without a bootstrap, the seeds decide (NLL: lower is better; the seeds'
  # NLL differences are constant, so their interval is a point).
  assert summary["claims"][1]["verdict"] == ("holds" if p_good > p_bad else "does not hold")
  text = reproduce.write_report(paper, summary, str(tmp_path), quick=False)
  assert f"**{verdict}** — good beats bad (toy §1)" in text
  assert json.load(open(tmp_path / "report.json"))["claims"][0]["verdict"] == verdict


def test_unknown_paper_is_named():
  with pytest.raises(Exception, match="unknown paper 'hendrycks2018'.*hendrycks2019"):
    reproduce.load_paper("hendrycks2018")


def test_a_claim_that_holds_over_test_examples_but_not_over_seeds_is_inconclusive(tmp_path):
  """The test-example bootstrap sees one test set; seed-to-seed spread is a
  different noise, and a claim must survive both."""
  _write_runs(tmp_path, 0.9, 0.9, seeds=3)
  for s, (good, bad) in enumerate([(0.95, 0.60), (0.60, 0.95), (0.97, 0.62)]):
    for arm, p in (("good", good), ("bad", bad)):
      correct = (np.arange(200) < p * 200).astype(np.float64)
      json.dump({"test/accuracy": correct.mean(), "test/nll": 0.1},
                open(tmp_path / f"seed{s}" / arm / "results.json", "w"))
      np.savez(tmp_path / f"seed{s}" / arm / "artifacts" / "p.npz", correct=correct)
  paper = _paper((reproduce.Claim("good beats bad", "test/accuracy", "good", "bad"),))
  claim = reproduce.summarize(paper, str(tmp_path), [0, 1, 2])["claims"][0]
  assert claim["test_ci95"][0] > 0 > claim["seed_ci95"][0]
  assert claim["verdict"] == "inconclusive"


def test_cross_metric_and_non_inferiority_claims(tmp_path):
  """'arm:metric' sides compare two scores of one arm; a margin turns a claim
  into "at most this much worse"."""
  for s in range(3):
    for arm, (acc, fpr_a, fpr_b) in {"good": (0.99 - 0.001 * s, 0.30, 0.50),
                                     "bad": (0.995, 0.40, 0.45)}.items():
      d = tmp_path / f"seed{s}" / arm
      os.makedirs(d)
      json.dump({"test/accuracy": acc, "ood/a/fpr95": fpr_a + 0.01 * s, "ood/b/fpr95": fpr_b},
                open(d / "results.json", "w"))
  paper = reproduce.Paper(
      name="toy", title="toy", recipe=lambda seed, quick: None,
      arms={"good": "g", "bad": "b"},
      metrics=(reproduce.Metric("test/accuracy", "acc", True),
               reproduce.Metric("ood/a/fpr95", "a", False),
               reproduce.Metric("ood/b/fpr95", "b", False)),
      claims=(reproduce.Claim("score a beats score b", "ood/a/fpr95", "good:ood/a/fpr95",
                              "good:ood/b/fpr95"),
              reproduce.Claim("accuracy drops by at most a point", "test/accuracy", "good",
                              "bad", margin=0.01),
              reproduce.Claim("accuracy drops by at most 0.1 point", "test/accuracy", "good",
                              "bad", margin=0.001)),
      protocol="synthetic")
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2])
  verdicts = [c["verdict"] for c in summary["claims"]]
  assert verdicts == ["holds", "holds", "does not hold"]
  np.testing.assert_allclose(summary["claims"][0]["difference"], 0.19, atol=1e-9)
  text = reproduce.write_report(paper, summary, str(tmp_path), quick=False)
  assert "non-inferiority: holds unless worse by more than 0.01" in text


def test_gain_claims_combine_arms_seed_by_seed_and_round_by_round(tmp_path):
  """'a-b' sides: the gain of pre-training under S1 beats its gain under S4
  (Zoph et al.'s form); per-seed and bootstrap values are the arm
  combinations. A method task's DONE.json results count as an arm."""
  accs = {"pre_s1": 0.90, "rand_s1": 0.80, "pre_s4": 0.86, "rand_s4": 0.85}
  for s in range(3):
    for arm, p in accs.items():
      d = tmp_path / f"seed{s}" / arm
      os.makedirs(d / "artifacts")
      correct = (np.arange(200) < (p + 0.005 * s) * 200).astype(np.float64)
      json.dump({"test/accuracy": correct.mean()}, open(d / "results.json", "w"))
      np.savez(d / "artifacts" / "p.npz", correct=correct)
    d = tmp_path / f"seed{s}" / "sample"
    os.makedirs(d)
    json.dump({"task": "x", "results": {"tv": 0.1 * s}}, open(d / "DONE.json", "w"))
  acc = lambda arts, idx: float(arts["p"]["correct"][idx["test"]].mean())
  paper = reproduce.Paper(
      name="toy", title="toy", recipe=lambda seed, quick: None,
      arms={**{a: a for a in accs}, "sample": "a method task"},
      metrics=(reproduce.Metric("test/accuracy", "acc", True, acc),
               reproduce.Metric("tv", "tv", False)),
      claims=(reproduce.Claim("gain S1 > gain S4", "test/accuracy", "pre_s1-rand_s1",
                              "pre_s4-rand_s4"),),
      protocol="synthetic", resample=lambda arts, rng: {"test": rng.integers(0, 200, 200)})
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2], bootstrap=50)
  claim = summary["claims"][0]
  np.testing.assert_allclose(claim["difference"], (0.90 - 0.80) - (0.86 - 0.85), atol=1e-9)
  assert claim["verdict"] == "holds" and claim["test_ci95"][0] > 0
  assert summary["table"]["sample"]["tv"]["seeds"] == [0.0, 0.1, 0.2]


def test_arms_a_mode_does_not_run_are_left_out_and_their_claims_not_run(tmp_path):
  _write_runs(tmp_path, 0.9, 0.6)
  paper = _paper((reproduce.Claim("good beats bad", "test/accuracy", "good", "bad"),
                  reproduce.Claim("extra beats bad", "test/accuracy", "extra", "bad")))
  paper = reproduce.dataclasses.replace(paper, arms={**paper.arms, "extra": "not run"})
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2])
  assert "extra" not in summary["table"]
  assert [c["verdict"] for c in summary["claims"]] == ["holds", "not run"]
  text = reproduce.write_report(paper, summary, str(tmp_path), quick=True)
  assert "**not run** — extra beats bad" in text and "| **extra**" not in text


def test_arms_of_an_unfinished_run_are_named_not_taken_for_a_mode_that_skips_them(tmp_path):
  """A report of a run still going (or interrupted): an arm in a seed's
  recipe without results is "unfinished" in the report, its claims and the
  pre-training study's cell -- not "not part of this run (quick mode)"."""
  from launch import pretrain_study
  _write_runs(tmp_path, 0.9, 0.6)
  paper = _paper((reproduce.Claim("good beats bad", "test/accuracy", "good", "bad"),
                  reproduce.Claim("late beats bad", "test/accuracy", "late", "bad"),
                  reproduce.Claim("skipped beats bad", "test/accuracy", "skipped", "bad")))
  paper = reproduce.dataclasses.replace(
      paper, arms={**paper.arms, "late": "still running", "skipped": "not in this mode"})
  for s in range(3):
    json.dump({"stages": {"good": {}, "bad": {}, "late": {}}},
              open(tmp_path / f"seed{s}" / "config.json", "w"))
  os.makedirs(tmp_path / "seed1" / "late")
  json.dump({"test/accuracy": 0.99}, open(tmp_path / "seed1" / "late" / "results.json", "w"))
  assert reproduce.unfinished_arms(paper, str(tmp_path), [0, 1, 2]) == {"late": [0, 2]}
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2])
  assert [c["verdict"] for c in summary["claims"]] == ["holds", "not run", "not run"]
  assert summary["claims"][1]["unfinished"] == ["late"] and "unfinished" not in summary["claims"][2]
  text = reproduce.write_report(paper, summary, str(tmp_path), quick=False)
  assert "**Incomplete run:** late (seeds 0, 2) has not finished" in text
  assert "2. **not run** — late beats bad: late has not finished in every seed" in text
  assert "3. **not run** — skipped beats bad: skipped or bad is not part of this run" in text
  study = pretrain_study.write_study(paper, pretrain_study.study(paper, {"8": summary}),
                                     str(tmp_path))
  assert "| late beats bad (`late` vs `bad`) | unfinished (late) |" in study
  assert "skipped beats bad" not in study


def test_claims_select_by_number_or_text_and_name_the_claims_otherwise():
  paper = reproduce.load_paper("hendrycks2019")
  assert reproduce.select_claims(paper, "calibration, OOD") == [0, 1, 2, 3]
  assert reproduce.select_claims(paper, "5,imbalance") == [4, 5, 6]
  for bad in ("0", "20", "no such claim", " , "):
    with pytest.raises(ValueError, match="--claims.*1: Pre-training lowers the RMS calibration"):
      reproduce.select_claims(paper, bad)


@pytest.mark.parametrize("name, spec, expected", [
    ("hendrycks2019", "calibration,OOD", {"pretrain", "finetune", "scratch"}),
    ("hendrycks2019", "5", {"adv_pretrain", "adv_finetune", "adv_scratch"}),
    ("zoph2020", "2", {"rand_s1", "labels_s1", "st_s1"}),
    ("ngiam2018", "at all", {"source", "ft_digits_all", "scratch_digits"}),
])
def test_claims_run_only_the_stages_their_arms_need_unchanged(monkeypatch, tmp_path, name, spec,
                                                                expected):
  """--claims cuts each seed's recipe to the claims' arms and what they take
  artifacts from, transitively; every kept stage's config is the whole
  recipe's, so the cut run gives the whole run's numbers for them."""
  from jaxrobust import stages
  ran = {}
  monkeypatch.setattr(stages, "run", lambda c, workdir: ran.setdefault(workdir, c))
  paper = reproduce.load_paper(name)
  reproduce.run_seeds(paper, str(tmp_path), [1], quick=False,
                      claims=reproduce.select_claims(paper, spec))
  cut = ran[os.path.join(str(tmp_path), "seed1")]
  whole = paper.recipe(1, False).stages.to_dict()
  assert set(cut.stages) == expected
  assert {n: s for n, s in cut.stages.to_dict().items()} == {n: whole[n] for n in expected}
  stages.stage_configs(cut)  # the cut recipe validates: no reference to a dropped stage


def test_claims_left_out_are_not_run_and_the_report_numbers_the_claims(tmp_path):
  _write_runs(tmp_path, 0.9, 0.6)
  paper = _paper((reproduce.Claim("good beats bad", "test/accuracy", "good", "bad"),
                  reproduce.Claim("good has lower NLL", "test/nll", "good", "bad")))
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2], claims=[1])
  assert [c["verdict"] for c in summary["claims"]] == ["not run", "holds"]
  text = reproduce.write_report(paper, summary, str(tmp_path), quick=False, claims="NLL")
  assert "--claims 'NLL'`" in text
  assert "1. **not run** — good beats bad: not among this run's --claims." in text
  assert "2. **holds** — good has lower NLL" in text
  with pytest.raises(ValueError, match="no arm of toy has finished"):
    reproduce.summarize(paper, str(tmp_path / "empty"), [0, 1, 2])


@pytest.mark.parametrize("quick", [True, False])
def test_hendrycks2019_recipe_is_valid_and_covers_every_arm_and_claim(quick):
  from jaxrobust import stages
  recipe = stages.stage_configs(h2019.recipe(0, quick))
  arms = set(h2019.PAPER.arms)
  ran = arms & set(recipe)
  if quick:  # the first corruption setting only, fewer arms
    kind, strength = h2019.LABEL_NOISE[1]
    assert ran == {a for a in arms if not a.startswith(h2019._tag(kind, strength))
                   and not h2019._skipped_in_quick(a)}
    assert {"finetune", "scratch", "uniform50_pre_glc10_glc", "uniform50_pre_forward",
            "uniform50_scratch_ce", "imb_ce_pre", "adv_finetune"} <= ran
  else:
    assert ran == arms
  for claim in h2019.PAPER.claims:
    assert {a for _, a, _ in claim.side("better") + claim.side("worse")} <= arms
  # Adversarial arms train on PGD examples and report PGD-20; clean arms report it too.
  _, _, adv = recipe["adv_scratch"]
  assert adv.streams.train.perturb.startswith("pgd(") and "steps=20" in str(
      adv.evaluators.robust.attacks.pgd20)
  assert recipe["scratch"][2].evaluators.robust.type == "robust"
  assert not recipe["scratch"][2].streams.train.perturb
  # Every arm but the uncertainty ones skips the OOD sets.
  assert not recipe["imb_cost_scratch"][2].evaluators.ood.sets
  assert recipe["imb_cost_scratch"][2].streams.train.labels == "class_weighted"


def test_claims_and_tables_per_kind_of_ood_set_and_ceilings(tmp_path):
  """A mean over OOD sets is also judged per group of launch.papers.OOD_GROUPS
  (here: better on noise and photos, worse on near-OOD letters), and values
  past the ceilings are named."""
  fpr = {"good": {"gaussian": 0.10, "blobs": 0.20, "photo": 0.30, "letters": 0.80},
         "bad": {"gaussian": 0.50, "blobs": 0.60, "photo": 0.50, "letters": 0.60}}
  for s in range(3):
    for arm, sets in fpr.items():
      d = tmp_path / f"seed{s}" / arm
      os.makedirs(d)
      res = {f"ood/msp/{k}/fpr95": v + 0.01 * s for k, v in sets.items()}
      res["ood/msp/mean/fpr95"] = float(np.mean(list(res.values())))
      res["test/accuracy"] = 0.985 if arm == "good" else 0.9
      json.dump(res, open(d / "results.json", "w"))
  assert reproduce.OOD_GROUP_OF["letters"] == "near" and reproduce.OOD_GROUP_OF["photo"] == (
      "natural") and reproduce.OOD_GROUP_OF["blobs"] == "noise"
  mean = reproduce.Metric("ood/msp/mean/fpr95", "MSP FPR95", False)
  paper = reproduce.Paper(
      name="toy", title="toy", recipe=lambda seed, quick: None,
      arms={"good": "g", "bad": "b"},
      metrics=(reproduce.Metric("test/accuracy", "acc", True), mean),
      claims=(reproduce.Claim("good detects better", "ood/msp/mean/fpr95", "good", "bad"),
              reproduce.Claim("good is more accurate", "test/accuracy", "good", "bad")),
      protocol="synthetic")
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2])
  row = summary["table"]["good"]
  np.testing.assert_allclose(row["ood/msp/mean_noise/fpr95"]["mean"], 0.16, atol=1e-9)
  np.testing.assert_allclose(row["ood/msp/mean_near/fpr95"]["mean"], 0.81, atol=1e-9)
  claim = summary["claims"][0]
  assert claim["verdict"] == "holds"
  assert {g: v["verdict"] for g, v in claim["groups"].items()} == {
      "near": "does not hold", "natural": "holds", "noise": "holds"}
  np.testing.assert_allclose(claim["groups"]["near"]["difference"], -0.2, atol=1e-9)
  assert "groups" not in summary["claims"][1]
  assert len(summary["ceilings"]) == 1 and "good 0.9850" in summary["ceilings"][0]
  text = reproduce.write_report(paper, summary, str(tmp_path), quick=False)
  assert "By kind of OOD set: MSP FPR95" in text and "## Ceiling effects" in text
  assert "  - near OOD: glyph letters: **does not hold**, improvement -0.2000" in text
  assert "## Kinds of OOD set" in text


def test_hendrycks2019_group_bootstrap_averages_the_group_sets_only():
  rng = np.random.default_rng(0)
  arts = {"predictions_test": {"logits": rng.normal(size=(50, 10)),
                               "label": rng.integers(0, 10, 50)},
          "ood_all_scores_test": {"msp": rng.uniform(size=50), "energy": rng.normal(size=50)}}
  for s, shift in (("gaussian", 0.0), ("photo", 0.4)):
    arts[f"ood_all_scores_{s}"] = {"msp": rng.uniform(size=30) - shift,
                                   "energy": rng.normal(size=30)}
  idx = {"test": np.arange(50), "gaussian": np.arange(30), "photo": np.arange(30)}
  d = h2019._derived(arts)
  photo = h2019._auroc(d["in_msp"], d["photo_msp"])
  gauss = h2019._auroc(d["in_msp"], d["gaussian_msp"])
  np.testing.assert_allclose(h2019._mean_auroc("msp", "natural")(arts, idx), photo)
  np.testing.assert_allclose(h2019._mean_auroc("msp", "noise")(arts, idx), gauss)
  np.testing.assert_allclose(h2019._mean_auroc("msp")(arts, idx), (photo + gauss) / 2)
  assert photo != gauss
  summary = {"table": {"scratch": {"test/accuracy": {"mean": 0.9},
                                   "robust/pgd20/accuracy": {"mean": 0.6}}}}
  assert "almost robust" in h2019._ceilings(summary)[0]


def test_pretrain_study_table_per_length(tmp_path):
  """Two pre-training lengths on synthetic runs: the claim holds at one and
  not at the other; the table gives both verdicts, marks the disagreement,
  and reports how long the (fake) pre-training stage trained."""
  from launch import pretrain_study
  paper = dataclasses.replace(_paper((reproduce.Claim("good beats bad", "test/accuracy", "good",
                                                      "bad", "toy §1"),)),
                              pretrain_stages=("pre*",))
  summaries, stages = {}, {}
  for label, (p_good, p_bad) in (("2", (0.95, 0.6)), ("plateau", (0.6, 0.95))):
    sub = tmp_path / f"pretrain_{label}"
    _write_runs(sub, p_good, p_bad)
    for s in range(3):  # the pre-training stage: glyphs, batch 128 (194 steps an epoch)
      d = sub / f"seed{s}" / "pretrain"
      os.makedirs(d)
      json.dump({"data": {"name": "glyphs"}, "streams": {"train": {"batch_size": 128}}},
                open(d / "config.json", "w"))
      json.dump({"train/steps": 194.0 * (2 if label == "2" else 10 + s),
                 **({"train/best_step": 194.0 * (7 + s), "train/stopped_at_step": 194.0 *
                     (10 + s)} if label == "plateau" else {}),
                 "validation/accuracy": 0.8 + 0.01 * s}, open(d / "results.json", "w"))
    summaries[label] = reproduce.summarize(paper, str(sub), [0, 1, 2], bootstrap=50)
    stages[label] = pretrain_study.pretrain_stages(paper, str(sub), [0, 1, 2])
  assert stages["plateau"]["pretrain"]["epochs"] == [10, 11, 12]
  assert stages["plateau"]["pretrain"]["best_epoch"] == [7, 8, 9]
  lrs = {"2": {"finetune_lr": 0.1, "grid": [0.03, 0.1]},
         "plateau": {"finetune_lr": 0.03, "grid": [0.03, 0.1]}}
  result = pretrain_study.study(paper, summaries, stages, lrs)
  claim = result["claims"][0]
  assert claim["lengths"]["2"]["verdict"] == "holds"
  assert claim["lengths"]["plateau"]["verdict"] == "does not hold"
  assert claim["verdicts_agree"] is False
  text = pretrain_study.write_study(paper, result, str(tmp_path))
  assert "| good beats bad (`good` vs `bad`) | **holds** +" in text
  assert "**does not hold** -" in text and "| **no** |" in text
  assert "over 0.03, 0.1): 2: 0.1; plateau: 0.03." in text
  assert "Fine-tuning rate of every stage fine-tuning from a pre-training stage" in text
  assert "| plateau | pretrain | 11.0 (10.0–12.0) | 8.0 (7.0–9.0) | 0.8100 (0.8000–0.8200) |" in text
  # A study of some claims gives the others no row.
  paper2 = dataclasses.replace(paper, claims=(*paper.claims, reproduce.Claim(
      "bad has higher NLL", "test/nll", "bad", "good")))
  sums = {lab: reproduce.summarize(paper2, str(tmp_path / f"pretrain_{lab}"), [0, 1, 2],
                                   bootstrap=50, claims=[0]) for lab in ("2", "plateau")}
  few = pretrain_study.write_study(paper2, pretrain_study.study(paper2, sums, stages, lrs),
                                   str(tmp_path / "few"), claims="good", quick=True,
                                   seeds=[0, 1])
  assert ("--pretrain 2,plateau --quick --seeds 2 --claims 'good'`: 2 seeds (0, 1) — **quick "
          "mode: reduced training, not the reference numbers**. Only the claims named by "
          "`--claims` ran (1 of 2)") in few
  assert "| good beats bad" in few and "bad has higher NLL" not in few
  assert "Fine-tuning rate of the stages trained like `good` (good; other stages fine-tuning " \
         "from pre-training keep the recipe's rate)" in pretrain_study.write_study(
             dataclasses.replace(paper, tune_arm="good", tuned_arms=("good",)), result,
             str(tmp_path / "tuned"))
  on_disk = json.load(open(tmp_path / "pretrain_study.json"))
  assert on_disk["lengths"] == ["2", "plateau"] and on_disk["stopping_rule"]["patience"] == 3


def test_finished_stages_with_the_same_configs_are_copied(tmp_path):
  """A study's stages that take nothing from a pre-training stage (zoph2020:
  random-init teachers, their students) are the same at every length: copied
  from a length that finished them when its recipe gave them and what they
  need the same config; a stage downstream of pre-training is not (the
  pre-training's length differs), unfinished stages and another seed's runs
  never are."""
  from launch import pretrain_study
  paper = reproduce.load_paper("zoph2020")
  two, eight = paper.recipe(0, False, pretrain=2), paper.recipe(0, False, pretrain=8)
  src = tmp_path / "pretrain_2" / "seed0"
  for name in ("rand_s1", "sup_s1", "st_s1", "pretrain_sup"):
    os.makedirs(src / name / "artifacts")
    json.dump({"results": {"test/accuracy": 0.5}}, open(src / name / "DONE.json", "w"))
  os.makedirs(src / "st_s4")  # started, not finished: not copied
  open(src / "config.json", "w").write(two.to_json_best_effort())
  dst = str(tmp_path / "pretrain_8" / "seed0")
  others = pretrain_study.other_length_dirs(str(tmp_path), 8)
  assert others == [str(tmp_path / "pretrain_2")]
  assert pretrain_study.reuse_stages(eight, dst, [src]) == ["rand_s1", "st_s1"]
  assert os.path.exists(os.path.join(dst, "st_s1", "DONE.json"))
  assert not os.path.exists(os.path.join(dst, "sup_s1"))
  assert pretrain_study.reuse_stages(eight, dst, [src]) == []  # already there
  other_seed = paper.recipe(1, False, pretrain=8)
  assert pretrain_study.reuse_stages(other_seed, str(tmp_path / "s1"), [src]) == []
  # The same length (a plain reproduction is length 2's recipe): downstream stages too.
  assert pretrain_study.reuse_stages(two, str(tmp_path / "again"), [src]) == [
      "pretrain_sup", "rand_s1", "st_s1", "sup_s1"]


def test_seed0_copies_the_rate_selections_pretraining(monkeypatch, tmp_path):
  """The rate selection runs seed 0's pre-training at the length: seed 0
  copies it (the same config), other seeds and other lengths do not, and no
  fine-tuning stage comes from there."""
  from jaxrobust import stages
  from launch import pretrain_study
  paper = reproduce.load_paper("zoph2020")
  sel = pretrain_study.lr_selection_recipe(paper, 8, (0.1, 0.3))
  sub = tmp_path / "pretrain_8"
  for name in sel.stages:
    os.makedirs(sub / pretrain_study.SELECT_DIR / name)
    json.dump({"results": {}}, open(sub / pretrain_study.SELECT_DIR / name / "DONE.json", "w"))
  open(sub / pretrain_study.SELECT_DIR / "config.json", "w").write(sel.to_json_best_effort())
  monkeypatch.setattr(stages, "run", lambda c, workdir: None)
  # One length alone: no other run to reuse from, the selection is still there.
  reproduce.run_seeds(paper, str(sub), [0, 1], quick=False, pretrain=8, finetune_lr=0.3)
  assert sorted(os.listdir(sub / "seed0")) == ["pretrain_sup"]
  assert not os.path.exists(sub / "seed1")
  assert pretrain_study.reuse_stages(paper.recipe(0, False, pretrain=16), str(tmp_path / "x"),
                                     [str(sub / pretrain_study.SELECT_DIR)]) == []


def test_pretrain_lengths_are_checked():
  from launch import pretrain_study
  assert pretrain_study.parse_lengths("2, 8,plateau") == [2.0, 8.0, "plateau"]
  for bad, match in (("2,two", "pre-training length.*'two'"), ("2,2.0", "given twice"),
                     ("", "one or more")):
    with pytest.raises(ValueError, match=match):
      pretrain_study.parse_lengths(bad)


@pytest.mark.parametrize("name", ["hendrycks2019", "zoph2020", "ngiam2018"])
def test_paper_recipes_take_a_pretraining_length(name):
  """--pretrain reaches every pre-training stage the paper names: N source
  epochs in steps, or the stopping rule evaluated every epoch."""
  import fnmatch
  from configs import default
  paper = reproduce.load_paper(name)
  spe = default.source_steps_per_epoch("glyphs")
  for length in (8, "plateau"):
    stages = paper.recipe(0, True, pretrain=length).stages.to_dict()
    pre = [n for n in stages if any(fnmatch.fnmatchcase(n, p) for p in paper.pretrain_stages)]
    assert pre
    for n in pre:
      cfg = stages[n]["config"]
      if length == 8:
        assert cfg["num_steps"] == 8 * spe and "early_stopping" not in cfg
      else:
        assert cfg["num_steps"] == default.PRETRAIN_MAX_EPOCHS * spe
        assert cfg["early_stopping"] == default.PRETRAIN_STOPPING
        assert cfg["evaluators"]["classification"]["every_steps"] == spe
        assert "validation" in cfg["evaluators"]["classification"]["splits"]
  others = {n: s for n, s in paper.recipe(0, True).stages.to_dict().items() if n not in pre}
  assert others == {n: s for n, s in stages.items() if n not in pre}  # nothing else changes


def test_pretrain_is_refused_for_a_paper_without_pretraining_stages(tmp_path):
  paper = _paper(())
  with pytest.raises(ValueError, match="no pre-training stages"):
    reproduce.run_seeds(paper, str(tmp_path), [0], quick=True, pretrain=2.0)


def test_finetune_lr_reaches_only_stages_fine_tuning_from_pretraining():
  from configs import default
  paper = reproduce.load_paper("hendrycks2019")
  stages = paper.recipe(0, True).stages.to_dict()
  tuned = default.with_finetune_lr(stages, 0.03, paper.pretrain_stages)
  changed = {n for n in stages if tuned[n] != stages[n]}
  assert {"finetune", "adv_finetune", "imb_ce_pre"} <= changed
  assert not changed & {"pretrain", "adv_pretrain", "scratch", "imb_ce_scratch"}
  for n in changed:
    assert tuned[n]["config"]["optimizer"]["learning_rate"] == 0.03
    assert tuned[n]["config"]["init_from"]["path"] in ("artifact:pretrain/checkpoint",
                                                       "artifact:adv_pretrain/checkpoint")


def test_chosen_rate_reaches_only_the_papers_tuned_arms(monkeypatch, tmp_path):
  """zoph2020's rate chosen on sup_s1 goes to the supervised fine-tuning arms;
  sup_st_s4 (Noisy Student from the pre-trained model, which diverged at
  sup_s1's rate) keeps the recipe's."""
  from jaxrobust import stages
  ran = {}
  monkeypatch.setattr(stages, "run", lambda c, workdir: ran.setdefault(workdir, c))
  paper = reproduce.load_paper("zoph2020")
  assert paper.tune_arm in paper.tuned_arms
  reproduce.run_seeds(paper, str(tmp_path), [0], quick=False, pretrain=2.0, finetune_lr=0.3)
  got = ran[os.path.join(str(tmp_path), "seed0")].stages.to_dict()
  whole = paper.recipe(0, False, pretrain=2.0).stages.to_dict()
  lr = {n: got[n]["config"]["optimizer"]["learning_rate"] for n in ("sup_s1", "sup_s4",
                                                                     "sup_st_s4")}
  assert lr == {"sup_s1": 0.3, "sup_s4": 0.3,
                "sup_st_s4": whole["sup_st_s4"]["config"]["optimizer"]["learning_rate"]}
  assert lr["sup_st_s4"] == 0.1
  assert {n: s for n, s in got.items() if n not in ("sup_s1", "sup_s4")} == {
      n: s for n, s in whole.items() if n not in ("sup_s1", "sup_s4")}
  assert reproduce.tuned_stages(paper, whole) == ["sup_s1", "sup_s4"]


@pytest.mark.parametrize("tuned, match", [(("sup_s9",), "names no stage fine-tuning"),
                                          (("sup_s4",), "tune_arm 'sup_s1' is not among")])
def test_tuned_arms_are_checked(tuned, match):
  paper = dataclasses.replace(reproduce.load_paper("zoph2020"), tuned_arms=tuned)
  with pytest.raises(ValueError, match=match):
    reproduce.tuned_stages(paper, paper.recipe(0, False).stages.to_dict())


@pytest.mark.parametrize("name", ["hendrycks2019", "zoph2020", "ngiam2018"])
def test_every_papers_tune_arm_takes_its_chosen_rate(name):
  paper = reproduce.load_paper(name)
  tuned = reproduce.tuned_stages(paper, paper.recipe(0, False).stages.to_dict())
  assert paper.tune_arm in tuned


@pytest.mark.parametrize("name, claims, expected", [
    ("zoph2020", None, {"pretrain_sup"}),
    ("hendrycks2019", None, {"pretrain", "adv_pretrain"}),
    ("hendrycks2019", "calibration", {"pretrain"}),
])
def test_pretraining_only_runs_the_pretraining_stages(monkeypatch, tmp_path, name, claims,
                                                      expected):
  from jaxrobust import stages
  ran = {}
  monkeypatch.setattr(stages, "run", lambda c, workdir: ran.setdefault(workdir, c))
  paper = reproduce.load_paper(name)
  reproduce.run_seeds(paper, str(tmp_path), [2], quick=False, pretrain=8, pretraining_only=True,
                      claims=None if claims is None else reproduce.select_claims(paper, claims))
  cut = ran[os.path.join(str(tmp_path), "seed2")].stages.to_dict()
  assert set(cut) == expected
  whole = paper.recipe(2, False, pretrain=8).stages.to_dict()
  assert cut == {n: whole[n] for n in expected}


def test_only_seed_at_one_pretraining_length(monkeypatch, tmp_path):
  """--only_seed k --pretrain L: seed 0 chooses the rate and runs with it;
  another seed before the choice runs only its pre-training and exits 75
  (to be run again), and its pre-training does not count as a seed that
  ran without the chosen rate; after the choice it runs with it."""
  from launch import pretrain_study
  calls = []
  monkeypatch.setattr(reproduce, "run_seeds",
                      lambda paper, sub, seeds, quick, **kw: calls.append((seeds, kw)))
  def select(paper, sub, length, grid, quick=False, report_only=False):
    json.dump({"finetune_lr": 0.3, "grid": list(grid)}, open(os.path.join(
        sub, pretrain_study.LR_FILE), "w"))
    return {"finetune_lr": 0.3}
  monkeypatch.setattr(pretrain_study, "select_lr", select)
  paper = reproduce.load_paper("zoph2020")
  w = str(tmp_path)

  def one_seed(length, seed):
    sub = pretrain_study.checked_length_dir(paper, w, length, False, True)
    return pretrain_study.one_seed_at_length(paper, w, sub, length, seed, (0.1, 0.3), None,
                                             False, True)
  assert one_seed(8.0, 1) is False  # the CLI exits 75
  assert calls[-1] == ([1], {"pretrain": 8.0, "claims": None, "reuse_from": [],
                             "pretraining_only": True})
  os.makedirs(tmp_path / "pretrain_8" / "seed1" / "pretrain_sup")  # what seed 1 ran
  assert one_seed(8.0, 0) is True
  assert calls[-1][0] == [0] and calls[-1][1]["finetune_lr"] == 0.3
  assert one_seed(8.0, 1) is True
  assert calls[-1][0] == [1] and calls[-1][1]["finetune_lr"] == 0.3
  # A seed that ran a tuned arm without the choice blocks selecting one.
  os.makedirs(tmp_path / "pretrain_16" / "seed1" / "sup_s4")
  with pytest.raises(ValueError, match="ran with the recipes' fine-tuning rates"):
    one_seed(16.0, 0)


def test_artifact_caches_never_answer_for_another_object():
  """An entry is used only for the object it was computed from: another
  object with the same id (the first freed: another length of a study) gets
  its own value, not the stale one, which had given another arm's numbers."""
  cache = reproduce.arts_cache()
  a, b = {"x": 1}, {"x": 2}
  assert reproduce.cached(cache, a, "v", lambda: a["x"]) == 1
  assert reproduce.cached(cache, a, "v", lambda: -1) == 1  # computed once
  cache[(id(b), "v")] = (a, 1)  # what a freed object's entry looks like to b
  assert reproduce.cached(cache, b, "v", lambda: b["x"]) == 2


def test_lr_selection_recipe_and_pick(tmp_path):
  from jaxrobust import stages as stages_lib
  from launch import pretrain_study
  paper = reproduce.load_paper("hendrycks2019")
  c = pretrain_study.lr_selection_recipe(paper, "plateau", (0.01, 0.1), quick=True)
  plan = stages_lib.stage_configs(c)  # every stage's merged config validates
  assert set(plan) == {"pretrain", "ft_lr0p01", "ft_lr0p1"}
  assert list(plan)[0] == "pretrain" and plan["pretrain"][2].early_stopping.metric
  for lr in (0.01, 0.1):
    cfg = plan["ft_lr" + f"{lr:g}".replace(".", "p")][2]
    assert cfg.optimizer.learning_rate == lr
    assert list(cfg.evaluators.keys()) == ["classification"]
    assert tuple(cfg.evaluators.classification.splits) == ("validation",)
  results = {"ft_lr0p01/validation/nll": 0.30, "ft_lr0p1/validation/nll": 0.25,
             "ft_lr0p01/validation/accuracy": 0.9, "ft_lr0p1/validation/accuracy": 0.91}
  chosen = pretrain_study.pick_lr(results, (0.01, 0.1))
  assert chosen["finetune_lr"] == 0.1 and chosen["scores"] == {"0.01": 0.30, "0.1": 0.25}
  # A recorded choice is reused; one from another grid is refused.
  json.dump(chosen, open(tmp_path / pretrain_study.LR_FILE, "w"))
  assert pretrain_study.select_lr(paper, str(tmp_path), 2, (0.01, 0.1))["finetune_lr"] == 0.1
  with pytest.raises(ValueError, match="another|grid"):
    pretrain_study.select_lr(paper, str(tmp_path), 2, (0.01, 0.3))
  with pytest.raises(ValueError, match="noselect_lr"):
    pretrain_study.check_lr_choice(str(tmp_path), select=False)


def test_transposed_table_and_negative_margin(tmp_path):
  """A "transposed" table has one row per metric and one column per arm; a
  negative margin asks for superiority by that margin (DFR's benchmark check:
  ERM's worst group at least 10 points below its mean)."""
  import dataclasses
  _write_runs(tmp_path, 0.95, 0.60)
  paper = dataclasses.replace(
      _paper((reproduce.Claim("good beats bad by 0.5", "test/accuracy", "good", "bad",
                              margin=-0.5),
              reproduce.Claim("good beats bad by 0.2", "test/accuracy", "good", "bad",
                              margin=-0.2))),
      tables=(("Flipped", (reproduce.Metric("test/nll", "NLL", False),),
               ("good", "bad"), "transposed"),))
  summary = reproduce.summarize(paper, str(tmp_path), [0, 1, 2])
  assert [c["verdict"] for c in summary["claims"]] == ["does not hold", "holds"]
  text = reproduce.write_report(paper, summary, str(tmp_path), quick=False)
  assert "superiority by a margin: holds when better by more than 0.5" in text
  block = text.split("**Flipped**")[1].strip().splitlines()
  assert block[0] == "| | **good** | **bad** |"
  assert block[2].startswith("| NLL | 0.0600 ± 0.0100 | 0.4100 ± 0.0100 |")


@pytest.mark.parametrize("args, message", [
    (["--only_seed", "3"], "--only_seed=3: the seeds are 0 to 2 (--seeds=3)."),
    (["--only_seed", "0", "--report_only"], "--only_seed runs one seed of a plain reproduction"),
    (["--reuse_from", "/no/such/dir"], "--reuse_from: /no/such/dir is not a directory."),
    (["--only_seed", "0", "--pretrain", "2,8"], "or of one --pretrain length; it does not go "
                                               "with --report_only or several lengths."),
    (["--claims", "no such claim"], "--claims: 'no such claim' names none of zoph2020's claims: "
                                    "1: The student beats its teacher (S4);"),
])
def test_only_seed_is_checked_before_anything_runs(tmp_path, args, message):
  """--only_seed (seeds as parallel processes) refuses a seed outside --seeds
  and the modes it does not go with, in one usage line, running nothing."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "launch.reproduce", "zoph2020", "--workdir",
                        str(tmp_path / "w"), *args], cwd=repo, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  assert message in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "w" / "seed0")
