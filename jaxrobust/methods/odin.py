"""ODIN (Liang, Li, Srikant, ICLR 2018): temperature scaling plus an input
perturbation that raises the softmax score.

For an input ``x`` (pixels in [0, 1]) with predicted class ŷ = argmax f(x):

    x̃ = x − ε · sign(−∇ₓ log S_ŷ(x; T)),   S(x; T) = softmax(f(x) / T),
    score = max_k S_k(x̃; T)          (higher = more in-distribution).

``−log S_ŷ(x; T)`` is the cross-entropy of ``f(x)/T`` against ŷ, which is how
the reference code writes it (``wetliu/energy_ood`` ``utils/score_calculation.py::
ODIN``, from ``facebookresearch/odin``): it takes the sign of the gradient
w.r.t. the *normalised* input, divides it by the per-channel std and subtracts
``ε ·`` that. Normalised input = (pixel − mean)/std, so that is a step of
exactly ε in pixel units: here the model normalises inside its call and the
step is taken in pixel space, ε in pixel units (never divide by the std
twice). :func:`odin_score`'s ``std`` argument is only for callers whose
``logits_fn`` takes already-normalised inputs: the step is then ε/std per
channel, as the reference's. Conventions kept from the reference: the sign of
a zero gradient is +1 (``torch.ge(grad, 0)``), the perturbed input is not
clipped to [0, 1], and the network runs in eval mode.

**Tuning.** T and ε are chosen on validation data, as the paper does: the
``tune_score`` stage task (``jaxrobust.methods.tuning``) evaluates a grid on
the task's validation split against a validation OOD set that is none of the
test OOD sets (by default ``uniform_noise``, as the OE/energy code's
``--validate`` distributions), picks the lowest FPR at 95% TPR, and writes the
chosen spec as an artifact the OOD evaluator reads. Default grid (the energy
code's ``run.sh``): T ∈ {1, 10, 100, 1000}, ε ∈ {0, 0.0004, 0.0008, 0.0014,
0.002, 0.0024, 0.0028, 0.0032, 0.0038, 0.0048}. Defaults without tuning:
T = 1000, ε = 0.0014 (OpenOOD's).

Registered score: ``odin(temperature=1000, epsilon=0.0014)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxrobust import attacks
from jaxrobust.scores import SCORES, ScoreMethod, _check_temperature, check_epsilon, msp

Array = jax.Array
TEMPERATURES = (1.0, 10.0, 100.0, 1000.0)
EPSILONS = (0.0, 0.0004, 0.0008, 0.0014, 0.002, 0.0024, 0.0028, 0.0032, 0.0038, 0.0048)


def odin_perturb(logits_fn: Callable[[Array], Array], x: Array, *, temperature: float,
                 epsilon: float, std: float | Sequence[float] = 1.0) -> Array:
  """``x − (ε/std) · sign(∇ₓ CE(f(x)/T, argmax f(x)))`` (gradients stopped)."""
  def loss(z):
    logits = _at_least_f32(logits_fn(z))
    pred = jax.lax.stop_gradient(jnp.argmax(logits, -1))
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits / temperature, pred))
  step = epsilon / jnp.asarray(std, x.dtype)
  return jax.lax.stop_gradient(attacks.sign_step(x, jax.grad(loss)(x), step))


def odin_score(logits_fn: Callable[[Array], Array], x: Array, *, temperature: float,
               epsilon: float, std: float | Sequence[float] = 1.0) -> Array:
  """ODIN's score of a batch: ``max softmax(f(x̃)/T)`` with ``x̃`` from
  :func:`odin_perturb`. ``logits_fn(x) -> logits`` is the model (eval mode);
  with inputs in pixel units leave ``std=1``."""
  _check_temperature(temperature)
  check_epsilon(epsilon)
  x_tilde = odin_perturb(logits_fn, x, temperature=temperature, epsilon=epsilon, std=std)
  return msp(logits_fn(x_tilde), temperature)


def _at_least_f32(x: Array) -> Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@SCORES.register("odin")
def odin(temperature: float = 1000.0, epsilon: float = 0.0014) -> ScoreMethod:
  """ODIN as a score of the OOD evaluator: the perturbation runs before the
  forward pass, the score reads the perturbed logits."""
  _check_temperature(temperature)
  check_epsilon(epsilon)

  def perturb(ctx: attacks.PerturbContext) -> Array:
    return odin_perturb(ctx.logits_fn, ctx.x, temperature=temperature, epsilon=epsilon)

  return ScoreMethod("odin", lambda outputs, fitted: msp(outputs["logits"], temperature),
                     perturb=perturb)
