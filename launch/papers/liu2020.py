"""Liu, Wang, Owens, Li (NeurIPS 2020), "Energy-based Out-of-distribution
Detection", with the baselines it compares against: MSP (Hendrycks & Gimpel),
ODIN, Mahalanobis, Outlier Exposure, and Lee et al.'s confidence loss.

Embedded benchmark: ``configs/recipes/ood.py:mode=compare`` per seed (digits
in-distribution; upper-case glyphs as training outliers; four synthetic/photo
OOD sets and lower-case glyphs as test OOD; MSP's and energy's T, ODIN's T
and ε and Mahalanobis' ε tuned on the OE code's ``--validate`` sets made from
``digits:validation``, :mod:`jaxrobust.data.validation_ood`). Metrics follow the energy code's protocol (the ``energy``
preset: in-distribution positive, FPR at 95% TPR, AUPR-in, 1 OOD per 5 test
images averaged over 10 draws).
"""

from __future__ import annotations

from configs.recipes import ood
from launch.papers import Claim, Metric, Paper

SETS = ("gaussian", "rademacher", "blobs", "photo", "letters")


def recipe(seed: int, quick: bool):
  c = ood.get_config("mode=compare,posthoc=True" + (",baseline_epochs=3,epochs=2" if quick
                                                     else ""))
  c.seed = seed
  c.progress_bar = False
  if quick:
    c.plots = False
    c.stages.tune_odin.grid = {"temperature": (1.0, 1000.0), "epsilon": (0.0, 0.0014)}
    c.stages.tune_mahalanobis.grid = {"epsilon": (0.0, 0.0014)}
    for score in ("msp", "energy"):
      c.stages[f"tune_{score}"].grid = {"temperature": (1.0, 1000.0)}
  return c


def _fpr(score: str, what: str = "mean") -> Metric:
  return Metric(f"ood/{score}/{what}/fpr95", f"{score} FPR95" + ("" if what == "mean" else
                                                                    f" {what}"), False)


METRICS = (
    Metric("test/accuracy", "test accuracy", True),
    _fpr("msp"), _fpr("energy"), _fpr("odin"), _fpr("mahalanobis"),
    _fpr("msp_tuned"), _fpr("energy_tuned"),
    Metric("ood/msp/mean/auroc", "MSP AUROC", True),
    Metric("ood/energy/mean/auroc", "energy AUROC", True),
    Metric("ood/energy/mean/aupr_in", "energy AUPR-in", True),
)
PER_SET = tuple(_fpr(score, s) for score in ("msp", "energy") for s in SETS)
# What each tune_<score> stage chose: its options and the validation FPR95
# (mean over the validation OOD sets) of the chosen point.
TUNE_ARMS = {f"tune_{s}": f"{s} tuned on the validation OOD sets (digits:validation)"
             for s in ood.TUNED_SCORES}
TUNED = (Metric("fpr95", "validation FPR95 (mean over the validation OOD sets)", False),
         Metric("temperature", "T chosen", False),
         Metric("epsilon", "ε chosen", False))
MAIN_ARMS = ("scores", "energy_ft", "oe_ft", "confidence")
# Every post-hoc detector on the baseline and energy-fine-tuned models, OpenOOD's protocol
# (OOD positive, every OOD example; near = letters, far = noise and photo patches).
POSTHOC_ARMS = {"posthoc_baseline": "baseline model, every detector at its defaults (OpenOOD "
                                    "protocol)",
                "posthoc_energy_ft": "energy-fine-tuned model, every detector at its defaults "
                                     "(OpenOOD protocol)"}


def _posthoc(metric: str, group: str, higher: bool) -> tuple[Metric, ...]:
  return tuple(Metric(f"ood/{score}/{group}/{metric}", score, higher)
               for score in ood.CHECKPOINT_SCORES)


POSTHOC_TABLES = tuple(
    (f"Post-hoc detectors, {label} ({group} OOD: "
     f"{'lower-case letters' if group == 'near' else 'noise sets and photo patches'}; "
     "OpenOOD convention: OOD positive, every OOD example, defaults untuned)",
     _posthoc(metric, group, higher), tuple(POSTHOC_ARMS), "transposed")
    for metric, label, higher in (("auroc", "AUROC", True),
                                  ("fpr95_ood_positive", "FPR at 95% TPR (OOD positive)", False))
    for group in ("near", "far"))

PAPER = Paper(
    name="liu2020",
    title="Liu et al. (NeurIPS 2020): energy-based OOD detection",
    recipe=recipe,
    arms={"scores": "baseline model (trained on digits), scored four ways",
          "energy_ft": "baseline fine-tuned with the energy hinge and outliers",
          "oe_ft": "baseline fine-tuned with Outlier Exposure",
          "confidence": "trained from scratch with Lee et al.'s confidence loss",
          **TUNE_ARMS, **POSTHOC_ARMS},
    main_arms=MAIN_ARMS,
    metrics=METRICS,
    tables=(("FPR95 per OOD set (MSP and energy scores)", PER_SET, MAIN_ARMS),
            ("Tuning: the options chosen on the validation OOD sets "
             f"({', '.join(ood.VALIDATION_OOD)} of digits:validation)", TUNED,
             tuple(TUNE_ARMS)), *POSTHOC_TABLES),
    claims=(
        Claim("The energy score has a lower FPR95 than MSP on the same model",
              "ood/msp/mean/fpr95", "scores:ood/energy/mean/fpr95",
              "scores:ood/msp/mean/fpr95", "Table 1: CIFAR-10 FPR95 51.04 -> 33.01"),
        Claim("The energy score has a lower FPR95 than ODIN", "ood/msp/mean/fpr95",
              "scores:ood/energy/mean/fpr95", "scores:ood/odin/mean/fpr95",
              "README: CIFAR-10 ODIN 35.71 vs energy 33.01"),
        Claim("The energy score has a lower FPR95 than Mahalanobis", "ood/msp/mean/fpr95",
              "scores:ood/energy/mean/fpr95", "scores:ood/mahalanobis/mean/fpr95",
              "README: CIFAR-10 Mahalanobis 37.08 vs energy 33.01"),
        Claim("Energy fine-tuning with auxiliary outliers lowers the energy FPR95",
              "ood/energy/mean/fpr95", "energy_ft", "scores",
              "Table 2: CIFAR-10 33.01 -> 3.32"),
        Claim("Outlier Exposure lowers the MSP FPR95", "ood/msp/mean/fpr95", "oe_ft", "scores",
              "Table 2: CIFAR-10 51.04 -> 8.53"),
        Claim("Energy fine-tuning lowers FPR95 at least as much as OE", "ood/msp/mean/fpr95",
              "energy_ft:ood/energy/mean/fpr95", "oe_ft:ood/msp/mean/fpr95",
              "Table 2: energy fine-tune 3.32 vs OE 8.53 (CIFAR-10)"),
        Claim("Energy fine-tuning costs at most about a point of test accuracy",
              "test/accuracy", "energy_ft", "scores",
              "§4.2: in-distribution error 5.16 (baseline) vs 4.98 (energy fine-tune), CIFAR-10",
              margin=0.01),
        Claim("Training with the confidence loss lowers the MSP FPR95 (Lee et al. 2018)",
              "ood/msp/mean/fpr95", "confidence", "scores",
              "Lee et al. (ICLR 2018), Table 1 with an explicit OOD set"),
    ),
    protocol=(
        "Embedded benchmark (`configs/recipes/ood.py:mode=compare`): the small CNN trained on "
        "`digits` from scratch (15 epochs, lr 0.3; the energy code's pre-trained model). "
        "**Tuned scores**: ODIN (T and ε), Mahalanobis (ε), and MSP and energy (T, as "
        "`msp_tuned` / `energy_tuned`; `msp` and `energy` stay at the papers' T = 1) are tuned on "
        "`digits:validation` against the OE code's `--validate` sets made from it "
        "(`validation_ood/<kind>/digits:validation`: jigsaw, speckle σ 1, pixelate 0.2, RGB "
        "shift, invert, arithmetic and geometric means of image pairs), lowest FPR95 averaged "
        "over the seven sets, over the energy code's grids (T ∈ {1, 10, 100, 1000}); none of "
        "them resembles a test set (earlier runs tuned ODIN and Mahalanobis on uniform noise, "
        "close to the Gaussian and Rademacher test sets). Energy fine-tuning "
        "(10 epochs, margins from the baseline's median energies on `digits:train` and the "
        "training outliers) and OE fine-tuning (λ 0.5) from the baseline, with an outlier "
        "batch of twice the in-distribution batch (64 + 128) from `glyphs/upper:train`; Lee et "
        "al.'s confidence loss (β 1) trained from scratch with the same outliers. Test OOD "
        "sets: Gaussian, Rademacher, blobs and photo patches (10,000 each) and lower-case "
        "glyphs (2,600, near OOD), none of them seen in training or tuning. Metrics: the energy "
        "code's convention (in-distribution positive, FPR at 95% TPR, AUPR-in), 1 OOD image "
        "per 5 test digits, averaged over 10 seeded draws. Intervals: over seeds only (no "
        "per-example bootstrap for this paper). Quick mode: baseline 3 epochs, fine-tuning 2, "
        "2×2 ODIN grid, 2 Mahalanobis ε, 2 temperatures for MSP and energy, no plots. "
        "Post-hoc detectors (`posthoc=True`): the 22 scores of `configs/recipes/ood.py` "
        "`CHECKPOINT_SCORES` at their defaults on the baseline and energy-fine-tuned models, "
        "under OpenOOD v1.5's protocol instead (OOD positive, FPR at 95% TPR of the OOD images, "
        "every OOD example, AUROC; near = the letters, far = the other four sets, each group "
        "the mean of its sets' metrics)."),
    plots=("scores/plots/ood_msp.png", "scores/plots/ood_energy.png",
           "energy_ft/plots/ood_energy.png", "oe_ft/plots/ood_msp.png"),
)
