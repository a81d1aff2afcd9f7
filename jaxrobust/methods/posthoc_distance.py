"""Post-hoc detectors on distances and subspaces of the penultimate features:
ViM, Residual, KNN, relative Mahalanobis, SHE, NNGuide, fDBD.

Pure, jittable scores of the features ``[B, D]`` and the linear head
(``logits = features @ kernel + bias``), higher = in-distribution, with
statistics fitted once on training features. Reference code followed, file by
file (OpenOOD v1.5 at 3c35632, ``openood/postprocessors/``; pytorch-ood 0.4,
``pytorch_ood/detector/``, whose scores are "higher = more OOD" and are
negated here):

* ViM (Wang et al. 2022) -- OpenOOD ``vim_postprocessor.py``: origin ``u =
  −pinv(Wᵀ) b`` (``W`` = PyTorch's weight = ``kernelᵀ``); covariance of ``f −
  u`` about the origin (``EmpiricalCovariance(assume_centered=True)``), its
  eigenvectors sorted by decreasing eigenvalue; the residual space is spanned
  by all but the first ``dim``; ``α = mean max-logit / mean ‖(f − u) R‖`` over
  the training rows; score ``logsumexp(logits) − α ‖(f − u) R‖``. Two streamed
  passes (the scatter, then the two means). ``dim`` None: ``D // 2`` (OpenOOD's
  256 for its 512-d ResNet-18; it uses 1000 for 2048-d ImageNet models).
  ``eigh`` replaces the reference's ``eig`` (the matrix is symmetric).
* Residual -- OpenOOD ``residual_postprocessor.py``: ``−‖(f − u) R‖``, same
  fit without α (one pass).
* KNN (Sun et al. 2022) -- pytorch-ood ``knn.py``: features normalised
  ``z / max(‖z‖, 1e-12)``; score = −(Euclidean distance to the ``k``-th
  nearest normalised training feature), ``k`` = 50. (OpenOOD's
  ``knn_postprocessor.py`` returns the *squared* distance, same ranking.) The
  bank is searched in chunks with ``lax.top_k``, a running top-k merged chunk
  by chunk, so no [queries × bank] matrix is materialised; candidates are
  ranked by ``‖q‖² + ‖b‖² − 2 q·b`` and the k found re-measured as ``‖q − b‖``
  (the expansion cancels for near neighbours).
* Relative Mahalanobis (Ren et al. 2021) -- OpenOOD ``rmds_postprocessor.py``:
  class means and a tied covariance (as :mod:`~jaxrobust.methods.mahalanobis`)
  plus one Gaussian of all training features (mean and covariance,
  ``EmpiricalCovariance``: scatter / N, pseudo-inverse); score ``max_c (−MD_c +
  MD_0)``, without the ½. (pytorch-ood's ``rmd.py`` leaves the background
  scatter undivided by N and adds 1e-6·I: another scale, not followed.)
  Streamed in two passes.
* SHE (Zhang et al. 2023) -- OpenOOD ``she_postprocessor.py`` (metric
  ``inner_product``): the mean feature of the training rows predicted
  correctly, per class; score ``⟨f, m_ŷ⟩`` with ŷ the predicted class. A class
  without a correct prediction is an error (pytorch-ood's ``she.py``; OpenOOD
  would take a NaN mean). Streamed.
* NNGuide (Park et al. 2023) -- pytorch-ood ``nnguide.py``: bank =
  ``normalize(z) · energy(z)`` of every training row (OpenOOD's
  ``nnguide_postprocessor.py`` subsamples 1%, ``alpha``, and uses k = 100);
  score ``energy(f) · mean of the k largest ⟨normalize(f), bank⟩``, ``k`` = 10.
  Same chunked search.
* fDBD (Liu & Qin 2024) -- pytorch-ood ``fdbd.py``: ``Σ_c |l_c − l_ŷ| /
  ‖W_c − W_ŷ‖`` over ``(K − 1) · max(‖f − μ_train‖, 1e-8)`` (the diagonal
  denominator is 1; its term is 0). OpenOOD's ``fdbd_postprocessor.py`` is the
  same without the constant ``1/(K − 1)``. ``μ_train`` is streamed.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.methods import mahalanobis
from jaxrobust.methods.posthoc_activation import feature_mean
from jaxrobust.methods.posthoc_base import (
    FitSource, as_float, check_dim, check_k, energy, logits_of, valid_rows)
from jaxrobust.registry import RegistryError

Array = jax.Array
BANK_CHUNK = 4096  # bank rows per search step
QUERY_CHUNK = 1024  # query rows per search step in the public score


# --- ViM and Residual ----------------------------------------------------------------

def vim_origin(kernel: Any, bias: Any) -> np.ndarray:
  """``u = −pinv(W) b`` with PyTorch's ``W = kernelᵀ`` ``[K, D]``."""
  w = np.asarray(kernel, np.float64).T
  return -(np.linalg.pinv(w) @ np.asarray(bias, np.float64))


def _origin_scatter(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any
                    ) -> dict[str, Array]:
  x = (as_float(outputs["features"]) - args["origin"]) * valid_rows(labels, mask)[:, None]
  return {"scatter": x.T @ x, "count": valid_rows(labels, mask).sum()}


def _vim_means(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any
               ) -> dict[str, Array]:
  f = as_float(outputs["features"])
  v = valid_rows(labels, mask)
  logits = logits_of(f, args["kernel"], args["bias"])
  residual = jnp.linalg.norm((f - args["origin"]) @ args["residual"], axis=-1)
  return {"max_logit": v @ jnp.max(logits, -1), "residual": v @ residual}


def residual_fit(source: FitSource, kernel: Array, bias: Array, *, dim: int | None = None,
                 alpha: bool = False) -> dict[str, np.ndarray]:
  d = int(np.shape(kernel)[0])
  dim = check_dim(dim, d, source.where)
  u = vim_origin(kernel, bias).astype(np.float32)
  total = source.reduce(_origin_scatter, key="posthoc/origin_scatter", args={"origin": u})
  source.empty(float(total.get("count", 0)))
  cov = total["scatter"] / total["count"]
  values, vectors = np.linalg.eigh((cov + cov.T) / 2)
  order = np.argsort(-values, kind="stable")
  state = {"origin": u, "residual": np.ascontiguousarray(vectors[:, order[dim:]], np.float32)}
  if alpha:
    means = source.reduce(_vim_means, key="posthoc/vim_means",
                          args={**state, "kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)})
    state["alpha"] = np.asarray(means["max_logit"] / means["residual"], np.float32)
  return state


def vim_fit(source: FitSource, kernel: Array, bias: Array, *, dim: int | None = None
            ) -> dict[str, np.ndarray]:
  return residual_fit(source, kernel, bias, dim=dim, alpha=True)


def _residual_norm(features: Array, state: Mapping[str, Array]) -> Array:
  x = as_float(features) - as_float(state["origin"])
  return jnp.linalg.norm(x @ as_float(state["residual"]), axis=-1)


def residual_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array, *,
                   dim: int | None = None) -> Array:
  del kernel, bias, dim  # the fitted residual space
  return -_residual_norm(features, state)


def vim_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array, *,
              dim: int | None = None) -> Array:
  del dim
  return (energy(logits_of(features, kernel, bias))
          - as_float(state["alpha"]) * _residual_norm(features, state))


# --- chunked nearest-neighbour search ------------------------------------------------

def normalize(x: Array) -> Array:
  """``x / max(‖x‖, 1e-12)`` per row (``torch.nn.functional.normalize``)."""
  x = as_float(x)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def to_bank(rows: np.ndarray, chunk: int = BANK_CHUNK) -> dict[str, np.ndarray]:
  """A search bank: ``rows`` ``[N, D]`` padded to ``[chunks, chunk, D]`` with
  ``valid`` ``[chunks, chunk]`` marking the real rows."""
  n, d = rows.shape
  c = max(1, min(chunk, n))
  m = -(-n // c)
  bank = np.zeros((m * c, d), np.float32)
  bank[:n] = rows
  valid = np.arange(m * c) < n
  return {"bank": bank.reshape(m, c, d), "valid": valid.reshape(m, c),
          "size": np.asarray(n, np.int32)}


def bank_size(state: Mapping[str, Any]) -> int:
  """Rows of a bank: exact when ``size`` is concrete, else the padded count."""
  size = state.get("size")
  if size is not None and not isinstance(size, jax.core.Tracer):
    return int(np.asarray(size))
  return int(np.prod(np.shape(state["valid"])))


def top_k_similarity(queries: Array, state: Mapping[str, Array], k: int, *,
                     squared_distance: bool = False) -> tuple[Array, Array]:
  """The ``k`` largest ``⟨q, b⟩`` (or ``−‖q − b‖²``) over the bank's rows and
  their flat row indices, ``[B, k]`` each in decreasing order, merged chunk by
  chunk."""
  q = as_float(queries)
  q_norm = jnp.sum(q * q, -1, keepdims=True)
  rows_per_chunk = state["bank"].shape[1]

  def step(carry, chunk):
    top, index = carry
    i, rows, valid = chunk
    s = q @ rows.T
    if squared_distance:
      s = 2 * s - q_norm - jnp.sum(rows * rows, -1)[None, :]
    s = jnp.where(valid[None, :], s, -jnp.inf)
    ids = jnp.broadcast_to(i * rows_per_chunk + jnp.arange(rows_per_chunk), s.shape)
    values, pos = jax.lax.top_k(jnp.concatenate([top, s], -1), k)
    return (values, jnp.take_along_axis(jnp.concatenate([index, ids], -1), pos, -1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype), jnp.zeros((q.shape[0], k), jnp.int32))
  chunks = jnp.arange(state["bank"].shape[0])
  (top, index), _ = jax.lax.scan(step, init, (chunks, as_float(state["bank"]), state["valid"]))
  return top, index


def kth_distance(queries: Array, state: Mapping[str, Array], k: int) -> Array:
  """Euclidean distance to the ``k``-th nearest bank row: found with the
  expanded ``‖q‖² + ‖b‖² − 2 q·b``, then recomputed as ``‖q − b‖`` for the k
  candidates (the expansion cancels for near neighbours)."""
  q = as_float(queries)
  _, index = top_k_similarity(q, state, k, squared_distance=True)
  bank = as_float(state["bank"]).reshape(-1, state["bank"].shape[-1])
  d = jnp.linalg.norm(q[:, None, :] - bank[index], axis=-1)
  return jnp.max(d, -1)


def in_query_chunks(fn, queries: Array, chunk: int = QUERY_CHUNK) -> Array:
  """``fn(queries)`` over ``chunk`` rows at a time (``lax.map``; padded)."""
  n = queries.shape[0]
  if n <= chunk:
    return fn(queries)
  m = -(-n // chunk)
  padded = jnp.zeros((m * chunk,) + queries.shape[1:], queries.dtype).at[:n].set(queries)
  out = jax.lax.map(fn, padded.reshape((m, chunk) + queries.shape[1:]))
  return out.reshape((m * chunk,) + out.shape[2:])[:n]


# --- KNN -----------------------------------------------------------------------------

def knn_fit(source: FitSource, kernel: Array, bias: Array, *, k: int = 50
            ) -> dict[str, np.ndarray]:
  del kernel, bias
  f = source.features()
  source.empty(len(f))
  check_k(k, len(f), source.where)
  return to_bank(np.asarray(normalize(f)))


def knn_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array, *,
              k: int = 50) -> Array:
  del kernel, bias
  return -kth_distance(normalize(features), state, k)


# --- NNGuide -------------------------------------------------------------------------

def nnguide_fit(source: FitSource, kernel: Array, bias: Array, *, k: int = 10
                ) -> dict[str, np.ndarray]:
  f = source.features()
  source.empty(len(f))
  check_k(k, len(f), source.where)
  guide = jax.jit(lambda z: normalize(z) * energy(logits_of(z, kernel, bias))[:, None])
  rows = np.concatenate([np.asarray(guide(f[i:i + 8192])) for i in range(0, len(f), 8192)])
  return to_bank(rows)


def nnguide_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array, *,
                  k: int = 10) -> Array:
  top, _ = top_k_similarity(normalize(features), state, k)
  return jnp.mean(top, -1) * energy(logits_of(features, kernel, bias))


# --- relative Mahalanobis ------------------------------------------------------------

def _class_sums(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any
                ) -> dict[str, Array]:
  f = as_float(outputs["features"])
  onehot = jax.nn.one_hot(labels, args["classes"].shape[0]) * valid_rows(labels, mask)[:, None]
  return {"sums": onehot.T @ f, "counts": onehot.sum(0)}


def _two_scatters(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any
                  ) -> dict[str, Array]:
  f = as_float(outputs["features"])
  v = valid_rows(labels, mask)[:, None]
  means = args["means"]
  within = (f - means[jnp.clip(labels, 0, means.shape[0] - 1)]) * v
  whole = (f - args["whole_mean"]) * v
  return {"within": within.T @ within, "whole": whole.T @ whole}


def relative_mahalanobis_fit(source: FitSource, kernel: Array, bias: Array
                             ) -> dict[str, np.ndarray]:
  del bias
  classes = jnp.zeros(np.shape(kernel)[1])
  total = source.reduce(_class_sums, key="posthoc/class_sums", args={"classes": classes})
  counts = total["counts"]
  source.empty(float(counts.sum()))
  try:
    means = mahalanobis.class_means(total["sums"], counts, source.where)
  except RegistryError as e:
    raise RegistryError(str(e).replace("Mahalanobis", "relative_mahalanobis")) from None
  n = counts.sum()
  whole_mean = total["sums"].sum(0) / n
  scatters = source.reduce(_two_scatters, key="posthoc/two_scatters",
                           args={"means": means.astype(np.float32),
                                 "whole_mean": whole_mean.astype(np.float32)})
  return {"means": means.astype(np.float32),
          "precision": mahalanobis.precision_of(scatters["within"], n, 0.0).astype(np.float32),
          "whole_mean": whole_mean.astype(np.float32),
          "whole_precision": mahalanobis.precision_of(scatters["whole"], n, 0.0
                                                      ).astype(np.float32)}


def relative_mahalanobis_score(features: Array, state: Mapping[str, Array], kernel: Array,
                               bias: Array) -> Array:
  del kernel, bias
  f = as_float(features)
  class_d = mahalanobis.distances(f, state)
  x = f - as_float(state["whole_mean"])
  whole_d = jnp.sum((x @ as_float(state["whole_precision"])) * x, -1)
  return jnp.max(whole_d[:, None] - class_d, -1)


# --- SHE -----------------------------------------------------------------------------

def _correct_sums(outputs: Mapping[str, Array], labels: Array, mask: Array, args: Any
                  ) -> dict[str, Array]:
  f = as_float(outputs["features"])
  logits = logits_of(f, args["kernel"], args["bias"])
  k = logits.shape[-1]
  right = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid_rows(labels, mask)
  onehot = jax.nn.one_hot(labels, k) * right[:, None]
  return {"sums": onehot.T @ f, "counts": onehot.sum(0), "rows": valid_rows(labels, mask).sum()}


def she_fit(source: FitSource, kernel: Array, bias: Array) -> dict[str, np.ndarray]:
  total = source.reduce(_correct_sums, key="posthoc/she",
                        args={"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)})
  source.empty(float(total.get("rows", 0)))
  empty = np.flatnonzero(total["counts"] == 0)
  if empty.size:
    raise RegistryError(f"{source.where}: SHE needs a correctly classified training row of "
                        f"every class; classes {empty.tolist()[:10]} have none.")
  return {"patterns": (total["sums"] / total["counts"][:, None]).astype(np.float32)}


def she_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array
              ) -> Array:
  f = as_float(features)
  pred = jnp.argmax(logits_of(f, kernel, bias), -1)
  return jnp.sum(f * as_float(state["patterns"])[pred], -1)


# --- fDBD ----------------------------------------------------------------------------

def fdbd_fit(source: FitSource, kernel: Array, bias: Array) -> dict[str, np.ndarray]:
  del bias
  mean = feature_mean(source, "posthoc/feature_mean")
  w = np.asarray(kernel, np.float64).T  # [K, D]
  sq = np.sum(w * w, -1)
  denom = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * w @ w.T, 0.0))
  np.fill_diagonal(denom, 1.0)
  return {"train_mean": mean.astype(np.float32), "denominators": denom.astype(np.float32)}


def fdbd_score(features: Array, state: Mapping[str, Array], kernel: Array, bias: Array
               ) -> Array:
  f = as_float(features)
  logits = logits_of(f, kernel, bias)
  pred = jnp.argmax(logits, -1)
  gaps = jnp.abs(logits - jnp.max(logits, -1, keepdims=True))
  boundary = jnp.sum(gaps / as_float(state["denominators"])[pred], -1)
  dist = jnp.maximum(jnp.linalg.norm(f - as_float(state["train_mean"]), axis=-1), 1e-8)
  return boundary / ((logits.shape[-1] - 1) * dist)
