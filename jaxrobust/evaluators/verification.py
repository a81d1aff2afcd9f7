"""Face-verification protocol on pairs of images: LFW-style 10-fold accuracy
and TAR at a fixed FAR, on the penultimate embeddings.

Pairs: ``num_pairs`` seeded pairs of examples of one split, half of the same
class ("identity") and half of different classes, in a seeded random order
(so every fold holds both kinds), drawn from the split's labelled examples
(``data='dataset:split'``: identities held out of training, e.g.
``glyphs/lower:test`` for a model trained on ``glyphs/upper``). An embedding
is the module's penultimate ``features`` (eval mode, after the evaluator's
``pp`` chain, e.g. ``downsample(4)`` for a low-resolution student),
L2-normalised; a pair's distance is ``‖e₁ − e₂‖² = 2 − 2 cos(e₁, e₂)``, so
thresholding it is thresholding the cosine similarity.

Reference followed: insightface ``recognition/arcface_torch/eval/
verification.py`` (from David Sandberg's facenet ``lfw.py``):

* ``calculate_roc``: ``KFold(n_splits=10, shuffle=False)`` over the pairs (the
  first ``n mod 10`` folds one pair longer); per fold, the threshold of the
  grid ``np.arange(0, 4, 0.01)`` with the best accuracy on the other 9 folds
  (the first on ties, ``np.argmax``) gives the held-out fold's accuracy; a pair
  is called "same" when ``dist < threshold``. Reported: the mean and the
  (population, ``np.std``) std of the 10 fold accuracies.
* ``calculate_val``: per fold, the threshold for the target FAR on the 9
  training folds, interpolated on the grid ``np.arange(0, 4, 0.001)`` as
  ``interp1d(far_train, thresholds, kind='slinear')(far_target)`` (threshold 0
  when no grid threshold reaches the target FAR), then the TAR ("VAL") of the
  held-out fold at it; reported: the mean over folds. Current scipy rejects
  ``interp1d`` on repeated FAR values (the FAR of neighbouring thresholds
  often is the same); :func:`interpolate_threshold` interpolates between the
  last threshold below the target FAR and the first at or above it.

The threshold sweeps are vectorised (counts by ``searchsorted`` over the
sorted distances) and give the reference's counts exactly; the tests hold
them to a loop-for-loop numpy port (``tests/reference_verification.py``).

Departures: the reference's pairs are LFW's / AgeDB's fixed lists and its
embedding is the sum of the image's and its horizontal flip's (flip test);
here pairs are drawn from a labelled split and there is no flip (characters
are not mirror-symmetric). No PCA (the reference's ``pca=0`` default).

Result keys (``<name>`` = the ``prefix`` option, default the split):
``<name>/verification_accuracy``, ``<name>/verification_accuracy_std``,
``<name>/tar_at_far_<far>`` (``tar_at_far_1e-3``), ``<name>/num_pairs``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxrobust.evaluators import EVALUATORS, EvalContext, Evaluator, parse_set
from jaxrobust.evaluators.classification import input_pp

NUM_PAIRS = 3000  # LFW: 6,000 pairs, 3,000 of each kind
NUM_FOLDS = 10
FAR = 1e-3
ROC_THRESHOLDS = np.arange(0, 4, 0.01)  # verification.evaluate
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


# --- pairs -------------------------------------------------------------------------------------

def make_pairs(labels: np.ndarray, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(pairs [P, 2], issame [P])``: ``⌈P/2⌉`` same-class and ``⌊P/2⌋``
  different-class pairs of distinct examples with labels ``>= 0``, drawn with
  ``np.random.default_rng(seed)`` and shuffled together."""
  labels = np.asarray(labels)
  valid = np.flatnonzero(labels >= 0)
  classes, counts = np.unique(labels[valid], return_counts=True)
  if len(classes) < 2 or not np.any(counts >= 2):
    raise ValueError(f"verification pairs need >= 2 classes and a class with >= 2 examples; "
                     f"got {len(classes)} classes, largest {counts.max() if len(counts) else 0}.")
  rng = np.random.default_rng(seed)
  n_same, n_diff = (num_pairs + 1) // 2, num_pairs // 2
  # Same: a random example of a class with >= 2 examples, then another of its class.
  members = {c: valid[labels[valid] == c] for c in classes}
  eligible = valid[np.isin(labels[valid], classes[counts >= 2])]
  first = rng.choice(eligible, n_same)
  second = np.empty_like(first)
  for k, i in enumerate(first):
    pool = members[labels[i]]
    j = pool[rng.integers(len(pool) - 1)]
    second[k] = j if j != i else pool[-1]  # uniform over the class without i
  # Different: a random example, then a random example of another class.
  a = rng.choice(valid, n_diff)
  b = np.empty_like(a)
  for k, i in enumerate(a):
    while True:
      j = valid[rng.integers(len(valid))]
      if labels[j] != labels[i]:
        b[k] = j
        break
  pairs = np.concatenate([np.stack([first, second], 1), np.stack([a, b], 1)])
  issame = np.concatenate([np.ones(n_same, bool), np.zeros(n_diff, bool)])
  order = rng.permutation(len(pairs))
  return pairs[order].astype(np.int64), issame[order]


def pair_distances(features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  """Squared distance of the L2-normalised embeddings of each pair (``2 − 2 cos``)."""
  f = np.asarray(features, np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # sklearn normalize
  return np.sum((f[pairs[:, 0]] - f[pairs[:, 1]]) ** 2, axis=1)


# --- the reference's protocol, vectorised --------------------------------------------------

def kfold(n: int, num_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """sklearn ``KFold(n_splits, shuffle=False).split``: contiguous folds, the
  first ``n mod k`` one longer."""
  if num_folds < 2 or n < num_folds:
    raise ValueError(f"{num_folds}-fold verification needs >= {num_folds} pairs and >= 2 folds; "
                     f"got {n} pairs.")
  sizes = np.full(num_folds, n // num_folds)
  sizes[:n % num_folds] += 1
  idx = np.arange(n)
  out, start = [], 0
  for s in sizes:
    test = idx[start:start + s]
    out.append((np.concatenate([idx[:start], idx[start + s:]]), test))
    start += s
  return out


def _counts(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  """(true accepts, false accepts) at every threshold (``dist < threshold``)."""
  same = np.sort(dist[issame])
  diff = np.sort(dist[~issame])
  return (np.searchsorted(same, thresholds, side="left"),
          np.searchsorted(diff, thresholds, side="left"))


def roc_accuracy(dist: np.ndarray, issame: np.ndarray, *, num_folds: int = NUM_FOLDS,
                 thresholds: np.ndarray = ROC_THRESHOLDS) -> np.ndarray:
  """Per-fold held-out accuracies of ``calculate_roc``."""
  issame = np.asarray(issame, bool)
  acc = np.zeros(num_folds)
  for f, (train, test) in enumerate(kfold(len(dist), num_folds)):
    tp, fp = _counts(thresholds, dist[train], issame[train])
    n_diff = np.sum(~issame[train])
    train_acc = (tp + (n_diff - fp)) / len(train)
    best = thresholds[int(np.argmax(train_acc))]
    pred = dist[test] < best
    acc[f] = np.mean(pred == issame[test])
  return acc


def tar_at_far(dist: np.ndarray, issame: np.ndarray, *, far_target: float = FAR,
               num_folds: int = NUM_FOLDS, thresholds: np.ndarray = VAL_THRESHOLDS
               ) -> tuple[float, float, float]:
  """``calculate_val``: (mean TAR, its std, mean FAR) over the held-out folds."""
  issame = np.asarray(issame, bool)
  val, far = np.zeros(num_folds), np.zeros(num_folds)
  for f, (train, test) in enumerate(kfold(len(dist), num_folds)):
    _, fa = _counts(thresholds, dist[train], issame[train])
    n_diff = np.sum(~issame[train])
    if n_diff == 0:
      raise ValueError("a verification fold has no different-identity pair; draw more pairs.")
    far_train = fa / float(n_diff)
    threshold = interpolate_threshold(far_train, thresholds, far_target)
    pred = dist[test] < threshold
    same, n_same_test = issame[test], np.sum(issame[test])
    if n_same_test == 0 or n_same_test == len(test):
      raise ValueError("a verification fold has pairs of one kind only; draw more pairs.")
    val[f] = np.sum(pred & same) / n_same_test
    far[f] = np.sum(pred & ~same) / np.sum(~same)
  return float(val.mean()), float(val.std()), float(far.mean())


def interpolate_threshold(far_train: np.ndarray, thresholds: np.ndarray, far_target: float
                          ) -> float:
  """The reference's ``interp1d(far_train, thresholds, kind='slinear')(far_target)``
  (0 when no threshold reaches the target FAR). FAR is non-decreasing in the
  threshold and repeats values, which current scipy's ``interp1d`` rejects; the
  line runs from the last threshold with FAR below the target to the first
  with FAR at or above it (the interval holding the target after scipy's
  stable sort)."""
  if np.max(far_train) < far_target:
    return 0.0
  hi = int(np.searchsorted(far_train, far_target, side="left"))
  if hi == 0 or far_train[hi] == far_target:
    return float(thresholds[hi])
  x0, x1, t0, t1 = far_train[hi - 1], far_train[hi], thresholds[hi - 1], thresholds[hi]
  return float(t0 + (far_target - x0) * (t1 - t0) / (x1 - x0))


def far_name(far: float) -> str:
  """``1e-3`` -> ``'1e-3'``; other values as ``%g``."""
  k = round(-math.log10(far)) if far > 0 else 0
  return f"1e-{k}" if far > 0 and math.isclose(far, 10.0 ** -k) else f"{far:g}"


def verification_metrics(dist: np.ndarray, issame: np.ndarray, *, num_folds: int = NUM_FOLDS,
                         far: float = FAR) -> dict[str, float]:
  """Accuracy (mean, std over folds) and TAR at ``far`` of pair distances."""
  acc = roc_accuracy(dist, issame, num_folds=num_folds)
  tar, _, far_got = tar_at_far(dist, issame, far_target=far, num_folds=num_folds)
  return {"verification_accuracy": float(acc.mean()),
          "verification_accuracy_std": float(acc.std()),
          f"tar_at_far_{far_name(far)}": tar, f"far_at_far_{far_name(far)}": far_got}


@EVALUATORS.register("verification")
class Verification(Evaluator):
  """Verification accuracy (10-fold, as LFW) and TAR at FAR on image pairs.

  Args:
    data: ``'dataset:split'`` whose classes are the identities (held out of
      training); empty: the task's dataset, split ``split``.
    split: the split when ``data`` is empty.
    num_pairs: pairs drawn (half same-identity); LFW has 6,000.
    num_folds: folds of the threshold selection (10).
    far: the target false-accept rate of the TAR (1e-3).
    pp: a deterministic pp chain applied to the images before the module
      (``'downsample(4)'``: the low-resolution protocol).
    seed: the pairs' seed (default the run's seed: every stage of a recipe
      verifies on the same pairs).
    prefix: the result-key prefix (default the split).
  """

  def __init__(self, ctx: EvalContext, data: str = "", split: str = "test",
               num_pairs: int = NUM_PAIRS, num_folds: int = NUM_FOLDS, far: float = FAR,
               pp: str = "", seed: int | None = None, prefix: str = ""):
    super().__init__(ctx)
    if data:
      dataset, split = parse_set(data, f"{ctx.where}.data")
    else:
      dataset = ctx.data.name
    if isinstance(num_folds, bool) or int(num_folds) != num_folds or num_folds < 2:
      raise ValueError(f"{ctx.where}.num_folds must be an integer >= 2, got {num_folds!r}.")
    if isinstance(num_pairs, bool) or int(num_pairs) != num_pairs or num_pairs < 2 * num_folds:
      raise ValueError(f"{ctx.where}.num_pairs must be an integer >= 2 x num_folds "
                       f"({2 * num_folds}), got {num_pairs!r}.")
    if not 0 < far < 1:
      raise ValueError(f"{ctx.where}.far must be in (0, 1), got {far!r}.")
    self.num_folds, self.far = int(num_folds), float(far)
    self.source = ctx.load(dataset, split, key="data")
    self.prefix = prefix or split
    self.perturb, self.perturb_key = input_pp(pp, f"{ctx.where}.pp")
    from jaxrobust.data import pipeline
    labels = pipeline.all_labels(self.source)
    try:
      self.pairs, self.issame = make_pairs(labels, int(num_pairs),
                                           ctx.data.seed if seed is None else int(seed))
    except ValueError as e:
      raise ValueError(f"{ctx.where}.data ({dataset}:{split}): {e}") from None

  def evaluate(self, state: Any, *, plots_dir: str | None = None, final: bool = False
               ) -> dict[str, float]:
    del plots_dir, final
    out = self.ctx.predict(state, self.source, ("features",), perturb=self.perturb,
                           perturb_key=self.perturb_key)
    dist = pair_distances(out["features"], self.pairs)
    metrics = verification_metrics(dist, self.issame, num_folds=self.num_folds, far=self.far)
    metrics["num_pairs"] = float(len(self.pairs))
    return {f"{self.prefix}/{k}": v for k, v in metrics.items()}
