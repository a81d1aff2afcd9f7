"""Lee, Lee, Lee, Shin (ICLR 2018), "Training Confidence-calibrated Classifiers
for Detecting Out-of-Distribution Samples": cross-entropy vs the confidence
loss with a real outlier set vs the joint confidence loss with a GAN.

Embedded benchmark: ``configs/recipes/confidence_gan.py:mode=compare`` per
seed (digits in-distribution; the confidence arm's outliers are the
upper-case glyphs; test OOD sets: Gaussian, Rademacher, blobs, photo patches
and lower-case glyphs, none seen in training). Metrics: the ``lee`` preset
(MSP; TNR at TPR 95%, AUROC, detection accuracy, AUPR-in/out over every OOD
example, in-distribution positive), as the reference's ``test_detection.py``
and ``calculate_log.py``.
"""

from __future__ import annotations

from configs.recipes import confidence_gan
from launch.papers import Claim, Metric, Paper

SETS = ("gaussian", "rademacher", "blobs", "photo", "letters")


def recipe(seed: int, quick: bool):
  c = confidence_gan.get_config("mode=compare" + (",epochs=3,samples=300" if quick else ""))
  c.seed = seed
  c.progress_bar = False
  if quick:
    c.plots = False
  return c


def _ood(metric: str, what: str = "mean", label: str = "") -> Metric:
  return Metric(f"ood/msp/{what}/{metric}", label or f"{metric} ({what})", metric != "fpr95")


METRICS = (
    Metric("test/accuracy", "test accuracy", True),
    _ood("tnr95", label="TNR at TPR 95%"),
    _ood("auroc", label="AUROC"),
    _ood("detection_accuracy", label="detection accuracy"),
    _ood("aupr_in", label="AUPR-in"),
    _ood("aupr_out", label="AUPR-out"),
)
PER_SET = tuple(_ood("tnr95", s, f"TNR95 {s}") for s in SETS)
GAN = (
    Metric("msp_generated", "MSP on G(z)", False),
    Metric("msp_real", "MSP on test digits", True),
    Metric("p_precision", "P-precision", True),
    Metric("p_recall", "P-recall", True),
    Metric("precision", "precision (k=3)", True),
    Metric("recall", "recall (k=3)", True),
)

PAPER = Paper(
    name="lee2018",
    title="Lee et al. (ICLR 2018): confidence loss and joint confidence loss with a GAN",
    recipe=recipe,
    arms={"ce": "cross-entropy only (the baseline)",
          "confidence": "cross-entropy + beta KL(U || p) on real outliers (upper-case glyphs)",
          "joint": "joint confidence loss: classifier trained with a GAN's boundary samples",
          "gan": "the joint run's generator, judged on the ce model's features"},
    main_arms=("ce", "confidence", "joint"),
    metrics=METRICS,
    tables=(("TNR at TPR 95% per OOD set (MSP)", PER_SET, ("ce", "confidence", "joint")),
            ("The generator of the joint run", GAN, ("gan",))),
    claims=(
        Claim("The joint confidence loss improves detection over cross-entropy (TNR at TPR 95%)",
              "ood/msp/mean/tnr95", "joint", "ce",
              "Table 1 / Fig. 4: e.g. SVHN in-dist., CIFAR-10 OOD, TNR 32.2 -> 99.0 (VGG-13)"),
        Claim("The joint confidence loss improves AUROC over cross-entropy",
              "ood/msp/mean/auroc", "joint", "ce", "Table 1 (AUROC)"),
        Claim("The joint confidence loss keeps in-distribution accuracy within about a point",
              "test/accuracy", "joint", "ce",
              "§4: 'without losing the original classification accuracy'", margin=0.01),
        Claim("The confidence loss with real outliers improves detection over cross-entropy",
              "ood/msp/mean/tnr95", "confidence", "ce", "Fig. 2 / Table 1 (explicit OOD set)"),
        Claim("The classifier is less confident on the generator's samples than on test digits",
              "msp_generated", "gan:msp_generated", "gan:msp_real",
              "§3: the generator produces samples in the low-density boundary region"),
    ),
    protocol=(
        "Embedded benchmark (`configs/recipes/confidence_gan.py:mode=compare`): the embedded "
        "small CNN on `digits`, 15 epochs (295 steps), Adam lr 3e-3 (picked on `digits:validation` NLL from "
        "{2e-4 (the reference's), 1e-3, 3e-3}; x 0.1 at epoch 9), batch 64, no augmentation, "
        "[0, 1] inputs, for every arm; the confidence arm adds beta KL(U || p) "
        "on a batch of 64 upper-case glyphs; the joint arm trains a DCGAN (nz 100, ngf = ndf = "
        "32, one channel; Adam 2e-4, beta1 0.5) with the reference's three updates per step, "
        "beta 1 (the reference's SVHN value, digits being the closest). OOD test sets: "
        "Gaussian, Rademacher, blobs, photo patches (10,000 each) and lower-case glyphs "
        "(2,600), every example, MSP. The generator: 1,000 samples, P-precision/recall "
        "(a 1.2, k 4) and improved precision/recall (k 3) against the 360 test digits on the "
        "ce model's penultimate features. Intervals: over seeds only. Quick mode: 3 epochs, "
        "300 generated samples, no plots."),
    plots=("gan/samples.png", "gan/msp.png", "joint/plots/ood_msp.png", "ce/plots/ood_msp.png"),
)
