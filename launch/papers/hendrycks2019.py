"""Hendrycks, Lee, Mazeika (ICML 2019), "Using Pre-Training Can Improve Model
Robustness and Uncertainty": pre-training improves calibration, OOD detection,
robustness to label corruption, class imbalance and adversarial robustness.

Embedded benchmark, one recipe per seed: pre-train the small CNN on ``glyphs``
(62 classes), then on ``digits``

* uncertainty: fine-tuning all layers, the new head only (BatchNorm frozen),
  and training from scratch (``configs/recipes/pretrain_finetune.py``);
* label corruption: CE, forward correction and GLC (5% and 10% trusted), from
  scratch and from the pre-trained model, at each corruption setting of
  :data:`LABEL_NOISE` (``configs/recipes/label_noise.py``);
* class imbalance: CE, cost-sensitive CE and oversampling on a step-imbalanced
  ``digits`` (ρ = 10, μ = 0.5), each from scratch and pre-trained
  (:mod:`jaxrobust.methods.imbalance`);
* adversarial: PGD adversarial training from scratch vs adversarial
  pre-training on ``glyphs`` + adversarial fine-tuning
  (:mod:`jaxrobust.methods.adversarial`), robust accuracy under PGD-20.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy.stats import rankdata

from configs import default
from configs.recipes import label_noise as label_noise_recipe
from configs.recipes import pretrain_finetune
from jaxrobust.methods import adversarial, transfer
from launch.papers import OOD_GROUP_OF, Claim, Metric, Paper, arts_cache, cached

OOD_SETS = ("gaussian", "rademacher", "blobs", "photo")
QUICK_OOD_SETS = ("gaussian", "photo")
# (kind, strength) of the label-corruption arms; quick mode runs the first.
LABEL_NOISE = (("uniform", 0.5), ("flip", 0.3))
LABEL_NOISE_METHODS = {"ce": "no correction", "forward": "forward correction",
                       "glc5_glc": "GLC, 5% trusted", "glc10_glc": "GLC, 10% trusted"}
IMBALANCE = "imbalanced(ratio=10.0, minority_fraction=0.5, seed={seed})"
IMBALANCE_METHODS = {"ce": ("dataset", "shuffle", "CE"),
                     "cost": ("class_weighted", "shuffle", "cost-sensitive CE"),
                     "over": ("dataset", "class_balanced", "oversampling")}
NO_OOD = {"ood": {"sets": {}}, "ood_all": {"sets": {}}}
# Arm-name suffix -> how the arm starts: from scratch or from the glyphs model.
INITS = {"scratch": "scratch", "pre": "pre-trained"}
_DERIVED = arts_cache()


def _tag(kind: str, strength: float) -> str:
  return f"{kind}{int(round(100 * strength))}"


def _robust() -> dict:
  """A ``robust`` evaluator: PGD-20 (ε = 8/255, step 2/255) on digits:test."""
  return adversarial.adversarial({})["evaluators"]


# The pre-training stages a pre-training length (--pretrain) sets.
PRETRAIN_STAGES = ("pretrain", "adv_pretrain")


def recipe(seed: int, quick: bool, pretrain: float | str | None = None):
  """The recipe of one seed; ``pretrain``: the pre-training length of the
  ``pretrain`` and ``adv_pretrain`` stages (epochs of ``glyphs`` or
  ``'plateau'``, :func:`configs.default.with_pretrain_length`; None: the
  recipe's 2 epochs, quick 1 and 0.25)."""
  arg = "mode=compare" + (",pretrain_epochs=1,epochs=3,scratch_epochs=4" if quick else "")
  c = pretrain_finetune.get_config(arg)
  c.seed = seed
  c.evaluators.classification.save = True
  # `ood`: Hendrycks et al.'s protocol (1 OOD example per 5 test examples, 5
  # draws), for AUPR. `ood_all`: every OOD example, saved, for AUROC and its
  # bootstrap interval.
  c.evaluators.ood.fraction = 0.2
  c.evaluators.ood.draws = 5
  c.evaluators.ood_all = dict(c.evaluators.ood.to_dict(), fraction=0.0, draws=1,
                              prefix="ood_all", save=True)
  c.progress_bar = False
  if quick:
    c.evaluators.ood.sets = {k: v for k, v in c.evaluators.ood.sets.items()
                             if k in QUICK_OOD_SETS}
    c.evaluators.ood_all.sets = dict(c.evaluators.ood.sets)
  stages = c.stages.to_dict()
  pre = stages["pretrain"]["config"]
  if pretrain is not None:
    pre = default.with_pretrain_length(pre, pretrain, source=pre["data"]["name"])
    stages["pretrain"]["config"] = pre
  epochs = {"num_epochs": 3.0} if quick else {}
  scratch_epochs = {"num_epochs": 4.0} if quick else {}
  ft_options = {"learning_rate": pretrain_finetune.EMBEDDED_FINETUNE_LR, "batch_size": 64,
                **epochs}
  # The clean arms' robust accuracy (PGD-20), the "normal training" row.
  for arm in ("finetune", "scratch"):
    stages[arm]["config"] = {**stages[arm]["config"], "evaluators": {
        **stages[arm]["config"].get("evaluators", {}), **_robust()}}
  # Label corruption (quick: the first setting).
  for kind, strength in LABEL_NOISE[:1] if quick else LABEL_NOISE:
    for init in INITS:
      arms = label_noise_recipe.stages(
          c, method="compare", kind=kind, strength=strength, gold_fraction=0.05, seed=seed,
          init="artifact:pretrain/checkpoint" if init == "pre" else None,
          finetune=ft_options if init == "pre" else None,
          prefix=f"{_tag(kind, strength)}_{init}_",
          overrides={"evaluators": NO_OOD, **(scratch_epochs if init == "scratch" else {})})
      stages.update(arms)
  # Class imbalance.
  for name, (labels, sampler, _) in IMBALANCE_METHODS.items():
    train = {"index": IMBALANCE.format(seed=seed), "labels": labels, "sampler": sampler}
    stages[f"imb_{name}_scratch"] = {"task": "train", "config": {
        "streams": {"train": train}, "evaluators": NO_OOD, **scratch_epochs}}
    tuned = transfer.fine_tune({"streams": {"train": train}, "evaluators": NO_OOD},
                               source="artifact:pretrain/checkpoint", **ft_options)
    stages[f"imb_{name}_pre"] = {"task": "train", "config": tuned}
  # Adversarial training (PGD-10; quick: PGD-2, shorter) vs adversarial pre-training.
  steps = 2 if quick else adversarial.TRAIN_STEPS
  adv_pre = adversarial.adversarial({**pre, **({"num_epochs": 0.25} if quick and pretrain is None
                                               else {})},
                                    train_steps=steps, evaluate=False)
  adv_ft = transfer.fine_tune({"evaluators": NO_OOD}, source="artifact:adv_pretrain/checkpoint",
                              **{**ft_options, "num_epochs": 1.0 if quick else
                                 adversarial.FINE_TUNE_EPOCHS})
  stages["adv_pretrain"] = {"task": "train", "config": adv_pre}
  stages["adv_finetune"] = {"task": "train",
                            "config": adversarial.adversarial(adv_ft, train_steps=steps)}
  stages["adv_scratch"] = {"task": "train", "config": adversarial.adversarial(
      {"evaluators": NO_OOD, **({"num_epochs": 2.0} if quick else {})}, train_steps=steps)}
  if quick:
    stages = {k: v for k, v in stages.items() if not _skipped_in_quick(k)}
  c.stages = stages
  return c


def _skipped_in_quick(stage: str) -> bool:
  """What ``--quick`` (a smoke test under 8 minutes) leaves out: the last-layer
  arm, GLC 5%, forward correction and GLC from scratch, and the pre-trained
  imbalance methods (every code path still runs once)."""
  return (stage == "last_layer" or "_glc5_" in stage
          or stage.startswith(tuple(f"{_tag(k, s)}_scratch_{m}" for k, s in LABEL_NOISE
                                    for m in ("forward", "glc10")))
          or stage in ("imb_cost_pre", "imb_over_pre"))


def _sets(arts: Mapping[str, Any]) -> list[str]:
  """The OOD sets an arm saved scores for (all four; two in quick mode)."""
  return [s for s in OOD_SETS if f"ood_all_scores_{s}" in arts]


def _derived(arts: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return cached(_DERIVED, arts, "derived", lambda: _derive(arts))


def _derive(arts: Mapping[str, Any]) -> dict[str, np.ndarray]:
  p = arts["predictions_test"]
  z = p["logits"].astype(np.float64)
  z = z - z.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  d = {"correct": (logp.argmax(1) == p["label"]).astype(np.float64),
       "conf": np.exp(logp.max(1)),
       "nll": -logp[np.arange(len(p["label"])), p["label"]], "label": p["label"]}
  for name in ("msp", "energy") if "ood_all_scores_test" in arts else ():
    d[f"in_{name}"] = arts["ood_all_scores_test"][name]
    for s in _sets(arts):
      d[f"{s}_{name}"] = arts[f"ood_all_scores_{s}"][name]
  return d


def _auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
  """P(score_in > score_out) + ½ P(tie): scikit-learn's AUROC with ID positive
  (= jaxrobust.metrics.ood.auroc)."""
  ranks = rankdata(np.concatenate([s_in, s_out]))
  n_in, n_out = len(s_in), len(s_out)
  return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def _rms(conf: np.ndarray, correct: np.ndarray, bin_size: int = 100,
         drop_last_bin: bool = False) -> float:
  """Hendrycks et al.'s RMS calibration error: adaptive bins of ``bin_size``
  sorted examples, the last absorbing the remainder, every bin counted
  (= jaxrobust.metrics.calibration.rms_calibration_error); ``drop_last_bin``:
  HPT's ``calib_err``, whose loop never counts the last bin (still dividing by
  every example) -- the convention of the paper's Table 6."""
  order = np.argsort(conf, kind="stable")
  conf, correct = conf[order], correct[order]
  n = len(conf)
  nb = max(n // bin_size, 1)
  edges = [i * bin_size for i in range(nb)] + [n]
  bins = list(zip(edges[:-1], edges[1:]))
  if drop_last_bin:
    bins = bins[:-1]
  err = sum((hi - lo) * (conf[lo:hi].mean() - correct[lo:hi].mean()) ** 2 for lo, hi in bins)
  return float(np.sqrt(err / n))


def _mean_auroc(score: str, group: str = ""):
  """Bootstrap of the AUROC averaged over the OOD sets (of ``group`` only:
  :data:`launch.papers.OOD_GROUPS`)."""
  def fn(arts, idx):
    d = _derived(arts)
    i = idx["test"]
    sets = [s for s in _sets(arts) if not group or OOD_GROUP_OF.get(s) == group]
    return float(np.mean([_auroc(d[f"in_{score}"][i], d[f"{s}_{score}"][idx[s]])
                          for s in sets]))
  return fn


def resample(arts: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
  d = _derived(arts)
  out = {"test": rng.integers(0, len(d["correct"]), len(d["correct"]))}
  for s in _sets(arts):
    n = len(d[f"{s}_msp"])
    out[s] = rng.integers(0, n, n)
  return out


def _balanced_accuracy(arts, idx):
  d = _derived(arts)
  i = idx["test"]
  correct, labels = d["correct"][i], d["label"][i]
  return float(np.mean([correct[labels == c].mean() for c in np.unique(labels)]))


ACCURACY = Metric("test/accuracy", "test accuracy", True,
                  lambda a, i: float(_derived(a)["correct"][i["test"]].mean()))
BALANCED = Metric("test/balanced_accuracy", "balanced test accuracy", True, _balanced_accuracy)
RMS = Metric("test/rms_calibration_error", "RMS calibration error (every bin)", False,
             lambda a, i: _rms(_derived(a)["conf"][i["test"]], _derived(a)["correct"][i["test"]]))
RMS_HPT = Metric("test/rms_calibration_error_hpt", "RMS calibration error (HPT: last bin dropped)",
                 False, lambda a, i: _rms(_derived(a)["conf"][i["test"]],
                                          _derived(a)["correct"][i["test"]], drop_last_bin=True))
ROBUST = Metric("robust/pgd20/accuracy", "PGD-20 accuracy (ε = 8/255)", True)
METRICS = (
    ACCURACY,
    Metric("test/nll", "test NLL", False, lambda a, i: float(_derived(a)["nll"][i["test"]].mean())),
    RMS,
    RMS_HPT,
    Metric("ood_all/msp/mean/auroc", "MSP AUROC (mean over OOD sets)", True, _mean_auroc("msp"),
           lambda g: _mean_auroc("msp", g)),
    Metric("ood/msp/mean/aupr_out", "MSP AUPR-out (1:5 draws)", True),
    Metric("ood_all/energy/mean/auroc", "energy AUROC (mean over OOD sets)", True,
           _mean_auroc("energy"), lambda g: _mean_auroc("energy", g)),
)
UNCERTAINTY_ARMS = {"finetune": "pre-trained on glyphs, all layers fine-tuned",
                    "last_layer": "pre-trained, new head only, BatchNorm frozen",
                    "scratch": "trained from scratch on digits"}
LABEL_NOISE_ARMS = {f"{_tag(k, s)}_{init}_{m}": f"{k} {s:g}, {desc}, {start}"
                    for k, s in LABEL_NOISE for init, start in INITS.items()
                    for m, desc in LABEL_NOISE_METHODS.items()}
IMBALANCE_ARMS = {f"imb_{m}_{init}": f"{desc}, {start}" for init, start in INITS.items()
                  for m, (_, _, desc) in IMBALANCE_METHODS.items()}
ADVERSARIAL_ARMS = {"adv_scratch": "PGD adversarial training from scratch",
                    "adv_finetune": "adversarial pre-training on glyphs + adversarial fine-tuning"}


def _ceilings(summary: Mapping[str, Any]) -> list[str]:
  """Normally trained gray digits already resist PGD-20 at ε = 8/255: little
  room for adversarial pre-training to help."""
  out = []
  for arm in ("finetune", "scratch"):
    row = summary["table"].get(arm, {})
    if ROBUST.key in row and ACCURACY.key in row:
      robust, clean = row[ROBUST.key]["mean"], row[ACCURACY.key]["mean"]
      if robust >= 0.5 * clean:
        out.append(f"{arm} (normal training) keeps {robust:.4f} PGD-20 accuracy at ε = 8/255 "
                   f"({robust / clean:.0%} of its clean {clean:.4f}): gray digits are almost "
                   "robust at this ε (CIFAR models keep ~0%), so the adversarial claims have "
                   "less to show.")
  return out


def _label_noise_claims():
  out = []
  for k, s in LABEL_NOISE:
    t = _tag(k, s)
    out.append(Claim(f"Pre-training lowers the error under {k} corruption {s:g} (no correction)",
                     "test/accuracy", f"{t}_pre_ce", f"{t}_scratch_ce",
                     "§4.2 Table 2: CIFAR-10 error 28.7 -> 15.9 (mean over strengths)"))
    out.append(Claim(f"Pre-training lowers the error with GLC (10% trusted), {k} {s:g}",
                     "test/accuracy", f"{t}_pre_glc10_glc", f"{t}_scratch_glc10_glc",
                     "§4.2 Table 2: CIFAR-10 GLC 10% 11.5 -> 6.4"))
    for init in INITS:
      out.append(Claim(f"Forward correction beats no correction ({k} {s:g}, {init})",
                       "test/accuracy", f"{t}_{init}_forward", f"{t}_{init}_ce",
                       "§4.2 Table 2: CIFAR-10 28.7 -> 25.5 (normal), 15.9 -> 15.7 (pre-trained)"))
      out.append(Claim(f"GLC (5% trusted) beats forward correction ({k} {s:g}, {init})",
                       "test/accuracy", f"{t}_{init}_glc5_glc", f"{t}_{init}_forward",
                       "§4.2 Table 2: CIFAR-10 25.5 -> 14.0 (normal), 15.7 -> 7.2 (pre-trained)"))
  return tuple(out)


PAPER = Paper(
    name="hendrycks2019",
    title="Hendrycks, Lee, Mazeika (ICML 2019): pre-training improves robustness and uncertainty",
    recipe=recipe,
    pretrain_stages=PRETRAIN_STAGES,
    tune_arm="finetune",
    arms={**UNCERTAINTY_ARMS, **ADVERSARIAL_ARMS, **IMBALANCE_ARMS, **LABEL_NOISE_ARMS},
    metrics=METRICS,
    main_arms=tuple(UNCERTAINTY_ARMS),
    tables=(
        ("Adversarial robustness: clean and PGD-20 test accuracy", (ACCURACY, ROBUST),
         ("finetune", "scratch", *ADVERSARIAL_ARMS)),
        ("Class imbalance (ρ = 10, μ = 0.5): test accuracy on the balanced test set",
         (ACCURACY, BALANCED), tuple(IMBALANCE_ARMS)),
        ("Label corruption: test accuracy (clean test labels)", (ACCURACY,),
         tuple(LABEL_NOISE_ARMS)),
    ),
    claims=(
        Claim("Pre-training lowers the RMS calibration error", "test/rms_calibration_error",
              "finetune", "scratch", "§5 Table 6: CIFAR-10 6.4 -> 3.6, CIFAR-100 13 -> 9 (RMS %)"),
        Claim("Pre-training lowers the RMS calibration error, HPT's convention (last bin "
              "dropped)", "test/rms_calibration_error_hpt", "finetune", "scratch",
              "§5 Table 6 (calib_err as published: its last bin is never counted)"),
        Claim("Pre-training raises the MSP OOD AUROC", "ood_all/msp/mean/auroc", "finetune",
              "scratch", "§5 Table 5: CIFAR-10 AUROC 91.5 -> 94.5"),
        Claim("Pre-training raises the MSP OOD AUPR", "ood/msp/mean/aupr_out", "finetune",
              "scratch", "§5 Table 5: CIFAR-10 AUPR 63.4 -> 73.5"),
        Claim("Adversarial pre-training raises the PGD-20 accuracy", "robust/pgd20/accuracy",
              "adv_finetune", "adv_scratch",
              "§4.1 Table 1: CIFAR-10 45.8 -> 57.4, CIFAR-100 24.3 -> 33.5"),
        Claim("Pre-training alone beats cost-sensitive training under imbalance",
              "test/accuracy", "imb_ce_pre", "imb_cost_scratch",
              "§4.3 Table 3: pre-training lowers the error more than the imbalance methods"),
        Claim("Pre-training alone beats oversampling under imbalance", "test/accuracy",
              "imb_ce_pre", "imb_over_scratch", "§4.3 Table 3"),
        *_label_noise_claims(),
    ),
    protocol=(
        "Embedded benchmark: the small CNN pre-trained on `glyphs` (62 classes, 2 epochs, batch "
        "128, lr 0.4), then on `digits` (1,257 train / 360 test images). **Uncertainty** "
        "(`configs/recipes/pretrain_finetune.py:mode=compare`): fine-tuned 10 epochs at lr 0.1 "
        "(all layers, or the new head only with BatchNorm frozen), against training from scratch "
        "(15 epochs, lr 0.3). Learning rates were picked on validation splits with seed 0 "
        "(docs/methods/pretrain-finetune.md). OOD: Gaussian, Rademacher, blobs and photo-patch "
        "sets (10,000 each), scored by "
        "maximum softmax probability (and energy), OOD as the positive class for AUPR; AUPR "
        "follows Hendrycks et al.'s 1 OOD : 5 ID draws (5 draws), AUROC uses every OOD example. "
        "RMS calibration error: adaptive bins of 100 test examples, reported twice -- every bin "
        "counted (`rms_calibration_error`), and as HPT's `calib_err` computes it, the last "
        "(highest-confidence) bin never counted but still in N (`rms_calibration_error_hpt`, "
        "the convention of the paper's figures); with 360 test digits that is 3 bins, the last "
        "holding 160 examples, so the two differ and their bootstrap intervals are wide. **Label corruption** "
        "(`configs/recipes/label_noise.py:method=compare`): training labels corrupted with the "
        "seed of the run (uniform: C = (1−s)I + s/K·11ᵀ; flip: one random other class per class "
        "with probability s), test labels clean; forward correction with anchor-point Ĉ (no "
        "percentile filter), GLC with 5% / 10% trusted examples; every phase trained as the arm "
        "(scratch: 15 epochs, lr 0.3; pre-trained: fine-tuned 10 epochs, lr 0.1), phase 2 "
        "re-initialised. **Imbalance**: `digits` train made step-imbalanced (half of the classes, "
        "drawn with the seed, keep 1/10 of their examples); cost-sensitive CE weights N/(K·n_c); "
        "oversampling draws every class equally often. **Adversarial**: PGD ℓ∞ ε = 8/255, step "
        "2/255, 10 steps, random start, training on adversarial examples only; adversarial "
        "pre-training on `glyphs` (2 epochs) then adversarial fine-tuning 5 epochs at lr 0.1 vs "
        "adversarial training from scratch (15 epochs, lr 0.3); robust accuracy under PGD-20 on "
        "the 360 test digits, eval mode. Quick mode trains less (pre-training 1 epoch, 3 / 4 "
        "epochs on digits; adversarial: PGD-2 in training, pre-training 0.25 epoch, fine-tuning "
        "1 epoch, from scratch 2 epochs), scores two OOD sets (Gaussian, photo patches) and "
        "leaves out arms (last layer; GLC 5%; forward and GLC from scratch; the pre-trained "
        "imbalance methods) -- their claims are marked not run."),
    not_covered=(
        "The paper's sweep over corruption strengths 0–1 (here: uniform 0.5 and flip 0.3), "
        "hierarchical corruption (CIFAR-100 superclasses; the recipe has it, with a stroke-shape "
        "grouping for digits, not run here), SMOTE, and the CIFAR / Downsampled-ImageNet scale "
        "(no dataset download on this machine)."),
    resample=resample,
    ceilings=_ceilings,
    plots=("finetune/plots/ood_msp.png", "scratch/plots/ood_msp.png",
           "finetune/plots/reliability_test.png", "scratch/plots/reliability_test.png"),
)
