"""Noisy Student pseudo-labels (Xie et al., CVPR 2020): filtering and
class balancing of a teacher's predictions.

Reference: ``google-research/noisystudent``, ``filter_unlabel.py`` with
``--min_threshold=0.3`` and ``--num_image`` per class. The teacher's
predictions (un-augmented images, eval mode) give each unlabeled image a class
(argmax) and a confidence (its probability). Images below the threshold are
dropped; then every class is brought to ``num_per_class`` images: a class with
more keeps its most confident ones, a class with fewer duplicates its images.
Labels are hard (class ids; the reference's default ``teacher_softmax_temp=-1``)
or soft (softmax at temperature T of the teacher's logits, which is what the
released ImageNet/SVHN scripts use with T = 1).

Departures from ``filter_unlabel.py`` (stated so results can be compared):

* The reference picks, per class, a confidence threshold from a grid and
  keeps every image above it with ``num_image / count`` copies, rounded
  stochastically (``np.random``), so a class gets ``num_image`` images only in
  expectation. Here a long class keeps exactly its ``num_per_class`` most
  confident images (ties broken by index), and a short class gives every image
  ``⌊N / count⌋`` copies and one more copy to its ``N mod count`` most
  confident images: exactly ``N`` per class, deterministic.
* A class with no image above the threshold contributes nothing (the
  reference does the same); :func:`selection_stats` lists it in
  ``empty_classes``.

This module is the pure selection; the stage that runs the teacher and the
student's label source build on it (issue 9, in progress).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxrobust.registry import RegistryError

THRESHOLD = 0.3  # filter_unlabel.sh --min_threshold


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def select_pseudo_labels(probs: Any, *, threshold: float = THRESHOLD, num_per_class: int,
                         hard: bool = True, temperature: float = 1.0, logits: Any = None,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Filtered, class-balanced pseudo-labels from a teacher's predictions.

  Args:
    probs: ``[N, K]`` teacher probabilities of the unlabeled images (rows sum
      to 1); they decide the class, the confidence and the filtering.
    threshold: drop images whose top probability is below it (0.3).
    num_per_class: images per class after balancing (``--num_image``).
    hard: class ids as labels; else soft rows: ``softmax(logits / T)`` when
      ``logits`` are given, else ``probs`` sharpened or flattened as
      ``probs^(1/T)`` renormalised (the same thing for a softmax teacher).
    temperature: T of the soft labels (> 0).
    logits: the teacher's ``[N, K]`` logits, for soft labels.
    seed: shuffles the returned order (the selection itself is deterministic).

  Returns:
    ``(indices, labels)``: ``indices`` into the unlabeled set (repeats for
    duplicated images), ``labels`` int32 ``[M]`` (hard) or float32 ``[M, K]``
    (soft). :func:`selection_stats` summarises a selection per class.
  """
  p = np.asarray(probs, np.float64)
  if p.ndim != 2:
    raise RegistryError(f"select_pseudo_labels: probs must be [N, K], got shape {p.shape}.")
  if np.any(p < -1e-6) or not np.allclose(p.sum(1), 1.0, atol=1e-3):
    raise RegistryError("select_pseudo_labels: probs rows must be >= 0 and sum to 1 (pass "
                        "softmax probabilities, not logits).")
  if not 0.0 <= threshold <= 1.0:
    raise RegistryError(f"select_pseudo_labels: threshold must be in [0, 1], got {threshold}.")
  if int(num_per_class) < 1:
    raise RegistryError(f"select_pseudo_labels: num_per_class must be >= 1, got "
                        f"{num_per_class}.")
  if not temperature > 0:
    raise RegistryError(f"select_pseudo_labels: temperature must be > 0, got {temperature}.")
  n_total, k = p.shape
  cls, conf = p.argmax(1), p.max(1)
  chosen = []
  for c in range(k):
    idx = np.flatnonzero((cls == c) & (conf >= threshold))
    idx = idx[np.lexsort((idx, -conf[idx]))]  # most confident first, ties by index
    if len(idx) >= num_per_class:
      chosen.append(idx[:num_per_class])
    elif len(idx):
      reps, extra = divmod(int(num_per_class), len(idx))
      chosen.append(np.concatenate([np.repeat(idx, reps), idx[:extra]]))
  indices = (np.concatenate(chosen) if chosen else np.zeros(0, np.int64)).astype(np.int64)
  indices = indices[np.random.default_rng(seed).permutation(len(indices))]
  if hard:
    labels = cls[indices].astype(np.int32)
  else:
    soft = (_softmax(np.asarray(logits), temperature) if logits is not None
            else _softmax(np.log(np.clip(p, 1e-30, None)), temperature))
    if soft.shape != (n_total, k):
      raise RegistryError(f"select_pseudo_labels: logits have shape {soft.shape}; probs have "
                          f"{(n_total, k)}.")
    labels = soft[indices].astype(np.float32)
  return indices, labels


def selection_stats(probs: Any, indices: np.ndarray) -> dict[str, Any]:
  """Per class (the teacher's argmax): ``distinct`` images kept, ``count``
  after balancing (with duplicates), their ``mean_confidence`` (NaN when
  none), and the ``empty_classes``."""
  p = np.asarray(probs, np.float64)
  k = p.shape[1]
  cls, conf = p.argmax(1)[indices], p.max(1)[indices]
  count = np.bincount(cls, minlength=k)
  distinct = np.bincount(p.argmax(1)[np.unique(indices)], minlength=k)
  sums = np.bincount(cls, weights=conf, minlength=k)
  mean = np.where(count > 0, sums / np.maximum(count, 1), np.nan)
  return {"distinct": distinct.tolist(), "count": count.tolist(),
          "mean_confidence": mean.tolist(),
          "empty_classes": np.flatnonzero(count == 0).tolist(), "num_examples": int(len(indices))}
