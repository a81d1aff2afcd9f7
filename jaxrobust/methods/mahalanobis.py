"""Mahalanobis OOD score (Lee, Lee, Lee, Shin, NeurIPS 2018).

Fit: the class means ``μ_c`` of the penultimate features of the training set
(eval mode, no augmentation) and one *tied* covariance
``Σ = (1/N) Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ``, whose precision ``P`` is its
pseudo-inverse -- ``sklearn.covariance.EmpiricalCovariance`` on the
class-centred features, as ``pokaxpoka/deep_Mahalanobis_detector``
(``lib_generation.sample_estimator``) and ``wetliu/energy_ood`` do. The fit
streams the training set twice, sharded: class sums and counts, then the
scatter of the class-centred features, each computed per batch on the devices
(float32, centred, so no cancellation) and summed on the host in float64.
Nothing per example is kept.

Score (higher = more in-distribution):

    score(x) = max_c −½ (f(x) − μ_c)ᵀ P (f(x) − μ_c)  = −½ min_c d²_M(f(x), μ_c),

the reference's value (``get_Mahalanobis_score``); the issue's "−min_c
distance" ranks identically.

Optional input pre-processing with ``epsilon`` (the reference's
``--noise``/``magnitude``): ``x̃ = x − ε · sign(∇ₓ ½ d²_M(f(x), μ_ĉ))`` with ĉ the
closest class on the clean input, then the score of ``x̃``; in pixel units as
ODIN's (:mod:`jaxrobust.methods.odin`); zero gradients count as +1, no clipping.
Tune ε with the ``tune_score`` task (the reference's grid
{0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01}).

Departures: only the penultimate layer (OpenOOD's ``mds``; ``energy_ood`` also
uses the last layer); the reference's feature ensemble over several layers
with a logistic-regression combiner is not implemented. A class without any
training example is an error; a singular covariance is handled by the
pseudo-inverse (as sklearn) and ``ridge`` > 0 adds ``ridge · I`` to Σ first.

Public API: :func:`fit` (from features), :func:`fit_streaming` (from a
FitContext), :func:`score`; registered score ``mahalanobis(epsilon=0, ridge=0)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import attacks
from jaxrobust.registry import RegistryError
from jaxrobust.scores import SCORES, ScoreMethod, check_epsilon

Array = jax.Array
EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def class_means(sums: np.ndarray, counts: np.ndarray, where: str) -> np.ndarray:
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise RegistryError(f"{where}: Mahalanobis needs training examples of every class; classes "
                        f"{empty.tolist()[:10]} have none.")
  return sums / counts[:, None]


def precision_of(scatter: np.ndarray, n: float, ridge: float) -> np.ndarray:
  """Pseudo-inverse of the tied covariance ``scatter / n (+ ridge · I)``."""
  cov = scatter / n
  cov = (cov + cov.T) / 2 + ridge * np.eye(len(cov))
  return np.linalg.pinv(cov, hermitian=True)


def fit(features: Array, labels: Array, num_classes: int, mask: Array | None = None, *,
        ridge: float = 0.0) -> dict[str, np.ndarray]:
  """Class means ``[K, D]`` and the tied precision ``[D, D]`` from features
  ``[N, D]`` and labels ``[N]`` (rows where ``mask`` is false are left out)."""
  f = np.asarray(features, np.float64)
  y = np.asarray(labels)
  keep = np.ones(len(y), bool) if mask is None else np.asarray(mask, bool)
  f, y = f[keep], y[keep]
  onehot = np.eye(num_classes)[y]
  means = class_means(onehot.T @ f, onehot.sum(0), "mahalanobis.fit")
  centred = f - means[y]
  return {"means": means.astype(np.float32),
          "precision": precision_of(centred.T @ centred, len(y), ridge).astype(np.float32)}


def _valid(labels: Array, mask: Array) -> Array:
  return (mask & (labels >= 0)).astype(jnp.float32)


def _sums(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any = None
          ) -> dict[str, Array]:
  del args
  f = outputs["features"].astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, outputs["logits"].shape[-1]) * _valid(labels, mask)[:, None]
  return {"sums": onehot.T @ f, "counts": onehot.sum(0)}


def _scatter(outputs: Mapping[str, Array], labels: Array, mask: Array, means: Array
             ) -> dict[str, Array]:
  f = outputs["features"].astype(jnp.float32)
  centred = (f - means[jnp.clip(labels, 0, means.shape[0] - 1)]) * _valid(labels, mask)[:, None]
  return {"scatter": centred.T @ centred}


def fit_streaming(ctx: Any, *, ridge: float = 0.0) -> dict[str, np.ndarray]:
  """:func:`fit` over the task's training split, streamed twice (``ctx``:
  :class:`jaxrobust.evaluators.FitContext`)."""
  source = ctx.train_source()
  total = ctx.reduce(source, _sums, key="mahalanobis/sums")
  means = class_means(total["sums"], total["counts"], ctx.where).astype(np.float32)
  scatter = ctx.reduce(source, _scatter, key="mahalanobis/scatter", args=means)["scatter"]
  return {"means": means,
          "precision": precision_of(scatter, total["counts"].sum(), ridge).astype(np.float32)}


def distances(features: Array, stats: Mapping[str, Array]) -> Array:
  """Squared Mahalanobis distances ``[B, K]`` to every class mean."""
  f = features.astype(jnp.float32)
  mu, p = jnp.asarray(stats["means"]), jnp.asarray(stats["precision"])
  fp = f @ p
  return (jnp.sum(fp * f, -1)[:, None] - 2 * fp @ mu.T + jnp.sum((mu @ p) * mu, -1)[None, :])


def score(features: Array, stats: Mapping[str, Array]) -> Array:
  """``max_c −½ d²_M(f, μ_c)`` per example (higher = more in-distribution)."""
  return -0.5 * jnp.min(distances(features, stats), -1)


@SCORES.register("mahalanobis")
def mahalanobis(epsilon: float = 0.0, ridge: float = 0.0) -> ScoreMethod:
  """Mahalanobis score on penultimate features, fitted on the task's
  training split at every evaluation; ``epsilon`` > 0 adds the input
  pre-processing."""
  check_epsilon(epsilon)
  if ridge < 0:
    raise RegistryError(f"ridge must be >= 0, got {ridge!r}.")

  def perturb(ctx: attacks.PerturbContext) -> Array:
    stats = ctx.fitted
    closest = jnp.argmin(distances(ctx.outputs_fn(ctx.x)["features"], stats), -1)

    def loss(z):
      d = distances(ctx.outputs_fn(z)["features"], stats)
      return 0.5 * jnp.sum(jnp.take_along_axis(d, closest[:, None], -1))
    return jax.lax.stop_gradient(attacks.sign_step(ctx.x, jax.grad(loss)(ctx.x), epsilon))

  return ScoreMethod(
      "mahalanobis", lambda outputs, stats: score(outputs["features"], stats),
      perturb=perturb if epsilon > 0 else None,
      fit=lambda ctx: fit_streaming(ctx, ridge=ridge), fit_key=f"mahalanobis(ridge={ridge})")
