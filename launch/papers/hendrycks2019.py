"""Hendrycks, Lee, Mazeika (ICML 2019), "Using Pre-Training Can Improve Model
Robustness and Uncertainty" -- the uncertainty part: pre-training improves
calibration and out-of-distribution detection.

Embedded benchmark: pre-train the small CNN on ``glyphs`` (62 classes), then on
``digits`` compare fine-tuning all layers, fine-tuning the new head only
(BatchNorm frozen) and training from scratch
(``configs/recipes/pretrain_finetune.py:mode=compare``). Adversarial
pre-training, label corruption and class imbalance come with their methods.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy.stats import rankdata

from configs.recipes import pretrain_finetune
from launch.papers import Claim, Metric, Paper

OOD_SETS = ("gaussian", "rademacher", "blobs", "photo")
_CACHE: dict[int, dict[str, np.ndarray]] = {}


def recipe(seed: int, quick: bool):
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
  return c


def _derived(arts: Mapping[str, Any]) -> dict[str, np.ndarray]:
  key = id(arts)
  if key not in _CACHE:
    p = arts["predictions_test"]
    z = p["logits"].astype(np.float64)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    d = {"correct": (logp.argmax(1) == p["label"]).astype(np.float64),
         "conf": np.exp(logp.max(1)),
         "nll": -logp[np.arange(len(p["label"])), p["label"]]}
    for name in ("msp", "energy"):
      d[f"in_{name}"] = arts["ood_all_scores_test"][name]
      for s in OOD_SETS:
        d[f"{s}_{name}"] = arts[f"ood_all_scores_{s}"][name]
    _CACHE[key] = d
  return _CACHE[key]


def _auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
  """P(score_in > score_out) + ½ P(tie): scikit-learn's AUROC with ID positive
  (= jaxrobust.metrics.ood.auroc)."""
  ranks = rankdata(np.concatenate([s_in, s_out]))
  n_in, n_out = len(s_in), len(s_out)
  return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def _rms(conf: np.ndarray, correct: np.ndarray, bin_size: int = 100) -> float:
  """Hendrycks et al.'s RMS calibration error, every bin counted
  (= jaxrobust.metrics.calibration.rms_calibration_error)."""
  order = np.argsort(conf, kind="stable")
  conf, correct = conf[order], correct[order]
  n = len(conf)
  nb = max(n // bin_size, 1)
  edges = [i * bin_size for i in range(nb)] + [n]
  err = sum((hi - lo) * (conf[lo:hi].mean() - correct[lo:hi].mean()) ** 2
            for lo, hi in zip(edges[:-1], edges[1:]))
  return float(np.sqrt(err / n))


def _mean_auroc(score: str):
  def fn(arts, idx):
    d = _derived(arts)
    i = idx["test"]
    return float(np.mean([_auroc(d[f"in_{score}"][i], d[f"{s}_{score}"][idx[s]])
                          for s in OOD_SETS]))
  return fn


def resample(arts: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
  d = _derived(arts)
  out = {"test": rng.integers(0, len(d["correct"]), len(d["correct"]))}
  for s in OOD_SETS:
    n = len(d[f"{s}_msp"])
    out[s] = rng.integers(0, n, n)
  return out


METRICS = (
    Metric("test/accuracy", "test accuracy", True,
           lambda a, i: float(_derived(a)["correct"][i["test"]].mean())),
    Metric("test/nll", "test NLL", False, lambda a, i: float(_derived(a)["nll"][i["test"]].mean())),
    Metric("test/rms_calibration_error", "RMS calibration error", False,
           lambda a, i: _rms(_derived(a)["conf"][i["test"]], _derived(a)["correct"][i["test"]])),
    Metric("ood_all/msp/mean/auroc", "MSP AUROC (mean of 4 sets)", True, _mean_auroc("msp")),
    Metric("ood/msp/mean/aupr_out", "MSP AUPR-out (1:5 draws)", True),
    Metric("ood_all/energy/mean/auroc", "energy AUROC (mean of 4 sets)", True,
           _mean_auroc("energy")),
)

PAPER = Paper(
    name="hendrycks2019",
    title="Hendrycks, Lee, Mazeika (ICML 2019): pre-training improves uncertainty",
    recipe=recipe,
    arms={"finetune": "pre-trained on glyphs, all layers fine-tuned",
          "last_layer": "pre-trained, new head only, BatchNorm frozen",
          "scratch": "trained from scratch on digits"},
    metrics=METRICS,
    claims=(
        Claim("Pre-training lowers the RMS calibration error", "test/rms_calibration_error",
              "finetune", "scratch", "§5 Table 6: CIFAR-10 6.4 -> 3.6, CIFAR-100 13 -> 9 (RMS %)"),
        Claim("Pre-training raises the MSP OOD AUROC", "ood_all/msp/mean/auroc", "finetune",
              "scratch", "§5 Table 5: CIFAR-10 AUROC 91.5 -> 94.5"),
        Claim("Pre-training raises the MSP OOD AUPR", "ood/msp/mean/aupr_out", "finetune",
              "scratch", "§5 Table 5: CIFAR-10 AUPR 63.4 -> 73.5"),
    ),
    protocol=(
        "Embedded benchmark (`configs/recipes/pretrain_finetune.py:mode=compare`): the small CNN "
        "pre-trained on `glyphs` (62 classes, 2 epochs, batch 128, lr 0.4), then on `digits` "
        "(1,257 train / 360 test images) fine-tuned 10 epochs at lr 0.1 (all layers, or the new "
        "head only with BatchNorm frozen), against training from scratch (15 epochs, lr 0.3). "
        "Learning rates were picked on validation splits with seed 0 (README). OOD: Gaussian, "
        "Rademacher, blobs and photo-patch sets (10,000 each), scored by maximum softmax "
        "probability (and energy), OOD as the positive class for AUPR; AUPR follows Hendrycks "
        "et al.'s 1 OOD : 5 ID draws (5 draws), AUROC uses every OOD example. RMS calibration "
        "error: adaptive bins of 100 test examples, every bin counted -- with 360 test digits "
        "that is 3 bins, so its bootstrap interval is wide. Quick mode trains less "
        "(pre-training 1 epoch, 3 / 4 epochs on digits)."),
    not_covered=(
        "Adversarial pre-training, label corruption (forward correction, GLC) and class "
        "imbalance are reproduced with their methods (the robustness issue); this report covers "
        "the calibration and OOD-detection claims."),
    resample=resample,
    plots=("finetune/plots/ood_msp.png", "scratch/plots/ood_msp.png",
           "finetune/plots/reliability_test.png", "scratch/plots/reliability_test.png"),
)
