"""Post-hoc OOD detectors on penultimate features and the linear head: the
public entry point.

::

    from jaxrobust.methods import posthoc
    state = posthoc.fit("knn", train_features, train_labels, kernel=kernel, bias=bias, k=50)
    scores = posthoc.score("knn", test_features, state, kernel=kernel, bias=bias, k=50)

``kernel`` ``[D, K]`` and ``bias`` ``[K]`` are the classifier's ``head``
(``logits = features @ kernel + bias``, flax's layout: PyTorch's ``weight``
transposed). :func:`fit` returns the statistics a detector needs (None for a
detector that fits nothing); :func:`score` is jitted and returns ``[B]``
scores, **higher = in-distribution** for every detector (pytorch-ood's
"higher = more OOD" scores are negated). ``mask`` (``[N]`` bool) leaves rows
out of a fit (as do labels < 0) and scores masked rows 0.

=========================  ==============================  ============================
name                       options (defaults)              fit
=========================  ==============================  ============================
``react``                  ``percentile=90``               activation percentile (all)
``ash_p/ash_b/ash_s``      ``percentile=65``               --
``scale``                  ``percentile=65``               --
``dice``                   ``sparsity=0.9``                mean feature (streamed)
``gradnorm``               --                              --
``gen``                    ``gamma=0.1, top_m=100``        --
``kl_matching``            --                              class templates (streamed)
``vim``                    ``dim=None`` (D // 2)           subspace, α (streamed)
``residual``               ``dim=None`` (D // 2)           subspace (streamed)
``knn``                    ``k=50``                        normalised feature bank
``relative_mahalanobis``   --                              two Gaussians (streamed)
``she``                    --                              class patterns (streamed)
``nnguide``                ``k=10``                        guided feature bank
``fdbd``                   --                              mean feature (streamed)
=========================  ==============================  ============================

The definitions, papers and the reference files followed (OpenOOD v1.5
``openood/postprocessors/*.py``, pytorch-ood 0.4 ``pytorch_ood/detector/*.py``)
are in :mod:`~jaxrobust.methods.posthoc_activation` and
:mod:`~jaxrobust.methods.posthoc_distance`; the page ``docs/methods/posthoc.md``
has the table with papers.

Every detector is also a score of :data:`jaxrobust.scores.SCORES` by the same
name, so the OOD evaluator runs it like ``mahalanobis``
(``scores=('msp', 'knn(k=50)', 'vim')``): its ``fit`` reads the evaluated
module's ``params['head']`` from the :class:`~jaxrobust.evaluators.FitContext`
and streams the training split once per evaluation (cached by ``fit_key``,
which leaves out options the fit does not depend on: every ``knn(k=...)``
shares one bank); the head and the fitted statistics reach the jitted
``score(outputs, fitted)`` as the fitted pytree, replicated over the mesh. The
``tune_score`` task sweeps their options (:data:`GRIDS`, OpenOOD's sweeps).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.methods import posthoc_activation as act
from jaxrobust.methods import posthoc_distance as dist
from jaxrobust.methods.posthoc_base import (
    ArraySource, EvalSource, FitSource, check_dim, check_head, check_k, check_percentile,
    check_positive_int, check_sparsity, head_params)
from jaxrobust.registry import RegistryError
from jaxrobust.scores import SCORES, ScoreMethod

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Detector:
  """One detector: ``score(features, state, kernel, bias, **options)``,
  ``fit(source, kernel, bias, **fit options)`` or None, option defaults,
  and which options the fit depends on."""
  name: str
  score: Callable[..., Array]
  fit: Callable[..., Any] | None
  options: Mapping[str, Any]
  fit_options: tuple[str, ...] = ()
  needs_fit: bool = True


def _d(name, score, fit=None, fit_options=(), **options) -> Detector:
  return Detector(name, score, fit, options, tuple(fit_options), fit is not None)


DETECTORS: dict[str, Detector] = {d.name: d for d in (
    _d("react", act.react_score, act.react_fit, ("percentile",), percentile=90.0),
    _d("ash_p", act.ash_score("p"), percentile=65.0),
    _d("ash_b", act.ash_score("b"), percentile=65.0),
    _d("ash_s", act.ash_score("s"), percentile=65.0),
    _d("scale", act.scale_score, percentile=65.0),
    _d("dice", act.dice_score, act.dice_fit, ("sparsity",), sparsity=0.9),
    _d("gradnorm", act.gradnorm_score),
    _d("gen", act.gen_score, gamma=0.1, top_m=100),
    _d("kl_matching", act.kl_matching_score, act.kl_matching_fit),
    _d("vim", dist.vim_score, dist.vim_fit, ("dim",), dim=None),
    _d("residual", dist.residual_score, dist.residual_fit, ("dim",), dim=None),
    _d("knn", dist.knn_score, dist.knn_fit, (), k=50),
    _d("relative_mahalanobis", dist.relative_mahalanobis_score, dist.relative_mahalanobis_fit),
    _d("she", dist.she_score, dist.she_fit),
    _d("nnguide", dist.nnguide_score, dist.nnguide_fit, (), k=10),
    _d("fdbd", dist.fdbd_score, dist.fdbd_fit),
)}

#: Default ``tune_score`` grids (OpenOOD's ``postprocessor_sweep`` lists;
#: DICE's and KNN's from pytorch-ood's ``hyperparameter_space``).
GRIDS: dict[str, dict[str, tuple]] = {
    "react": {"percentile": (85, 90, 95, 99)},
    **{n: {"percentile": (65, 70, 75, 80, 85, 90, 95)}
       for n in ("ash_p", "ash_b", "ash_s", "scale")},
    "dice": {"sparsity": (0.1, 0.3, 0.5, 0.7, 0.9)},
    "gen": {"gamma": (0.01, 0.1, 0.5, 1, 2, 5, 10), "top_m": (10, 50, 100, 200, 500, 1000)},
    "knn": {"k": (50, 100, 200, 500, 1000)},
}


def names() -> tuple[str, ...]:
  return tuple(DETECTORS)


def _detector(name: str) -> Detector:
  if name not in DETECTORS:
    raise RegistryError(f"unknown post-hoc detector {name!r}; known: {', '.join(DETECTORS)}.")
  return DETECTORS[name]


def check_options(name: str, options: Mapping[str, Any], *, dim: int | None = None,
                  where: str = "") -> dict[str, Any]:
  """The detector's options, defaults filled in, checked (each error names
  the option); ``dim``: the feature dimension, when known."""
  det = _detector(name)
  where = where or f"posthoc.{name}"
  unknown = sorted(set(options) - set(det.options))
  if unknown:
    raise RegistryError(f"{where}: unknown option(s) {unknown}; {name} takes "
                        f"{', '.join(det.options) or 'none'}.")
  opts = {**det.options, **options}
  if "percentile" in opts:
    check_percentile(opts["percentile"], where)
    if dim is not None and name != "react":
      act.kept(dim, opts["percentile"], where)
  if "sparsity" in opts:
    check_sparsity(opts["sparsity"], where)
  if "k" in opts:
    check_positive_int(opts["k"], "k", where)
  if "top_m" in opts:
    check_positive_int(opts["top_m"], "top_m", where)
  if "gamma" in opts and not (isinstance(opts["gamma"], (int, float)) and opts["gamma"] > 0):
    raise RegistryError(f"{where}: gamma must be > 0, got {opts['gamma']!r}.")
  if "dim" in opts:
    if dim is not None:
      opts["dim"] = check_dim(opts["dim"], dim, where)
    elif opts["dim"] is not None:
      check_positive_int(opts["dim"], "dim", where)
  return opts


def _fit_with(name: str, source: FitSource, kernel: Any, bias: Any, opts: Mapping[str, Any]
              ) -> Any:
  det = _detector(name)
  if det.fit is None:
    return None
  return det.fit(source, kernel, bias, **{k: opts[k] for k in det.fit_options})


def fit(name: str, features: Any, labels: Any = None, *, kernel: Any, bias: Any,
        mask: Any = None, **options) -> Any:
  """Fits detector ``name`` on training ``features`` ``[N, D]`` (rows with
  ``mask`` false or a label < 0 left out); None when it fits nothing."""
  where = f"posthoc.fit({name!r})"
  check_head(tuple(np.shape(features)), kernel, bias, where)
  opts = check_options(name, options, dim=int(np.shape(features)[1]), where=where)
  source = ArraySource(features, labels, mask, where=where)
  state = _fit_with(name, source, np.asarray(kernel, np.float32), np.asarray(bias, np.float32),
                    opts)
  if "k" in opts:
    check_k(opts["k"], dist.bank_size(state), where)
  return state


@functools.partial(jax.jit, static_argnames=("name", "options"))
def _score(name: str, features: Array, state: Any, kernel: Array, bias: Array, mask: Array,
           options: tuple) -> Array:
  det = DETECTORS[name]
  opts = dict(options)
  f = jnp.where(mask[:, None], features, 0).astype(jnp.promote_types(features.dtype, jnp.float32))
  if name in ("knn", "nnguide"):
    s = dist.in_query_chunks(lambda q: det.score(q, state, kernel, bias, **opts), f)
  else:
    s = det.score(f, state, kernel, bias, **opts)
  return jnp.where(mask, s, 0.0)


def score(name: str, features: Any, state: Any, *, kernel: Any, bias: Any, mask: Any = None,
          **options) -> Array:
  """Scores ``[B]`` of features ``[B, D]`` (higher = in-distribution), jitted;
  ``state`` is what :func:`fit` returned with the same options."""
  where = f"posthoc.score({name!r})"
  check_head(tuple(np.shape(features)), kernel, bias, where)
  opts = check_options(name, options, dim=int(np.shape(features)[1]), where=where)
  det = _detector(name)
  if det.needs_fit and state is None:
    raise RegistryError(f"{where}: {name} needs the state posthoc.fit returns; got None.")
  if "k" in opts and state is not None:
    check_k(opts["k"], dist.bank_size(state), where)
  if name in ("vim", "residual") and state is not None:
    fitted = int(np.shape(state["residual"])[1])
    if fitted != np.shape(features)[1] - opts["dim"]:
      raise RegistryError(f"{where}: dim={opts['dim']} but the state was fitted with dim="
                          f"{np.shape(features)[1] - fitted}.")
  features = jnp.asarray(features)
  mask = jnp.ones(features.shape[0], bool) if mask is None else jnp.asarray(mask, bool)
  return _score(name, features, state, jnp.asarray(kernel), jnp.asarray(bias), mask,
                tuple(sorted(opts.items())))


# --- the scores registry -------------------------------------------------------------

def _replicated(ctx: Any, tree: Any) -> Any:
  """``tree`` on every device of the evaluator's mesh (fitted once, read by
  every batch without a transfer)."""
  sharding = getattr(getattr(ctx.eval, "predictor", None), "batch_sharding", None)
  if sharding is None:
    return jax.tree.map(jnp.asarray, tree)
  spec = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.device_put(tree, spec)


def score_method(name: str, **options) -> ScoreMethod:
  """Detector ``name`` as a :class:`~jaxrobust.scores.ScoreMethod`: ``fit``
  takes the head from the FitContext's variables and fits on the training
  split; ``score`` reads ``outputs['features']``."""
  det = _detector(name)
  opts = check_options(name, options)
  fit_opts = {k: opts[k] for k in det.fit_options}

  def fit_ctx(ctx: Any) -> dict[str, Any]:
    head = head_params(ctx.variables, ctx.where)
    d = int(head["kernel"].shape[0])
    checked = check_options(name, options, dim=d, where=ctx.where)
    state = _fit_with(name, EvalSource(ctx), np.asarray(head["kernel"]),
                      np.asarray(head["bias"]), checked)
    if "k" in checked and state is not None:
      check_k(checked["k"], dist.bank_size(state), ctx.where)
    return _replicated(ctx, {"head": head, "state": state})

  def score_fn(outputs: Mapping[str, Array], fitted: Mapping[str, Any]) -> Array:
    head = fitted["head"]
    f = outputs["features"]
    checked = dict(opts)
    if "dim" in checked:
      checked["dim"] = check_dim(checked["dim"], f.shape[-1], f"scores.{name}")
    return det.score(f.astype(jnp.promote_types(f.dtype, jnp.float32)), fitted["state"],
                     head["kernel"], head["bias"], **checked)

  key = f"{name}{sorted(fit_opts.items())}" if det.fit is not None else "head"
  return ScoreMethod(name, score_fn, fit=fit_ctx, fit_key=f"posthoc/{key}")


def _registered(name: str) -> Callable[..., ScoreMethod]:
  det = DETECTORS[name]

  def make(**options) -> ScoreMethod:
    return score_method(name, **options)
  make.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
      inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
      for k, v in det.options.items()])
  make.__name__ = name
  make.__doc__ = f"Post-hoc detector {name!r} (:mod:`jaxrobust.methods.posthoc`)."
  return make


for _name in DETECTORS:
  SCORES.register(_name)(_registered(_name))
