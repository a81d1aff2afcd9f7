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

Methods add scores with ``@SCORES.register(name)``. A score that needs more
than the logits (features, the input gradient) takes ``outputs`` as its first
argument instead of ``logits``: the OOD evaluator then passes the dict of
per-example model outputs (``logits``, ``features``) it computed for the batch.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from jaxrobust.registry import Registry, RegistryError, parse_spec

Array = jax.Array

SCORES = Registry("OOD score")


def _check_temperature(temperature: float) -> None:
  if not isinstance(temperature, jax.core.Tracer) and not temperature > 0:
    raise RegistryError(f"temperature must be > 0, got {temperature!r}.")


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


def build(spec, *, where: str = "scores") -> Callable[..., Array]:
  """A registered score with its options bound: ``fn(logits)`` or
  ``fn(outputs)`` (see the module docstring); ``fn.spec_name`` is its name
  and ``fn.takes_outputs`` tells which input it wants. Bad options (an
  unknown one, a temperature <= 0) raise here, before anything is compiled."""
  name = parse_spec(spec).name
  params = list(inspect.signature(SCORES.get(name, where)).parameters)
  first = params[0] if params else None
  if first not in ("logits", "outputs"):
    raise RegistryError(f"{where}: score {name!r} must take `logits` or `outputs` first.")
  fn = SCORES.build(spec, where=where, runtime=(first,))
  if "temperature" in fn.keywords:
    try:
      _check_temperature(fn.keywords["temperature"])
    except RegistryError as e:
      raise RegistryError(f"{where}: score {name!r}: {e}") from None
  fn.takes_outputs = first == "outputs"  # type: ignore[attr-defined]
  return fn
