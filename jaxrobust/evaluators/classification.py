"""Classification and calibration on the task's eval splits.

Result keys per split: ``<split>/accuracy``, ``<split>/nll``, ``<split>/brier``
(sum over classes), ``<split>/rms_calibration_error`` (Hendrycks et al.'s
adaptive bins of ``calibration_bin_size`` examples, every bin counted; see
:func:`jaxrobust.metrics.calibration.rms_calibration_error`),
``<split>/rms_calibration_error_hpt`` (the same bins with the last,
highest-confidence bin left out of the sum but not out of N: HPT/OE's
``calib_err``, the convention of their published figures), ``<split>/ece``
(``ece_bins`` equal-width bins, l1), ``<split>/balanced_accuracy`` (the mean
of the per-class accuracies over the classes present: what class imbalance
hurts), with ``per_class=True`` also ``<split>/class_accuracy/<c>``, and
``<split>/num_examples``. With ``pp`` (a deterministic pp chain such as
``'downsample(4)'``) the images pass through it before the module: the
low-resolution protocol of A-SKD (:mod:`jaxrobust.methods.attention_distill`).
The
reliability diagram of the last split goes to ``plots/reliability_<split>.png``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from jaxrobust.evaluators import EVALUATORS, EvalContext, Evaluator
from jaxrobust.metrics import calibration


def input_pp(chain: str, where: str) -> tuple[Any, str]:
  """``(perturb hook, its cache key)`` applying the pp ``chain`` to the eval
  images (``[0, 1]``, before the module's normalisation), or ``(None, '')``
  for ''. The chain gets a fixed key: it should be deterministic."""
  if not chain:
    return None, ""
  from jaxrobust.data import pp as pp_lib
  fn = pp_lib.build(chain, where=where)
  return (lambda ctx: fn(jax.random.PRNGKey(0), ctx.x)), f"pp:{chain}"


def summarize(logits: np.ndarray, labels: np.ndarray, *, bin_size: int = 100,
              ece_bins: int = 15, per_class: bool = False) -> dict[str, float]:
  """Accuracy, balanced accuracy, NLL, Brier, RMS calibration error and ECE of
  logits [N, K] (and each class's accuracy with ``per_class``)."""
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  probs = np.exp(logp)
  correct = (probs.argmax(-1) == labels).astype(np.float32)
  conf = probs.max(-1)
  onehot = np.eye(logits.shape[-1])[labels]
  counts = np.bincount(labels, minlength=logits.shape[-1])
  hits = np.bincount(labels, weights=correct, minlength=logits.shape[-1])
  class_acc = {c: float(hits[c] / counts[c]) for c in np.flatnonzero(counts)}
  out = {
      "accuracy": float(correct.mean()),
      "balanced_accuracy": float(np.mean(list(class_acc.values()))),
      "nll": float(-logp[np.arange(len(labels)), labels].mean()),
      "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
      "rms_calibration_error": float(calibration.rms_calibration_error(
          conf, correct, bin_size=bin_size)),
      "rms_calibration_error_hpt": float(calibration.rms_calibration_error(
          conf, correct, bin_size=bin_size, drop_last_bin=True)),
      "ece": float(calibration.expected_calibration_error(conf, correct, num_bins=ece_bins)),
      "num_examples": float(len(labels)),
  }
  if per_class:
    out.update({f"class_accuracy/{c}": v for c, v in class_acc.items()})
  return out


@EVALUATORS.register("classification")
class Classification(Evaluator):
  """Accuracy and calibration of the task's splits.

  Args:
    splits: splits of ``config.data.name`` to evaluate.
    calibration_bin_size: examples per bin of the RMS calibration error (100,
      Hendrycks et al.).
    ece_bins: equal-width bins of the ECE (15, Guo et al.).
    save: at the end, write ``predictions_<split>.npz`` (``logits``,
      ``label``, in dataset order) to the run's artifacts.
    per_class: also report each class's accuracy.
    pp: a deterministic pp chain applied to the images before the module
      (``'downsample(4)'``); '' (default): the images as read.
  """

  def __init__(self, ctx: EvalContext, splits: Sequence[str] = ("validation", "test"),
               calibration_bin_size: int = 100, ece_bins: int = 15, save: bool = False,
               per_class: bool = False, pp: str = ""):
    super().__init__(ctx)
    self.perturb, self.perturb_key = input_pp(pp, f"{ctx.where}.pp")
    self.save, self.per_class = bool(save), bool(per_class)
    if calibration_bin_size < 1 or ece_bins < 1:
      raise ValueError(f"{ctx.where}: calibration_bin_size and ece_bins must be >= 1.")
    self.bin_size, self.ece_bins = int(calibration_bin_size), int(ece_bins)
    name = ctx.data.name
    self.splits = {s: ctx.load(name, s, key="splits") for s in splits}

  def evaluate(self, state: Any, *, plots_dir: str | None = None, final: bool = False
               ) -> dict[str, float]:
    results: dict[str, float] = {}
    last = None
    for split, source in self.splits.items():
      out = self.ctx.predict(state, source, ("logits", "label"), perturb=self.perturb,
                             perturb_key=self.perturb_key)
      for k, v in summarize(out["logits"], out["label"], bin_size=self.bin_size,
                            ece_bins=self.ece_bins, per_class=self.per_class).items():
        results[f"{split}/{k}"] = v
      last = (split, out)
      if self.save and final:
        self.ctx.save(f"predictions_{split}", {"logits": out["logits"], "label": out["label"]})
    if plots_dir and last is not None and jax.process_index() == 0:
      from jaxrobust import plots
      split, out = last
      z = out["logits"] - out["logits"].max(-1, keepdims=True)
      probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
      plots.reliability_diagram(
          probs.max(-1), (probs.argmax(-1) == out["label"]).astype(np.float32),
          num_bins=self.ece_bins,
          title=(f"Reliability, {self.ctx.data.name}:{split} "
                 f"(ECE = {100 * results[f'{split}/ece']:.2f}%)"),
          path=os.path.join(plots_dir, f"reliability_{split}.png"))
    return results
