"""DFR: Deep Feature Reweighting (Kirichenko, Izmailov, Wilson, ICLR 2023,
"Last Layer Re-Training is Sufficient for Robustness to Spurious
Correlations") -- the numerical core.

The reference is ``PolinaKirichenko/deep_feature_reweighting``,
``dfr_evaluate_spurious.py`` (functions ``dfr_on_validation_tune``,
``dfr_on_validation_eval``, ``dfr_train_subset_tune``,
``dfr_train_subset_eval``). Its classifier is scikit-learn's
``LogisticRegression(penalty='l1', solver='liblinear', C=C, class_weight=...)``
on ``StandardScaler``-ed penultimate embeddings (ResNet-50 avgpool, 2048-d,
extracted without augmentation).

The L1 logistic regression (:func:`logistic_regression_l1`) minimises
liblinear's objective, including its intercept: liblinear appends a constant
feature equal to ``intercept_scaling`` (= 1) to every example, and the weight of
that feature -- the intercept -- is penalised like every other weight (the
scikit-learn docstring of ``intercept_scaling``: "The synthetic feature weight
is subject to L1 or L2 regularization as all other features"). With labels
``y ∈ {0, 1}`` mapped to ``ỹ = 2y − 1`` (``coef_`` belongs to class 1) and the
per-example weight ``s_i`` (``sample_weight`` times ``class_weight[y_i]``;
liblinear's per-instance ``C_i = C s_i``)::

    F(w, b) = ||w||_1 + |b| + C Σ_i s_i log(1 + exp(−ỹ_i (w·x_i + b))).

Prediction is class 1 iff ``w·x + b > 0`` (scikit-learn's ``predict``).

Departure: liblinear minimises F by newGLMNET (coordinate descent on a
quadratic model, outer Newton iterations); here it is FISTA (accelerated
proximal gradient) in the diagonal metric of the columns' weighted second
moments (per-feature steps; the soft threshold stays separable), with a
backtracking step that also grows 10% after each accepted step (so the local
rather than the global curvature sets it; Scheinberg, Goldfarb & Bai's
momentum for varying steps) and gradient-based adaptive restart (O'Donoghue &
Candès), in a ``lax.while_loop``. It stops on a certified duality gap: every
``GAP_EVERY`` steps the dual point ``u_i = C s_i σ(−m_i)`` (``m_i = ỹ_i z_i``)
is scaled into the feasible set ``||Σ_i u_i ỹ_i x̃_i||_∞ ≤ 1`` and the fit
stops when ``F(w, b) − max D(u) ≤ tol · F(w, b)`` (the best dual value seen so
far), which bounds the objective's relative excess over the optimum by
``tol``. The minimiser is the same; the iterates are not, so ``max_iter``
(proximal steps) does not mean what liblinear's does (outer Newton
iterations): the DFR fits here run to ``tol``, including the tuning fits of
DFR^Tr_Tr, where the reference caps liblinear at ``max_iter=20``; a DFR fit
that stops at ``max_iter`` first warns (``RuntimeWarning``). Arithmetic is in
the features' dtype (float32 unless jax x64 is enabled and float64 features
are passed); the gap is evaluated in a cancellation-free form.

Standardisation (:func:`standardize_fit`) is scikit-learn's
``StandardScaler``: mean and population standard deviation, a (near-)constant
feature gets scale 1.

Protocols (indices drawn by :func:`tr_val_plan` / :func:`tr_tr_plan` from a
numpy ``Generator``; the reference uses the global ``np.random`` state):

* DFR^Tr_Val (:func:`dfr_tr_val`; the reference's defaults
  ``balance_dfr_val=True``, ``notrain_dfr_val=True``): shuffle the validation
  set; the examples after the first ``n // 2`` (the larger half when ``n`` is
  odd, as the reference's ``idx[n_val:]``), every group subsampled without
  replacement to the smallest group's size, are fitted with
  a ``StandardScaler`` fit on themselves; the first ``n // 2`` score each C
  of ``C_GRID`` by worst-group accuracy. Class weights are {0: 1, 1: 1}.
  Final: ``20`` fits, each on a fresh group-balanced subsample of the whole
  validation set, standardised by a scaler fit on the *training* embeddings
  (``dfr_on_validation_eval`` fits its scaler on ``all_embeddings["train"]``);
  ``coef`` and ``intercept`` are averaged.
* DFR^Tr_Tr (:func:`dfr_tr_tr`): scaler fit on all training embeddings; one
  group-balanced subsample of the training set; grid C × class weight
  ({0: 1, 1: w} then {0: w, 1: 1}, w ∈ ``CLASS_WEIGHT_GRID``; the reference's
  ``--tune_class_weights_dfr_train``, default here; ``tune_class_weights=False``
  is the reference's default {0: 1, 1: 1}) scored by worst-group accuracy on
  the whole validation set; final: ``10`` fits on fresh balanced training
  subsamples with the chosen C and class weights, averaged.
* Ties: the reference keeps the scores in a dict keyed ``(C, w0, w1)`` in
  loop order (C outer, class weight inner) and takes ``np.argmax`` of its
  values, i.e. the first best in insertion order; ``{0: 1, 1: 1}`` is listed
  twice in the class-weight grid and keeps its first position. The candidates
  here are in that order (duplicate removed) and the first best wins, so on
  ties the largest C wins.

Departures from the reference beyond the solver: a group absent from a fitting
set (the reference would fit on zero examples per group) or from a scoring
set (the reference's worst-group accuracy would be NaN) is a ``ValueError``
naming the split and the group; groups are ``0 .. num_groups − 1``
(``num_groups`` defaults to ``max(g) + 1`` over the given groups).

Public API: :func:`logistic_regression_l1`, :func:`fit_many`,
:func:`l1_logistic_objective`, :func:`predict`, :func:`standardize_fit`,
``standardize``, :func:`balanced_subsample`, :func:`tr_val_plan`,
:func:`tr_tr_plan`, :func:`worst_group_accuracy`, :func:`dfr_tr_val`,
:func:`dfr_tr_tr`, :func:`fold_into_head`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS

Array = jax.Array

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
CLASS_WEIGHT_GRID = (1.0, 2.0, 3.0, 10.0, 100.0, 300.0, 1000.0)
TR_VAL_RETRAINS = 20
TR_TR_RETRAINS = 10
MAX_ITER = 20_000
TOL = 1e-4
GAP_EVERY = 10
_GROW = 1.1
_SHRINK = 0.5


# --------------------------------------------------------------------------
# L1 logistic regression (liblinear's objective)
# --------------------------------------------------------------------------

def _is_concrete(*values) -> bool:
  return not any(isinstance(v, jax.core.Tracer) for v in values)


def _check_fit_inputs(x, y, C, mask, sample_weight) -> None:
  """Host-side checks (skipped for traced values, e.g. under ``jax.vmap``)."""
  if _is_concrete(C):
    c = np.asarray(C, dtype=np.float64)
    if not np.all(np.isfinite(c)) or np.any(c <= 0):
      raise ValueError(f"C must be finite and > 0 (the inverse L1 strength of liblinear); got "
                       f"{c.tolist() if c.ndim else float(c)}.")
  if _is_concrete(y):
    labels = np.unique(np.asarray(y))
    if not np.all(np.isin(labels, (0, 1))):
      raise ValueError(f"y must be binary with labels in {{0, 1}}; got labels "
                       f"{labels.tolist()[:10]}.")
  if np.ndim(x) < 2:
    raise ValueError(f"x must be [N, D] (or [M, N, D] for fit_many); got shape {np.shape(x)}.")
  if sample_weight is not None and _is_concrete(sample_weight):
    sw = np.asarray(sample_weight)
    if not np.all(np.isfinite(sw)) or np.any(sw < 0):
      raise ValueError("sample_weight must be finite and >= 0.")
  if mask is not None and _is_concrete(mask):
    kept = np.asarray(mask, bool).reshape(-1, np.shape(mask)[-1]).sum(axis=-1)
    if np.any(kept == 0):
      raise ValueError("mask keeps no example for some fit; every fit needs examples.")
  for name, v in (("mask", mask), ("sample_weight", sample_weight)):
    if v is not None and np.shape(v)[-1] != np.shape(y)[-1]:
      raise ValueError(f"{name} must have one entry per example ({np.shape(y)[-1]}); got shape "
                       f"{np.shape(v)}.")


def _check_solver_options(max_iter, tol) -> None:
  if int(max_iter) != max_iter or max_iter < 1:
    raise ValueError(f"max_iter must be a positive integer; got {max_iter}.")
  if not 0 < tol < 1:
    raise ValueError(f"tol (relative duality gap) must be in (0, 1); got {tol}.")


def _row_weights(y, C, mask, sample_weight, dtype) -> Array:
  """liblinear's per-instance ``C_i = C · sample_weight_i`` (0 for masked rows)."""
  c = jnp.full(jnp.shape(y), C, dtype)
  if sample_weight is not None:
    c = c * jnp.asarray(sample_weight, dtype)
  if mask is not None:
    c = jnp.where(jnp.asarray(mask, bool), c, 0)
  return c


def _as_float(x) -> Array:
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _soft(v, t):
  return jnp.sign(v) * jnp.maximum(jnp.abs(v) - t, 0)


def _binary_entropy(p):
  return -jax.scipy.special.xlogy(p, p) - jax.scipy.special.xlogy(1 - p, 1 - p)


def _gap(x, ys, c, w, b, z):
  """Duality gap ``F(w, b) − D(u)`` and ``F(w, b)`` at the primal point.

  ``D(u) = Σ_i c_i H(u_i / c_i)`` (binary entropy) is the Fenchel dual of F at
  the feasible ``u = s · c σ(−m)``. With ``v = Σ_i c_i σ(−m_i) ỹ_i x̃_i`` the gap
  is ``Σ_j |w_j| − w_j v_j + Σ_i c_i (H(σ(−m_i)) − H(s σ(−m_i)))``: each term is
  formed directly, so it does not cancel in float32."""
  m = ys * z
  p = jax.nn.sigmoid(-m)
  r = ys * c * p
  v_w, v_b = x.T @ r, jnp.sum(r)
  vmax = jnp.maximum(jnp.max(jnp.abs(v_w)), jnp.abs(v_b))
  s = jnp.minimum(1.0, 1.0 / jnp.maximum(vmax, jnp.finfo(z.dtype).tiny))
  gap = (jnp.sum(jnp.abs(w) - w * v_w) + (jnp.abs(b) - b * v_b)
         + jnp.sum(c * (_binary_entropy(p) - _binary_entropy(s * p))))
  primal = jnp.sum(c * jax.nn.softplus(-m)) + jnp.sum(jnp.abs(w)) + jnp.abs(b)
  return gap, primal


def _solve(x, ys, c, max_iter, tol):
  """FISTA on F for one problem; ``x`` [N, D], ``ys`` ±1 [N], ``c`` [N] >= 0.
  Returns ``(w, b, iterations, relative gap)``."""
  dtype = x.dtype
  n, d = x.shape
  # Diagonal metric h: the weighted second moment of each column (1 for the
  # intercept's), so badly scaled features do not set the step of the others.
  tiny = jnp.finfo(dtype).tiny
  h = (c @ (x * x)) / jnp.maximum(jnp.sum(c), tiny)
  h = jnp.maximum(h, 1e-6 * jnp.max(h) + tiny)
  # sum_i c_i ||x̃_i||²_{h⁻¹} / 4 bounds the curvature; backtracking grows the step from 1 / that.
  lipschitz = 0.25 * jnp.sum(c * (jnp.sum(x * x / h, axis=1) + 1.0))
  step0 = 1.0 / jnp.maximum(lipschitz, tiny)

  def smooth(z):
    return c * jax.nn.softplus(-ys * z)

  def one_step(_, st):
    w, b, z, wy, by, zy, t, step = st
    r = -ys * c * jax.nn.sigmoid(-ys * zy)
    gw, gb = x.T @ r, jnp.sum(r)
    wn = _soft(wy - step / h * gw, step / h)
    bn = _soft(by - step * gb, step)
    zn = x @ wn + bn
    dw, db = wn - wy, bn - by
    # f(x⁺) − f(y) − ∇f(y)·(x⁺ − y) − |x⁺ − y|²_h / 2t <= slack, summed term by term.
    excess = (jnp.sum(smooth(zn) - smooth(zy)) - (gw @ dw + gb * db)
              - (dw @ (h * dw) + db * db) / (2 * step))
    slack = 10 * jnp.finfo(dtype).eps * jnp.sum(smooth(zy))
    accept = excess <= slack
    step_next = jnp.where(accept, step * _GROW, step * _SHRINK)
    t_next = 0.5 * (1 + jnp.sqrt(1 + 4 * t * t * step / step_next))
    restart = ((wy - wn) @ (h * (wn - w)) + (by - bn) * (bn - b)) > 0
    t_next = jnp.where(restart, 1.0, t_next).astype(dtype)
    beta = (t - 1) / t_next
    beta = jnp.where(restart, 0.0, beta)
    wy_a, by_a, zy_a = wn + beta * (wn - w), bn + beta * (bn - b), zn + beta * (zn - z)
    pick = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
    return (pick(wn, w), pick(bn, b), pick(zn, z), pick(wy_a, wy), pick(by_a, by),
            pick(zy_a, zy), pick(t_next, t).astype(dtype), step_next.astype(dtype))

  def cond(carry):
    k, _, _, rel_gap = carry
    return (k < max_iter) & (rel_gap > tol)

  def body(carry):
    k, st, best_dual, _ = carry
    st = jax.lax.fori_loop(0, GAP_EVERY, one_step, st, unroll=2)
    gap, primal = _gap(x, ys, c, st[0], st[1], st[2])
    # the best dual value seen so far certifies the current primal point
    best_dual = jnp.maximum(best_dual, primal - gap)
    rel_gap = (primal - best_dual) / jnp.maximum(primal, jnp.finfo(dtype).tiny)
    return k + GAP_EVERY, st, best_dual, rel_gap

  zero_w, zero_b, zero_z = jnp.zeros(d, dtype), jnp.zeros((), dtype), jnp.zeros(n, dtype)
  st0 = (zero_w, zero_b, zero_z, zero_w, zero_b, zero_z, jnp.ones((), dtype), step0.astype(dtype))
  carry0 = (jnp.zeros((), jnp.int32), st0, jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype))
  k, st, _, rel_gap = jax.lax.while_loop(cond, body, carry0)
  return st[0], st[1], k, rel_gap


@functools.partial(jax.jit, static_argnames=("return_info",))
def _fit_one(x, y, c, tol, max_iter, return_info):
  ys = 2 * y.astype(x.dtype) - 1
  w, b, k, rel_gap = _solve(x, ys, c, max_iter, tol)
  return (w, b, k, rel_gap) if return_info else (w, b)


def logistic_regression_l1(x, y, *, C, mask=None, sample_weight=None, max_iter: int = MAX_ITER,
                           tol: float = TOL, return_info: bool = False):
  """Binary L1 logistic regression minimising liblinear's objective (module
  docstring): ``||w||_1 + |b| + C Σ_i s_i log(1 + exp(−ỹ_i (w·x_i + b)))``.

  ``x`` [N, D] float; ``y`` [N] in {0, 1}; ``C`` > 0 (scikit-learn's ``C``);
  ``mask`` [N] bool drops rows; ``sample_weight`` [N] multiplies each
  example's loss (class weights are sample weights by class). FISTA until the
  relative duality gap is <= ``tol`` or ``max_iter`` proximal steps.
  Returns ``(coef [D], intercept [])`` as ``coef_[0]``, ``intercept_[0]``;
  with ``return_info`` also ``(iterations, relative gap)``. ``jax.vmap``-able
  over ``C``, ``mask`` and ``sample_weight`` (checks on values are done only
  for concrete inputs).
  """
  _check_fit_inputs(x, y, C, mask, sample_weight)
  _check_solver_options(max_iter, tol)
  x = _as_float(x)
  y = jnp.asarray(y)
  c = _row_weights(y, C, mask, sample_weight, x.dtype)
  return _fit_one(x, y, c, jnp.asarray(tol, x.dtype), jnp.asarray(max_iter, jnp.int32),
                  return_info=return_info)


@functools.partial(jax.jit, static_argnames=("x_axis", "y_axis", "return_info"))
def _fit_batch(x, y, c, tol, max_iter, x_axis, y_axis, return_info):
  fn = functools.partial(_fit_one, return_info=return_info)
  return jax.vmap(fn, in_axes=(x_axis, y_axis, 0, None, None))(x, y, c, tol, max_iter)


def fit_many(x, y, *, C, masks=None, sample_weight=None, max_iter: int = MAX_ITER,
             tol: float = TOL, return_info: bool = False):
  """M L1 logistic regressions as one batched (``vmap``-ed) computation.

  ``C`` [M]; ``x`` [N, D] shared or [M, N, D]; ``y`` [N] or [M, N]; ``masks``
  and ``sample_weight`` [M, N] or [N] (shared) or None. Returns
  ``(coef [M, D], intercept [M])`` (with ``return_info`` also iterations [M]
  and relative gaps [M]). Each fit stops on its own; the batch runs until the
  slowest has.
  """
  C = np.asarray(C, dtype=np.float64)
  if C.ndim != 1 or C.size == 0:
    raise ValueError(f"C must be a non-empty 1-d array of regularisation values; got shape "
                     f"{C.shape}.")
  _check_fit_inputs(x, y, C, masks, sample_weight)
  _check_solver_options(max_iter, tol)
  m = C.shape[0]
  x = _as_float(x)
  y = jnp.asarray(y)
  x_axis = 0 if x.ndim == 3 else None
  y_axis = 0 if y.ndim == 2 else None
  for name, v, axis in (("x", x, x_axis), ("y", y, y_axis), ("masks", masks, 0),
                        ("sample_weight", sample_weight, 0)):
    if v is not None and axis == 0 and np.ndim(v) == (3 if name == "x" else 2) \
       and np.shape(v)[0] != m:
      raise ValueError(f"{name} has {np.shape(v)[0]} fits on its first axis but C has {m}.")
  n = y.shape[-1]
  c = jnp.broadcast_to(jnp.asarray(C, x.dtype)[:, None], (m, n))
  if sample_weight is not None:
    c = c * jnp.asarray(sample_weight, x.dtype)
  if masks is not None:
    c = jnp.where(jnp.asarray(masks, bool), c, 0)
  return _fit_batch(x, y, c, jnp.asarray(tol, x.dtype), jnp.asarray(max_iter, jnp.int32),
                    x_axis=x_axis, y_axis=y_axis, return_info=return_info)


def _fit_checked(x, y, *, C, sample_weight=None, max_iter, tol, where: str):
  """:func:`fit_many` that warns when a fit stopped at ``max_iter`` above ``tol``."""
  coef, intercept, iters, rel_gap = fit_many(x, y, C=C, sample_weight=sample_weight,
                                             max_iter=max_iter, tol=tol, return_info=True)
  rel_gap = np.asarray(rel_gap)
  if np.any(rel_gap > tol):
    warnings.warn(f"DFR {where}: {int(np.sum(rel_gap > tol))} of {rel_gap.size} fits stopped at "
                  f"max_iter={max_iter} with a relative duality gap up to {rel_gap.max():.2e} "
                  f"(> tol={tol}).", RuntimeWarning, stacklevel=3)
  return np.asarray(coef), np.asarray(intercept)


def l1_logistic_objective(coef, intercept, x, y, *, C, mask=None, sample_weight=None) -> Array:
  """liblinear's L1 objective ``||w||_1 + |b| + C Σ_i s_i log(1 + exp(−ỹ_i z_i))``
  at ``(coef [D], intercept [])`` (e.g. scikit-learn's ``coef_[0]``,
  ``intercept_[0]``), with ``y`` in {0, 1} and masked rows left out."""
  x = _as_float(x)
  coef = jnp.asarray(coef, x.dtype).reshape(-1)
  intercept = jnp.asarray(intercept, x.dtype).reshape(())
  ys = 2 * jnp.asarray(y).astype(x.dtype) - 1
  c = _row_weights(ys, C, mask, sample_weight, x.dtype)
  z = x @ coef + intercept
  return jnp.sum(c * jax.nn.softplus(-ys * z)) + jnp.sum(jnp.abs(coef)) + jnp.abs(intercept)


def predict(coef, intercept, x) -> np.ndarray:
  """Class 1 iff ``coef·x + intercept > 0`` (scikit-learn's binary ``predict``)."""
  z = np.asarray(x) @ np.asarray(coef) + np.asarray(intercept)
  return (z > 0).astype(np.int64)


# --------------------------------------------------------------------------
# Standardisation (StandardScaler)
# --------------------------------------------------------------------------

def standardize_fit(x, mask=None) -> tuple[Array, Array]:
  """``StandardScaler().fit`` on the rows of ``x`` [N, D] where ``mask``:
  ``(mean [D], scale [D])`` with the population standard deviation; a
  feature whose variance is within rounding of zero (scikit-learn's
  ``_is_constant_feature`` bound) gets scale 1."""
  x = _as_float(x)
  w = jnp.ones(x.shape[0], x.dtype) if mask is None else jnp.asarray(mask, x.dtype)
  n = jnp.sum(w)
  mean = (w @ x) / n
  var = (w @ jnp.square(x - mean)) / n
  eps = jnp.finfo(x.dtype).eps
  constant = var <= n * eps * var + jnp.square(n * mean * eps)
  scale = jnp.where(constant, 1.0, jnp.sqrt(var)).astype(x.dtype)
  return mean, scale


def standardize(x, mean, scale) -> Array:
  return (_as_float(x) - mean) / scale


# --------------------------------------------------------------------------
# Group-balanced subsampling and the DFR protocols
# --------------------------------------------------------------------------

def _num_groups(num_groups: int | None, *groups: np.ndarray) -> int:
  if num_groups is not None:
    return int(num_groups)
  return int(max(int(np.max(g)) for g in groups if len(g)) + 1)


def balanced_subsample(groups, rng: np.random.Generator, *, num_groups: int,
                       where: str = "fitting set") -> np.ndarray:
  """Indices of a group-balanced subsample: each group ``0 .. num_groups − 1``
  subsampled without replacement (``rng.permutation``) to the smallest group's
  size, concatenated group by group (the reference's per-group
  ``np.random.shuffle`` then ``[:min_g]``). An empty group is an error."""
  groups = np.asarray(groups)
  members = [np.flatnonzero(groups == k) for k in range(num_groups)]
  empty = [k for k, idx in enumerate(members) if idx.size == 0]
  if empty:
    raise ValueError(f"DFR {where}: groups {empty} have no examples; every group must be present "
                     f"to balance by subsampling.")
  smallest = min(idx.size for idx in members)
  return np.concatenate([rng.permutation(idx)[:smallest] for idx in members])


@dataclasses.dataclass(frozen=True)
class TrValPlan:
  """Indices into the validation set: ``tune_fit`` (balanced fitting half),
  ``tune_score`` (scoring half), ``final`` [R, n] balanced subsamples."""
  tune_fit: np.ndarray
  tune_score: np.ndarray
  final: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrTrPlan:
  """Indices into the training set: ``tune`` (one balanced subsample) and
  ``final`` [R, n] balanced subsamples."""
  tune: np.ndarray
  final: np.ndarray


def tr_val_plan(g_val, *, num_groups: int | None = None, num_retrains: int = TR_VAL_RETRAINS,
                seed: int | np.random.Generator = 0) -> TrValPlan:
  """The random subsets of DFR^Tr_Val, drawn in the reference's order."""
  g_val = np.asarray(g_val)
  num_groups = _num_groups(num_groups, g_val)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(g_val.size)
  half = g_val.size // 2
  fit_half, score_half = perm[half:], perm[:half]
  where = "DFR^Tr_Val tuning fitting half of the validation set"
  tune_fit = fit_half[balanced_subsample(g_val[fit_half], rng, num_groups=num_groups, where=where)]
  final = np.stack([balanced_subsample(g_val, rng, num_groups=num_groups,
                                       where="DFR^Tr_Val validation set")
                    for _ in range(num_retrains)])
  return TrValPlan(tune_fit=tune_fit, tune_score=score_half, final=final)


def tr_tr_plan(g_train, *, num_groups: int | None = None, num_retrains: int = TR_TR_RETRAINS,
               seed: int | np.random.Generator = 0) -> TrTrPlan:
  """The random subsets of DFR^Tr_Tr, drawn in the reference's order."""
  g_train = np.asarray(g_train)
  num_groups = _num_groups(num_groups, g_train)
  rng = np.random.default_rng(seed)
  where = "DFR^Tr_Tr training set"
  tune = balanced_subsample(g_train, rng, num_groups=num_groups, where=where)
  final = np.stack([balanced_subsample(g_train, rng, num_groups=num_groups, where=where)
                    for _ in range(num_retrains)])
  return TrTrPlan(tune=tune, final=final)


def worst_group_accuracy(pred, y, g, *, num_groups: int, where: str = "scoring set") -> float:
  """``min_k mean(pred == y | g == k)`` over groups ``0 .. num_groups − 1``."""
  pred, y, g = np.asarray(pred), np.asarray(y), np.asarray(g)
  correct = pred == y
  accs = []
  for k in range(num_groups):
    sel = g == k
    if not sel.any():
      raise ValueError(f"DFR {where}: group {k} has no examples, so its accuracy is undefined.")
    accs.append(correct[sel].mean())
  return float(np.min(accs))


@dataclasses.dataclass(frozen=True)
class DFRResult:
  """A DFR fit on standardised features: ``decision(x) = standardize(x) · coef
  + intercept``; :func:`fold_into_head` turns it into a head on raw features.

  ``candidates`` are the tuned ``(C, w0, w1)`` in the reference's order and
  ``tuning_worst_group_accuracy`` their scores; ``c``, ``class_weight`` the
  chosen ones; ``coef``/``intercept`` the average of the final fits."""
  c: float
  class_weight: tuple[float, float]
  candidates: tuple[tuple[float, float, float], ...]
  tuning_worst_group_accuracy: np.ndarray
  coef: np.ndarray
  intercept: float
  mean: np.ndarray
  scale: np.ndarray


def _class_weight_candidates(tune_class_weights: bool,
                             weights: Sequence[float]) -> list[tuple[float, float]]:
  if not tune_class_weights:
    return [(1.0, 1.0)]
  options = [(1.0, float(w)) for w in weights] + [(float(w), 1.0) for w in weights]
  return list(dict.fromkeys(options))  # first occurrence keeps its place, as dict keys do


def _choose(scores) -> int:
  return int(np.argmax(np.asarray(scores)))  # the first best, as the reference's argmax


def _check_split(x, y, g, name):
  x, y, g = np.asarray(x), np.asarray(y), np.asarray(g)
  if x.ndim != 2 or y.shape != (x.shape[0],) or g.shape != (x.shape[0],):
    raise ValueError(f"DFR {name}: features must be [N, D] with labels and groups [N]; got "
                     f"{x.shape}, {y.shape}, {g.shape}.")
  labels = np.unique(y)
  if not np.all(np.isin(labels, (0, 1))):
    raise ValueError(f"DFR {name}: y must be binary with labels in {{0, 1}}; got labels "
                     f"{labels.tolist()[:10]}.")
  return x, y, g


def _check_grid(c_grid):
  c_grid = np.asarray(c_grid, dtype=np.float64)
  if c_grid.ndim != 1 or c_grid.size == 0 or np.any(c_grid <= 0) or not np.all(np.isfinite(c_grid)):
    raise ValueError(f"DFR c_grid (values of C) must be a non-empty list of finite C > 0; got "
                     f"{c_grid.tolist()}.")
  return [float(c) for c in c_grid]


def dfr_tr_val(x_val, y_val, g_val, *, x_train, num_groups: int | None = None,
               c_grid: Sequence[float] = C_GRID, num_retrains: int = TR_VAL_RETRAINS,
               seed: int | np.random.Generator = 0, plan: TrValPlan | None = None,
               max_iter: int = MAX_ITER, tol: float = TOL) -> DFRResult:
  """DFR^Tr_Val (``dfr_on_validation_tune`` + ``dfr_on_validation_eval`` with
  ``balance_val=True``, ``add_train=False``): tune C on half of the
  validation set, then average ``num_retrains`` fits on balanced subsamples
  of all of it (module docstring). ``x_train`` only fits the final scaler.
  ``plan`` (else :func:`tr_val_plan` with ``seed``) fixes the subsets."""
  grid = _check_grid(c_grid)
  x_val, y_val, g_val = _check_split(x_val, y_val, g_val, "validation set")
  x_train = np.asarray(x_train)
  if x_train.ndim != 2 or x_train.shape[1] != x_val.shape[1]:
    raise ValueError(f"DFR x_train must be [N, {x_val.shape[1]}]; got {x_train.shape}.")
  num_groups = _num_groups(num_groups, g_val)
  if plan is None:
    plan = tr_val_plan(g_val, num_groups=num_groups, num_retrains=num_retrains, seed=seed)
  worst_group_accuracy(np.zeros_like(y_val[plan.tune_score]), y_val[plan.tune_score],
                       g_val[plan.tune_score], num_groups=num_groups,
                       where="DFR^Tr_Val tuning scoring half of the validation set")

  x_fit = jnp.asarray(x_val[plan.tune_fit])
  mean, scale = standardize_fit(x_fit)
  coefs, intercepts = _fit_checked(standardize(x_fit, mean, scale), y_val[plan.tune_fit],
                                   C=np.asarray(grid), max_iter=max_iter, tol=tol,
                                   where="DFR^Tr_Val tuning")
  x_score = np.asarray(standardize(x_val[plan.tune_score], mean, scale))
  scores = [worst_group_accuracy(predict(w, b, x_score), y_val[plan.tune_score],
                                 g_val[plan.tune_score], num_groups=num_groups)
            for w, b in zip(coefs, intercepts)]
  best = _choose(scores)
  c = grid[best]

  mean, scale = standardize_fit(jnp.asarray(x_train))
  x_std = standardize(x_val, mean, scale)
  coefs, intercepts = _fit_checked(x_std[jnp.asarray(plan.final)], y_val[plan.final],
                                   C=np.full(len(plan.final), c), max_iter=max_iter, tol=tol,
                                   where="DFR^Tr_Val re-training")
  return DFRResult(c=c, class_weight=(1.0, 1.0), candidates=tuple((g, 1.0, 1.0) for g in grid),
                   tuning_worst_group_accuracy=np.asarray(scores),
                   coef=coefs.mean(axis=0), intercept=float(intercepts.mean()),
                   mean=np.asarray(mean), scale=np.asarray(scale))


def dfr_tr_tr(x_train, y_train, g_train, x_val, y_val, g_val, *, num_groups: int | None = None,
              c_grid: Sequence[float] = C_GRID, tune_class_weights: bool = True,
              class_weight_grid: Sequence[float] = CLASS_WEIGHT_GRID,
              num_retrains: int = TR_TR_RETRAINS, seed: int | np.random.Generator = 0,
              plan: TrTrPlan | None = None, max_iter: int = MAX_ITER,
              tol: float = TOL) -> DFRResult:
  """DFR^Tr_Tr (``dfr_train_subset_tune`` + ``dfr_train_subset_eval``): tune C
  (and, with ``tune_class_weights``, the class weights) on one group-balanced
  training subsample scored by worst-group accuracy on the validation set,
  then average ``num_retrains`` fits on fresh balanced subsamples; the scaler
  is fit on all training embeddings (module docstring). Tuning fits run to
  ``tol`` like the final ones (the reference caps them at liblinear's
  ``max_iter=20``)."""
  grid = _check_grid(c_grid)
  if tune_class_weights:
    cw = np.asarray(class_weight_grid, dtype=np.float64)
    if cw.size == 0 or np.any(cw <= 0) or not np.all(np.isfinite(cw)):
      raise ValueError(f"DFR class_weight_grid must be finite weights > 0; got {cw.tolist()}.")
  x_train, y_train, g_train = _check_split(x_train, y_train, g_train, "training set")
  x_val, y_val, g_val = _check_split(x_val, y_val, g_val, "validation set")
  if x_val.shape[1] != x_train.shape[1]:
    raise ValueError(f"DFR x_val must have the training features' width {x_train.shape[1]}; got "
                     f"{x_val.shape[1]}.")
  num_groups = _num_groups(num_groups, g_train)
  if plan is None:
    plan = tr_tr_plan(g_train, num_groups=num_groups, num_retrains=num_retrains, seed=seed)
  worst_group_accuracy(np.zeros_like(y_val), y_val, g_val, num_groups=num_groups,
                       where="DFR^Tr_Tr validation set")

  mean, scale = standardize_fit(jnp.asarray(x_train))
  x_std = standardize(x_train, mean, scale)
  candidates = [(c, w0, w1) for c in grid
                for w0, w1 in _class_weight_candidates(tune_class_weights, class_weight_grid)]
  y_tune = y_train[plan.tune]
  weights = np.asarray([np.where(y_tune == 1, w1, w0) for _, w0, w1 in candidates])
  coefs, intercepts = _fit_checked(x_std[jnp.asarray(plan.tune)], y_tune,
                                   C=np.asarray([c for c, _, _ in candidates]),
                                   sample_weight=weights, max_iter=max_iter, tol=tol,
                                   where="DFR^Tr_Tr tuning")
  x_score = np.asarray(standardize(x_val, mean, scale))
  scores = [worst_group_accuracy(predict(w, b, x_score), y_val, g_val, num_groups=num_groups)
            for w, b in zip(coefs, intercepts)]
  c, w0, w1 = candidates[_choose(scores)]

  y_final = y_train[plan.final]
  coefs, intercepts = _fit_checked(x_std[jnp.asarray(plan.final)], y_final,
                                   C=np.full(len(plan.final), c),
                                   sample_weight=np.where(y_final == 1, w1, w0),
                                   max_iter=max_iter, tol=tol, where="DFR^Tr_Tr re-training")
  return DFRResult(c=c, class_weight=(w0, w1), candidates=tuple(candidates),
                   tuning_worst_group_accuracy=np.asarray(scores),
                   coef=coefs.mean(axis=0), intercept=float(intercepts.mean()),
                   mean=np.asarray(mean), scale=np.asarray(scale))


def fold_into_head(coef, intercept, mean, scale,
                   num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """A Dense head on *raw* features equal to the standardised linear model:
  ``W' = coef / σ``, ``b' = b − Σ_j coef_j μ_j / σ_j``. Binary (``coef`` [D]):
  kernel [D, 2] and bias [2] with logits ``[0, z]``, so softmax gives the
  logistic model's probabilities and argmax its prediction (class 0 at
  ``z = 0``, as scikit-learn). ``coef`` [K, D] with ``num_classes = K > 2``
  (one-vs-rest scores): kernel [D, K], bias [K]."""
  coef = np.asarray(coef, dtype=np.float64)
  intercept = np.asarray(intercept, dtype=np.float64)
  mean = np.asarray(mean, dtype=np.float64)
  scale = np.asarray(scale, dtype=np.float64)
  if num_classes == 2:
    if coef.ndim != 1:
      raise ValueError(f"fold_into_head: a binary head takes coef [D]; got shape {coef.shape}.")
    w = coef / scale
    b = float(intercept.reshape(())) - float(np.sum(coef * mean / scale))
    kernel = np.stack([np.zeros_like(w), w], axis=1)
    return kernel.astype(np.float32), np.asarray([0.0, b], dtype=np.float32)
  if coef.ndim != 2 or coef.shape[0] != num_classes:
    raise ValueError(f"fold_into_head: num_classes={num_classes} takes coef [{num_classes}, D]; "
                     f"got shape {coef.shape}.")
  w = coef / scale[None, :]
  b = intercept.reshape(num_classes) - (coef * mean[None, :] / scale[None, :]).sum(axis=1)
  return w.T.astype(np.float32), b.astype(np.float32)


# --- stage task -------------------------------------------------------------------

VARIANTS = ("tr_val", "tr_tr")


def _features(ctx, ref: str, split: str, checkpoint: str, module: str, key: str):
  """``(features, label, group)`` of ``split``: the artifact ``ref`` (a
  ``predict`` stage's output) or, when empty, extracted here with the
  ``predict`` machinery (eval mode, no augmentation)."""
  from jaxrobust import tasks
  if ref:
    out = ctx.artifacts.load(ref, f"{ctx.where}.{key}")
    missing = [f for f in ("features", "label", "group") if f not in out]
    if missing:
      raise RegistryError(
          f"{ctx.where}.{key}={ref!r} lacks the field(s) {missing}: predict it with "
          "fields=('features', 'label', 'group').")
  else:
    out = tasks.predict_outputs(ctx, checkpoint=checkpoint, split=split, module=module,
                                fields=("features", "label", "group"))
  x = np.asarray(out["features"], np.float32)
  y, g = np.asarray(out["label"], np.int64), np.asarray(out["group"], np.int64)
  if g.size and g.min() < 0:
    raise RegistryError(f"{ctx.where}.{key}: the {split} split has examples without a group "
                        f"({ctx.config.data.name!r}); DFR needs group annotations.")
  return x, y, g


def _check_dfr_options(where: str, *, variant: str = "tr_val", c_grid: Sequence[float] = C_GRID,
                       num_retrains: int = 0, **_) -> None:
  """The ``dfr`` task's option values, checked when the recipe is loaded."""
  if variant not in VARIANTS:
    raise RegistryError(f"{where}.variant must be one of {VARIANTS}, got {variant!r}.")
  grid = np.asarray(c_grid, np.float64).reshape(-1)
  if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
    raise RegistryError(f"{where}.c_grid: C must be > 0 (the inverse L1 strength); got "
                        f"{grid.tolist()}.")
  if isinstance(num_retrains, bool) or int(num_retrains) != num_retrains or num_retrains < 0:
    raise RegistryError(f"{where}.num_retrains must be an integer >= 0 (0: the reference's "
                        f"default), got {num_retrains!r}.")


@TASKS.register("dfr")
def dfr_task(ctx, *, checkpoint: str, variant: str = "tr_val", train: str = "",
             validation: str = "", c_grid: Sequence[float] = C_GRID, num_retrains: int = 0,
             tune_class_weights: bool = True, module: str = "classifier",
             seed: int = -1) -> dict[str, float]:
  """DFR as a stage: the features of ``checkpoint``'s ``module`` on the
  training and validation splits (the ``predict`` artifacts ``train`` /
  ``validation``, or extracted here), DFR^Tr_Val (``variant='tr_val'``) or
  DFR^Tr_Tr (``'tr_tr'``), the averaged head folded into the model's
  ``head`` and written as this stage's checkpoint (:meth:`~jaxrobust.tasks.StageContext.save_model`:
  ``artifact:<stage>/checkpoint``, read by ``init_from``, ``predict`` and
  ``evaluate`` like a trained one), then the stage config's evaluators on it.

  Args:
    checkpoint: the base (ERM) model, a path or ``artifact:<stage>/checkpoint``.
    variant: ``tr_val`` or ``tr_tr``.
    train, validation: ``artifact:<stage>/<name>`` of ``predict`` outputs with
      ``features``, ``label``, ``group`` (else extracted from the checkpoint).
    c_grid: the values of C tried (the reference's ``C_GRID``).
    num_retrains: fits averaged (0: the reference's 20 for tr_val, 10 for tr_tr).
    tune_class_weights: tr_tr's class-weight grid (the reference's flag).
    module: which module of the checkpoint.
    seed: the subsampling seed (-1: ``config.seed``).

  Results: ``dfr/c``, ``dfr/class_weight_0``/``_1``, ``dfr/nonzero_coefficients``,
  ``dfr/tuning/worst_group_accuracy`` (the chosen candidate's on the tuning
  set; for tr_val also ``dfr/tuning/C=<C>/worst_group_accuracy`` of each C)
  and the evaluators' results (``test/worst_group_accuracy``, ...). Artifact
  ``dfr``: the averaged ``coef``, ``intercept``, the scaler's ``mean`` and
  ``scale``, the ``candidates`` ``(C, w0, w1)`` and their
  ``tuning_worst_group_accuracy``.
  """
  from jaxrobust import evaluators as evaluators_lib
  from jaxrobust import files
  from jaxrobust import tasks
  from jaxrobust import checkpoint as ckpt_lib
  where = ctx.where
  _check_dfr_options(where, variant=variant, c_grid=c_grid, num_retrains=num_retrains)
  grid = np.asarray(c_grid, np.float64).reshape(-1)
  name = ctx.config.data.name
  spec = ctx.data.spec()
  if not spec.num_groups:
    raise RegistryError(f"{where}: DFR needs a dataset with group annotations; "
                        f"config.data.name={name!r} has none.")
  if module not in ctx.modules:
    raise RegistryError(f"{where}.module={module!r}: no such module ({sorted(ctx.modules)}).")
  num_classes = ctx.modules[module].num_classes
  if num_classes != 2:
    raise RegistryError(f"{where}: DFR's logistic regression is binary; the module "
                        f"{module!r} has {num_classes} classes ({name!r}).")
  params, stats = ckpt_lib.load_pretrained(ctx.checkpoint_path(checkpoint), module=module,
                                           where=f"{where}.checkpoint")
  head = params.get("head") if hasattr(params, "get") else None
  if head is None or "kernel" not in head or "bias" not in head:
    raise RegistryError(f"{where}.checkpoint: the module {module!r} has no linear `head` "
                        "(kernel, bias) on its penultimate features; DFR replaces that head.")
  seed = int(ctx.config.seed if seed == -1 else seed)
  x_tr, y_tr, g_tr = _features(ctx, train, "train", checkpoint, module, "train")
  x_va, y_va, g_va = _features(ctx, validation, "validation", checkpoint, module, "validation")
  if x_tr.shape[1] != head["kernel"].shape[0]:
    raise RegistryError(f"{where}: the features have {x_tr.shape[1]} dimensions but the head "
                        f"takes {head['kernel'].shape[0]}: the artifacts are not this "
                        "checkpoint's features.")
  try:
    if variant == "tr_val":
      result = dfr_tr_val(x_va, y_va, g_va, x_train=x_tr, num_groups=spec.num_groups,
                          c_grid=grid, num_retrains=int(num_retrains) or TR_VAL_RETRAINS,
                          seed=seed)
    else:
      result = dfr_tr_tr(x_tr, y_tr, g_tr, x_va, y_va, g_va, num_groups=spec.num_groups,
                         c_grid=grid, tune_class_weights=bool(tune_class_weights),
                         num_retrains=int(num_retrains) or TR_TR_RETRAINS, seed=seed)
  except ValueError as e:
    raise RegistryError(f"{where}: {e}") from None
  kernel, bias = fold_into_head(result.coef, result.intercept, result.mean, result.scale)
  params = jax.tree.map(np.asarray, dict(params))
  params["head"] = {"kernel": kernel.astype(head["kernel"].dtype),
                    "bias": bias.astype(head["bias"].dtype)}
  ctx.save_model({module: {"params": params, "batch_stats": stats}})
  written = os.path.join(ctx.workdir, "checkpoints")
  ctx.artifacts.save("dfr", {"coef": np.asarray(result.coef, np.float32),
                             "intercept": np.asarray([result.intercept], np.float32),
                             "mean": np.asarray(result.mean, np.float32),
                             "scale": np.asarray(result.scale, np.float32),
                             "candidates": np.asarray(result.candidates, np.float32),
                             "tuning_worst_group_accuracy": np.asarray(
                                 result.tuning_worst_group_accuracy, np.float32)})
  results = {"dfr/c": float(result.c), "dfr/class_weight_0": float(result.class_weight[0]),
             "dfr/class_weight_1": float(result.class_weight[1]),
             "dfr/nonzero_coefficients": float(np.count_nonzero(result.coef))}
  results["dfr/tuning/worst_group_accuracy"] = float(np.max(result.tuning_worst_group_accuracy))
  if variant == "tr_val":  # DFR^Tr_Tr's 91 candidates stay in the artifact
    for (c, _, _), acc in zip(result.candidates, result.tuning_worst_group_accuracy):
      results[f"dfr/tuning/C={c:g}/worst_group_accuracy"] = float(acc)
  evaluators, state = tasks.evaluation_setup(
      ctx, ctx.config, written, modules=(module,),
      save_dir=os.path.join(ctx.workdir, "artifacts"))
  results.update(evaluators_lib.run(
      evaluators, state, final=True,
      plots_dir=os.path.join(ctx.workdir, "plots") if ctx.config.plots else None))
  if jax.process_index() == 0:
    files.write_json(os.path.join(ctx.workdir, "results.json"), results, what="results")
  return results


dfr_task.check_options = _check_dfr_options
