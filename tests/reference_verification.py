"""Loop-for-loop numpy port of insightface's LFW verification protocol
(``recognition/arcface_torch/eval/verification.py``: ``LFold``/``KFold``,
``calculate_roc``, ``calculate_accuracy``, ``calculate_val``,
``calculate_val_far``, ``evaluate``), without mxnet/torch/sklearn: sklearn's
unshuffled ``KFold`` is re-written (contiguous folds, the first ``n mod k``
one longer); the embeddings are given already L2-normalised.

``interp1d(far_train, thresholds, kind='slinear')`` raises on repeated FAR
values in current scipy ("Expect x to not have duplicates"; the reference was
written against a scipy that accepted them). The port keeps, of the thresholds
sharing a FAR value, the largest for values below the target and the smallest
for values at or above it -- the two ends of the interval the target falls in
after scipy's stable sort -- and then calls ``interp1d`` as the reference.
"""

from __future__ import annotations

import numpy as np
from scipy import interpolate


def kfold_split(n, n_splits):
  sizes = np.full(n_splits, n // n_splits, dtype=int)
  sizes[:n % n_splits] += 1
  indices = np.arange(n)
  current = 0
  for size in sizes:
    start, stop = current, current + size
    test = indices[start:stop]
    train = np.concatenate([indices[:start], indices[stop:]])
    yield train, test
    current = stop


def calculate_accuracy(threshold, dist, actual_issame):
  predict_issame = np.less(dist, threshold)
  tp = np.sum(np.logical_and(predict_issame, actual_issame))
  fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
  tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
  fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
  tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
  fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
  acc = float(tp + tn) / dist.size
  return tpr, fpr, acc


def calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
  nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
  nrof_thresholds = len(thresholds)
  accuracy = np.zeros((nrof_folds))
  indices = np.arange(nrof_pairs)
  diff = np.subtract(embeddings1, embeddings2)
  dist = np.sum(np.square(diff), 1)
  for fold_idx, (train_set, test_set) in enumerate(kfold_split(len(indices), nrof_folds)):
    acc_train = np.zeros((nrof_thresholds))
    for threshold_idx, threshold in enumerate(thresholds):
      _, _, acc_train[threshold_idx] = calculate_accuracy(
          threshold, dist[train_set], actual_issame[train_set])
    best_threshold_index = np.argmax(acc_train)
    _, _, accuracy[fold_idx] = calculate_accuracy(
        thresholds[best_threshold_index], dist[test_set], actual_issame[test_set])
  return accuracy


def calculate_val_far(threshold, dist, actual_issame):
  predict_issame = np.less(dist, threshold)
  true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
  false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
  n_same = np.sum(actual_issame)
  n_diff = np.sum(np.logical_not(actual_issame))
  return float(true_accept) / float(n_same), float(false_accept) / float(n_diff)


def calculate_val(thresholds, embeddings1, embeddings2, actual_issame, far_target,
                  nrof_folds=10):
  nrof_thresholds = len(thresholds)
  val = np.zeros(nrof_folds)
  far = np.zeros(nrof_folds)
  diff = np.subtract(embeddings1, embeddings2)
  dist = np.sum(np.square(diff), 1)
  for fold_idx, (train_set, test_set) in enumerate(kfold_split(len(dist), nrof_folds)):
    far_train = np.zeros(nrof_thresholds)
    for threshold_idx, threshold in enumerate(thresholds):
      _, far_train[threshold_idx] = calculate_val_far(
          threshold, dist[train_set], actual_issame[train_set])
    if np.max(far_train) >= far_target:
      below = far_train < far_target
      _, last = np.unique(far_train[below][::-1], return_index=True)
      xs_lo, ts_lo = far_train[below][::-1][last], thresholds[below][::-1][last]
      _, first = np.unique(far_train[~below], return_index=True)
      xs_hi, ts_hi = far_train[~below][first], thresholds[~below][first]
      f = interpolate.interp1d(np.concatenate([xs_lo, xs_hi]), np.concatenate([ts_lo, ts_hi]),
                               kind="slinear")
      threshold = f(far_target)
    else:
      threshold = 0.0
    val[fold_idx], far[fold_idx] = calculate_val_far(
        threshold, dist[test_set], actual_issame[test_set])
  return np.mean(val), np.std(val), np.mean(far)


def evaluate(embeddings1, embeddings2, actual_issame, nrof_folds=10):
  """``verification.evaluate`` on already-paired, normalised embeddings."""
  actual_issame = np.asarray(actual_issame)
  accuracy = calculate_roc(np.arange(0, 4, 0.01), embeddings1, embeddings2, actual_issame,
                           nrof_folds=nrof_folds)
  val, val_std, far = calculate_val(np.arange(0, 4, 0.001), embeddings1, embeddings2,
                                    actual_issame, 1e-3, nrof_folds=nrof_folds)
  return accuracy, val, val_std, far
