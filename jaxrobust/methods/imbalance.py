"""Class imbalance (Hendrycks, Lee, Mazeika, ICML 2019, §4.3).

Hendrycks et al. make CIFAR imbalanced as Buda et al. (2018) do, with *step
imbalance*: a fraction ``μ`` (``minority_fraction``) of the classes are
minority classes, which keep ``1/ρ`` (``ratio``) of their training examples;
the other classes keep all of theirs, so ``ρ`` is the ratio of majority to
minority class sizes. They compare plain training, a cost-sensitive loss,
oversampling (and SMOTE) with pre-training, and report the test error on the
balanced test set. No code for this part was released; this module follows
the paper's description.

Hooks:

* index ``imbalanced(ratio=10, minority_fraction=0.5, seed=0)`` -- the
  imbalanced population (:func:`imbalanced_subset`): which classes are the
  minority is drawn with ``seed``, and which of their examples are kept too;
  every minority class keeps at least one example.
* label source ``class_weighted`` -- adds ``weight = N / (K · n_y)`` per
  example, counts ``n_c`` taken over the stream's population
  (:func:`class_weights`: scikit-learn's ``class_weight='balanced'``); with
  ``cross_entropy`` the loss is ``Σ w_{y_i} l_i / Σ w_{y_i}``, PyTorch's
  ``CrossEntropyLoss(weight=w)`` (the cost-sensitive baseline).
* oversampling is the existing ``class_balanced`` sampler (every class drawn
  equally often, with replacement; ``jaxrobust.data.streams``).

Departures: SMOTE interpolates raw pixels, which for images is rarely used
and not built here; the paper's grid of ``ρ`` and ``μ`` is left to the
caller (the embedded reproduction uses ``ρ = 10``, ``μ = 0.5``).
"""

from __future__ import annotations

import numpy as np

from jaxrobust.data.streams import INDEX, LABELS, LabelFn, StreamData
from jaxrobust.registry import RegistryError


def check_imbalance(ratio: float, minority_fraction: float, where: str = "") -> None:
  prefix = f"{where}: " if where else ""
  if not ratio >= 1:
    raise RegistryError(f"{prefix}ratio (ρ, majority/minority class size) must be >= 1, "
                        f"got {ratio!r}.")
  if not 0 <= minority_fraction <= 1:
    raise RegistryError(f"{prefix}minority_fraction (μ) must be in [0, 1], got "
                        f"{minority_fraction!r}.")


def imbalanced_subset(labels: np.ndarray, num_classes: int, *, ratio: float,
                      minority_fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted dataset indices of a step-imbalanced subset (Buda et al. 2018).

  ``round(μ · K)`` classes, drawn with ``seed``, keep ``max(1, ⌊n_c / ρ⌋)``
  of their ``n_c`` examples (also drawn with ``seed``); the rest keep all.
  """
  check_imbalance(ratio, minority_fraction)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  minority = rng.permutation(num_classes)[:int(round(minority_fraction * num_classes))]
  keep = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if c in minority and len(idx):
      idx = rng.permutation(idx)[:max(1, int(len(idx) // ratio))]
    keep.append(idx)
  return np.sort(np.concatenate(keep)).astype(np.int64)


def class_weights(counts: np.ndarray) -> np.ndarray:
  """``N / (K · n_c)`` per class (``sklearn.utils.class_weight`` 'balanced');
  0 for a class with no example."""
  counts = np.asarray(counts, np.float64)
  present = counts > 0
  out = np.zeros_like(counts)
  out[present] = counts.sum() / (present.sum() * counts[present])
  return out


@INDEX.register("imbalanced")
def imbalanced(data: StreamData, ratio: float = 10.0, minority_fraction: float = 0.5,
               seed: int = 0) -> np.ndarray:
  """The stream's split made step-imbalanced (:func:`imbalanced_subset`)."""
  check_imbalance(ratio, minority_fraction, f"{data.where}.index")
  if data.num_classes is None:
    raise RegistryError(f"{data.where}.index: imbalanced needs a labelled stream.")
  return imbalanced_subset(data.labels, data.num_classes, ratio=ratio,
                           minority_fraction=minority_fraction, seed=seed)


@LABELS.register("class_weighted")
def class_weighted(data: StreamData) -> LabelFn:
  """The dataset's labels plus ``weight = N / (K · n_y)``, counts over the
  stream's population (cost-sensitive training)."""
  if data.num_classes is None:
    raise RegistryError(f"{data.where}.labels: class_weighted needs a labelled stream.")
  population = data.population if data.population is not None else np.arange(
      data.num_examples)
  counts = np.bincount(data.labels[population], minlength=data.num_classes)
  w = class_weights(counts).astype(np.float32)
  return lambda idx, labels: {"label": labels, "weight": w[labels]}
