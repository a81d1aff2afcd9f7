"""Out-of-distribution scores: **higher = more in-distribution**, always.

Every score is a pure, jittable, batched function of the logits
``[B, K] -> [B]``, registered by name in :data:`SCORES` so that the OOD
evaluator can take a list of them (``evaluators.ood.scores = ('msp', 'energy')``
or ``'energy(temperature=10)'``). Anomaly scores are negated here, once, so
every metric in :mod:`jaxrobust.metrics.ood` reads them the same way.

=============  ==========================================  ========================
name           value                                       reference
=============  ==========================================  ========================
``msp``        max_k softmax(f/T)_k                        Hendrycks & Gimpel 2017
``max_logit``  max_k f_k                                   Hendrycks et al. 2022
``energy``     −E(x; T) = T · logsumexp(f/T)               Liu et al. 2020 (EN code)
``entropy``    −H(softmax(f/T)) = Σ_k p_k log p_k          (negated entropy)
=============  ==========================================  ========================

Liu et al. define the free energy ``E(x; T) = −T·logsumexp_k f_k(x)/T``; low
energy means in-distribution, so the detection score is ``−E``, exactly what
:func:`energy` returns (the EN code's ``-to_np(T*torch.logsumexp(output/T,
dim=1))`` negated once more when it ranks). ``msp`` at ``temperature > 1`` is
ODIN's temperature-scaled softmax without the input perturbation.

Methods add scores with ``@SCORES.register(name)``, in one of three forms:

* ``fn(logits, **options) -> [B]`` -- a function of the logits;
* ``fn(outputs, **options) -> [B]`` -- of the dict of per-example model
  outputs (``logits``, ``features``);
* ``fn(**options) -> ScoreMethod`` -- a score with a ``fit`` over training
  data (Mahalanobis' class means and tied covariance) and/or an input
  ``perturb``-ation (ODIN's, Mahalanobis' pre-processing): see
  :class:`ScoreMethod`.

:func:`build` turns every form into a :class:`ScoreMethod`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxrobust.registry import Registry, RegistryError, parse_spec

Array = jax.Array

#: The OOD scores by name (higher = more in-distribution).
SCORES = Registry("OOD score")


@dataclasses.dataclass(frozen=True)
class ScoreMethod:
  """A score as the OOD evaluator and :class:`~jaxrobust.predict.Predictor` run it.

  Attributes:
    name: the registered name.
    score: ``(outputs, fitted) -> [B]``, jittable; ``outputs`` holds the
      ``logits`` and ``features`` of the (perturbed) batch, ``fitted`` what
      ``fit`` returned (None without one).
    perturb: input pre-processing ``(ctx: PerturbContext) -> x01`` run before
      the forward pass (``ctx.fitted`` is the fitted state), or None.
    fit: ``(ctx: jaxrobust.evaluators.FitContext) -> pytree of arrays``,
      computed once per evaluation (the model changes between evaluations),
      or None.
    key: what identifies the compiled function (name and options).
    fit_key: what identifies the fit (the options it depends on): scores
      that differ only in, e.g., ε share one fit per evaluation.
  """
  name: str
  score: Callable[[Mapping[str, Array], Any], Array]
  perturb: Callable[..., Array] | None = None
  fit: Callable[..., Any] | None = None
  key: str = ""
  fit_key: str = ""

  def __call__(self, logits_or_outputs: Any, fitted: Any = None) -> Array:
    """The score of a batch: ``logits`` ``[B, K]`` or an outputs mapping
    (``logits``, ``features``), without pre-processing (scores with a
    ``perturb`` need the evaluator or :class:`~jaxrobust.predict.Predictor`)."""
    outputs = (logits_or_outputs if isinstance(logits_or_outputs, Mapping)
               else {"logits": logits_or_outputs})
    return self.score(outputs, fitted)


def _check_temperature(temperature: float) -> None:
  if not isinstance(temperature, jax.core.Tracer) and not temperature > 0:
    raise RegistryError(f"temperature must be > 0, got {temperature!r}.")


def check_epsilon(epsilon: float) -> None:
  """Input pre-processing steps are >= 0 (pixel units of [0, 1] images)."""
  if not epsilon >= 0:
    raise RegistryError(f"epsilon must be >= 0 (pixel units of [0, 1] images), got "
                        f"{epsilon!r}.")


def _logits(logits: Array) -> Array:
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"scores take logits of shape [batch, classes]; got {tuple(logits.shape)}.")
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


@SCORES.register("msp")
def msp(logits: Array, temperature: float = 1.0) -> Array:
  """Maximum softmax probability of ``softmax(logits / temperature)``."""
  _check_temperature(temperature)
  return jnp.max(jax.nn.softmax(_logits(logits) / temperature, axis=-1), axis=-1)


@SCORES.register("max_logit")
def max_logit(logits: Array) -> Array:
  """The largest logit (MaxLogit)."""
  return jnp.max(_logits(logits), axis=-1)


@SCORES.register("energy")
def energy(logits: Array, temperature: float = 1.0) -> Array:
  """Negative free energy ``−E(x; T) = T · logsumexp(logits / T)``."""
  _check_temperature(temperature)
  return temperature * jax.nn.logsumexp(_logits(logits) / temperature, axis=-1)


@SCORES.register("entropy")
def entropy(logits: Array, temperature: float = 1.0) -> Array:
  """Negated predictive entropy ``Σ_k p_k log p_k`` of ``softmax(logits / T)``
  (0 for a one-hot prediction, −log K for the uniform one)."""
  _check_temperature(temperature)
  logp = jax.nn.log_softmax(_logits(logits) / temperature, axis=-1)
  return jnp.sum(jnp.exp(logp) * logp, axis=-1)


def build(spec, *, where: str = "scores") -> ScoreMethod:
  """A registered score, any form, as a :class:`ScoreMethod` with its options
  bound. Bad options (an unknown one, a temperature <= 0, ε < 0) raise here,
  before anything is compiled."""
  parsed = parse_spec(spec)
  name = parsed.name
  params = list(inspect.signature(SCORES.get(name, where)).parameters)
  first = params[0] if params else None
  runtime = (first,) if first in ("logits", "outputs") else ()
  fn = SCORES.build(spec, where=where, runtime=runtime)
  key = f"{name}{sorted(fn.keywords.items())}"
  try:
    if "temperature" in fn.keywords:
      _check_temperature(fn.keywords["temperature"])
    if first == "logits":
      return ScoreMethod(name, lambda outputs, fitted: fn(outputs["logits"]), key=key)
    if first == "outputs":
      return ScoreMethod(name, lambda outputs, fitted: fn(outputs), key=key)
    method = fn()
  except RegistryError as e:
    raise RegistryError(f"{where}: score {name!r}: {e}") from None
  if not isinstance(method, ScoreMethod):
    raise RegistryError(f"{where}: score {name!r} must take `logits` or `outputs` first, or "
                        "return a ScoreMethod.")
  return dataclasses.replace(method, name=name, key=key, fit_key=method.fit_key or key)
