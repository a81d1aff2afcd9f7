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

The ``pseudo_label`` stage task runs a teacher checkpoint over an unlabeled
split (eval mode, no augmentation: ``jaxrobust.tasks.predict_outputs``),
selects with :func:`select_pseudo_labels` and writes two artifacts that a
student's stream reads without new code::

    streams.unlabeled = dict(data='...', split='...',
                             index='artifact:teacher_labels/indices',   # with repeats
                             labels='artifact:teacher_labels/labels')   # int[N] or soft [N, K]

``labels`` is indexed by dataset index (-1, or a uniform row when soft, for
images not selected). Student training with noise, the EfficientNet family and
K teacher→student rounds build on this (issue 9, in progress).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS, StageContext, predict_outputs

THRESHOLD = 0.3  # filter_unlabel.sh --min_threshold


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
    z = np.asarray(logits, np.float64) if logits is not None else np.log(np.clip(p, 1e-30, None))
    soft = special.softmax(z / temperature, axis=-1)
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


@TASKS.register("pseudo_label")
def pseudo_label(ctx: StageContext, *, checkpoint: str, data: str = "", split: str = "train",
                 threshold: float = THRESHOLD, num_per_class: int = 0, hard: bool = True,
                 temperature: float = 1.0, module: str = "classifier",
                 exclude: str = "") -> dict[str, float]:
  """The teacher ``checkpoint``'s pseudo-labels for ``data:split`` (see the
  module docstring); ``num_per_class`` 0: the candidates' number over K.
  ``exclude``: an index spec of the ``train`` stream (``'per_class(
  num_per_class=20)'``, evaluated with that stream's seed, so it names the
  same labelled images the teacher and students train on) whose images are
  not candidates -- Noisy Student's unlabelled data is disjoint from its
  labelled data. Results: the number selected, classes left empty, the mean
  confidence, and -- when the split has labels -- the pseudo-labels' accuracy
  against them."""
  where = f"config.stages.{ctx.name}"
  out = predict_outputs(ctx, checkpoint=checkpoint, data=data, split=split,
                        fields=("logits", "label"), module=module)
  logits = np.asarray(out["logits"], np.float64)
  n, k = logits.shape
  candidates = np.arange(n)
  if exclude:
    candidates = np.setdiff1d(candidates, _train_stream_index(ctx, exclude, data, split))
    if not len(candidates):
      raise RegistryError(f"{where}.exclude={exclude!r} leaves none of the {n} images of "
                          f"{data or ctx.config.data.name}:{split} to pseudo-label.")
  probs = special.softmax(logits[candidates], axis=-1)
  try:
    sub, labels = select_pseudo_labels(
        probs, threshold=threshold, num_per_class=num_per_class or max(len(candidates) // k, 1),
        hard=hard, temperature=temperature, logits=logits[candidates], seed=int(ctx.config.seed))
  except RegistryError as e:
    raise RegistryError(f"{where}: {e}") from None
  idx = candidates[sub]
  if len(idx) == 0:
    raise RegistryError(f"{where}: no image has a teacher confidence >= {threshold}; lower "
                        "`threshold`.")
  if hard:
    full = np.full(n, -1, np.int32)
  else:
    full = np.full((n, k), 1.0 / k, np.float32)
  full[idx] = labels
  ctx.artifacts.save("indices", idx)
  ctx.artifacts.save("labels", full)
  stats = selection_stats(probs, sub)
  ctx.artifacts.save("stats", stats)
  results = {"num_selected": float(len(idx)), "num_distinct": float(len(np.unique(idx))),
             "empty_classes": float(len(stats["empty_classes"])),
             "mean_confidence": float(np.nanmean(stats["mean_confidence"]))}
  true = np.asarray(out["label"])
  if true.min() >= 0:
    results["accuracy"] = float((logits.argmax(1)[idx] == true[idx]).mean())
  results["num_candidates"] = float(len(candidates))
  print(f"pseudo_label: {len(idx)} images ({results['num_distinct']:.0f} distinct) from "
        f"{len(candidates)} candidates of {n}, per class {stats['count']}", flush=True)
  return results


def _train_stream_index(ctx: StageContext, spec: str, data: str, split: str) -> np.ndarray:
  """The dataset indices an index spec gives the ``train`` stream of this
  stage's config (its seed), on ``data:split``."""
  from jaxrobust.build import stream_seed
  from jaxrobust.data import streams
  name = data or ctx.config.data.name
  stream = streams.StreamData(
      "train", ctx.data.load(name, split), ctx.data.spec(name).num_classes,
      stream_seed(ctx.config.seed, "train"), ctx.artifacts, f"{ctx.where}.exclude")
  return np.unique(streams.build_index(spec, stream))
