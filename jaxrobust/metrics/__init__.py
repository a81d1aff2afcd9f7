"""Jitted metrics: OOD detection, calibration, classification, generative models.

Pure JAX: importing this package pulls in neither flax, tfds, TensorFlow nor
matplotlib. Every function is exact, jittable with static shapes, and takes a
validity mask so a padded eval batch gives exactly the unpadded answer. Eager
calls validate their inputs and raise ``ValueError`` naming the problem; under
``jax.jit`` invalid values give NaN, never a finite wrong number.

Conventions are explicit arguments:

* OOD scores are **higher = more in-distribution** (MSP, negative energy).
  Which class is positive, how the 95% point is picked and AP vs trapezoid are
  arguments, and :func:`~jaxrobust.metrics.ood.ood_metrics` presets reproduce the Hendrycks, energy,
  OpenOOD and Lee et al. reference implementations (table in
  :mod:`jaxrobust.metrics.ood`).
* Calibration follows Hendrycks et al. (adaptive bins of 100, optionally with
  the reference's dropped last bin) and Guo et al. (equal-width ECE).
* Generative precision/recall compare ``real`` with ``fake`` features:
  improved P&R (Kynkäänniemi et al.) and P-precision/P-recall (Park & Kim),
  computed block by block (never an N x M distance matrix).

Sub-modules: :mod:`~jaxrobust.metrics.ood`, :mod:`~jaxrobust.metrics.calibration`,
:mod:`~jaxrobust.metrics.classification`, :mod:`~jaxrobust.metrics.temperature`,
:mod:`~jaxrobust.metrics.streaming` (accumulators for sharded eval loops),
:mod:`~jaxrobust.metrics.generative`.
"""

from jaxrobust.metrics.calibration import (
    brier_score, classwise_ece, confidences_and_correct, expected_calibration_error,
    mad_calibration_error, negative_log_likelihood, nll_from_logits, nll_from_probs,
    reliability_diagram_data, rms_calibration_error, soft_f1)
from jaxrobust.metrics.classification import (
    WATERBIRDS_TRAIN_GROUP_COUNTS, accuracy, confusion_matrix, group_accuracies,
    group_weighted_accuracy, per_class_accuracy, top_k_accuracy, worst_group_accuracy)
from jaxrobust.metrics.generative import (
    improved_precision_recall, probabilistic_precision_recall)
from jaxrobust.metrics.ood import (
    PRESETS, aupr_in, aupr_out, auroc, detection_accuracy, fpr_at_tpr, ood_metrics, tnr_at_tpr)
from jaxrobust.metrics.streaming import CalibrationHistogram, ExactOOD, OODHistogram
from jaxrobust.metrics.temperature import fit_temperature

__all__ = [
    "PRESETS", "WATERBIRDS_TRAIN_GROUP_COUNTS", "CalibrationHistogram", "ExactOOD",
    "OODHistogram", "accuracy", "aupr_in", "aupr_out", "auroc", "brier_score",
    "classwise_ece", "confidences_and_correct", "confusion_matrix", "detection_accuracy",
    "expected_calibration_error", "fit_temperature", "fpr_at_tpr", "group_accuracies",
    "group_weighted_accuracy", "improved_precision_recall", "mad_calibration_error",
    "negative_log_likelihood", "nll_from_logits", "nll_from_probs", "ood_metrics",
    "per_class_accuracy", "probabilistic_precision_recall",
    "reliability_diagram_data", "rms_calibration_error", "soft_f1", "tnr_at_tpr",
    "top_k_accuracy", "worst_group_accuracy",
]
