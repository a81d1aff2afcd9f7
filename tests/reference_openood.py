"""A numpy port of OpenOOD v1.5's ``compute_all_metrics`` (the test oracle).

Jingkang50/OpenOOD ``openood/evaluators/metrics.py``: ``conf`` is higher =
more in-distribution, ``label`` is the class of an ID example and -1 for an
OOD one. **OOD is the positive class**: the ROC curve is
``roc_curve(ood_indicator, -conf)``, FPR@95 is ``fpr[argmax(tpr >= 0.95)]``
(the first ROC point whose TPR reaches 0.95: the fraction of ID examples
flagged), AUROC the trapezoid under that curve, AUPR-in the trapezoid under
``precision_recall_curve(ID indicator, conf)``, AUPR-out under
``precision_recall_curve(ood_indicator, -conf)``, accuracy the top-1
accuracy over the ID examples. The sklearn functions are ported here
(``_binary_clf_curve``, ``roc_curve`` with ``drop_intermediate=True``,
``precision_recall_curve`` of sklearn >= 1.1, ``auc``) so the oracle does not
depend on sklearn's version. Values are fractions (OpenOOD prints ×100).
"""

from __future__ import annotations

import numpy as np


def binary_clf_curve(y_true: np.ndarray, y_score: np.ndarray):
  """sklearn ``_binary_clf_curve``: (fps, tps, thresholds) at each distinct
  score, scores descending; tied scores enter together."""
  y_true = np.asarray(y_true, dtype=bool)
  y_score = np.asarray(y_score, dtype=np.float64)
  order = np.argsort(y_score, kind="mergesort")[::-1]
  y_score, y_true = y_score[order], y_true[order]
  distinct = np.where(np.diff(y_score))[0]
  idx = np.r_[distinct, y_true.size - 1]
  tps = np.cumsum(y_true)[idx].astype(np.float64)
  fps = 1 + idx - tps
  return fps, tps, y_score[idx]


def roc_curve(y_true, y_score):
  """sklearn ``roc_curve(drop_intermediate=True)``: (fpr, tpr, thresholds)."""
  fps, tps, thresholds = binary_clf_curve(y_true, y_score)
  if len(fps) > 2:
    keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  tps, fps = np.r_[0, tps], np.r_[0, fps]
  thresholds = np.r_[np.inf, thresholds]
  return fps / fps[-1], tps / tps[-1], thresholds


def precision_recall_curve(y_true, y_score):
  """sklearn (>= 1.1) ``precision_recall_curve``: (precision, recall,
  thresholds), recall decreasing, ending at (recall 0, precision 1)."""
  fps, tps, thresholds = binary_clf_curve(y_true, y_score)
  ps = tps + fps
  precision = np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0)
  recall = np.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
  return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def auc(x, y) -> float:
  """sklearn ``auc``: the trapezoidal rule, x monotonic either way."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  dx = np.diff(x)
  direction = -1.0 if np.all(dx <= 0) else 1.0
  return float(direction * np.sum(dx * (y[1:] + y[:-1]) / 2.0))


def compute_all_metrics(conf, label, pred, recall: float = 0.95) -> list[float]:
  """``[fpr, auroc, aupr_in, aupr_out, accuracy]`` as OpenOOD returns them."""
  conf, label, pred = np.asarray(conf, np.float64), np.asarray(label), np.asarray(pred)
  ood = (label == -1).astype(np.int64)
  fpr_list, tpr_list, _ = roc_curve(ood, -conf)
  fpr = float(fpr_list[np.argmax(tpr_list >= recall)])
  p_in, r_in, _ = precision_recall_curve(1 - ood, conf)
  p_out, r_out, _ = precision_recall_curve(ood, -conf)
  auroc = auc(fpr_list, tpr_list)
  aupr_in, aupr_out = auc(r_in, p_in), auc(r_out, p_out)
  accuracy = float(np.mean(pred[label != -1] == label[label != -1]))
  return [fpr, auroc, aupr_in, aupr_out, accuracy]


def openood_metrics(in_scores, out_scores) -> dict[str, float]:
  """The four OOD metrics of one ID/OOD pair, by OpenOOD's result names
  (``fpr95`` is FPR@95TPR with OOD positive)."""
  conf = np.r_[np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)]
  label = np.r_[np.zeros(len(in_scores), np.int64), -np.ones(len(out_scores), np.int64)]
  fpr, auroc, aupr_in, aupr_out, _ = compute_all_metrics(conf, label, np.zeros_like(label))
  return {"fpr95": fpr, "auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out}
