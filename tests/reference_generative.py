"""Plain numpy ports of the reference precision/recall definitions, for tests.

Written from the definitions, in float64 with full distance matrices (small
inputs only):

* Kynkäänniemi et al. 2019, kynkaat/improved-precision-and-recall-metric
  ``precision_recall.py``: radius = k-th smallest distance of a sample's row
  *including* its own zero distance (so the k-th other sample; duplicates
  count), membership ``d <= radius`` in some ball of the other set.
* Park & Kim 2023, kdst-team/Probablistic_precision_recall
  ``metric/pp_pr.py``: ``R = a * mean k-NN distance`` of a set, ``f = 1 - d /
  R`` where ``d < R`` and 0 elsewhere, P-precision = mean over fakes of
  ``1 - prod over reals (1 - f)``, P-recall symmetric with the fake radius.
"""

from __future__ import annotations

import numpy as np


def distances(a, b) -> np.ndarray:
  """(len(a), len(b)) Euclidean distances, from differences (no expansion)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def knn_distances(x, k: int) -> np.ndarray:
  """Distance from each row to its k-th nearest other row: position k of the
  sorted row of distances, the row's own 0 at position 0."""
  return np.partition(distances(x, x), k, axis=1)[:, k]


def improved_precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
  d = distances(real, fake)  # (N, M)
  radius_real, radius_fake = knn_distances(real, k), knn_distances(fake, k)
  precision = np.any(d <= radius_real[:, None], axis=0).mean()
  recall = np.any(d <= radius_fake[None, :], axis=1).mean()
  return float(precision), float(recall)


def probabilistic_precision_recall(real, fake, a: float = 1.2, k: int = 4
                                   ) -> tuple[float, float]:
  d = distances(real, fake)  # (N, M)

  def scoring_rule(radius):
    with np.errstate(divide="ignore", invalid="ignore"):
      f = 1.0 - d / radius
    f[d >= radius] = 0.0
    return f

  f_real = scoring_rule(a * knn_distances(real, k).mean())
  f_fake = scoring_rule(a * knn_distances(fake, k).mean())
  p_precision = np.mean(1.0 - np.prod(1.0 - f_real, axis=0))
  p_recall = np.mean(1.0 - np.prod(1.0 - f_fake, axis=1))
  return float(p_precision), float(p_recall)
