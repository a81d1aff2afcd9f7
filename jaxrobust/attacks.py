"""Input perturbations (adversarial attacks) in pixel space, and their registry.

Two layers:

* **Public attacks** that work on any model: ``fgsm(loss_fn, x, y, *, eps)``
  with ``loss_fn(x, y) -> per-example loss`` and ``x`` in ``[0, 1]``. They are
  pure and jittable; under ``jax.jit`` with a batch-sharded ``x`` they run
  sharded like the step.
* **Registered perturbations** (:data:`PERTURBATIONS`), what configs name:
  ``streams.train.perturb = "fgsm(eps=8/255)"`` perturbs a training stream
  inside the jitted step (with the current parameters, before the forward pass
  that is differentiated), and ``evaluators.robust.attacks = {"fgsm":
  "fgsm(eps=8/255)"}`` measures robust accuracy. A perturbation is
  ``perturb(ctx: PerturbContext, **options) -> x_adv`` in ``[0, 1]``; its
  result is treated as data (gradients are stopped), as in the reference code.

Units: ε is in pixel units of ``[0, 1]`` images (8/255 is one of 255 levels
times 8), as in Hendrycks et al.'s ``PGD_linf`` which attacks ``x ∈ [0, 1]``
and normalises inside the model. Normalisation by the dataset's mean/std happens
inside ``ctx.logits_fn``, so an attack never divides by the std itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxrobust.registry import Registry, RegistryError

Array = jax.Array
LossFn = Callable[[Array, Array], Array]

PERTURBATIONS = Registry("perturbation")


@dataclasses.dataclass(frozen=True)
class PerturbContext:
  """What a perturbation sees.

  Attributes:
    logits_fn: ``x01 -> logits`` of the attacked module with its current
      variables (normalisation inside; BatchNorm in the mode of the caller --
      train mode in a training step, as the reference attacks ``model.train()``
      -- with the statistics updates of the attack's own passes discarded).
    x: the clean images ``[B, H, W, C]`` in ``[0, 1]`` (after the stream's pp).
    labels: ``[B]`` int class labels (-1 where unlabelled).
    mask: ``[B]`` bool, valid examples.
    rng: a key for random starts.
    num_classes: K.
    batch: the stream's other per-example fields (``soft_label``, ``weight``,
      ``index``, ...).
    outputs_fn: ``x01 -> {'logits', 'features'}`` (for perturbations of the
      features, e.g. Mahalanobis pre-processing), or None.
    fitted: a score's fitted state (class means, precision), or None.
  """
  logits_fn: Callable[[Array], Array]
  x: Array
  labels: Array
  mask: Array
  rng: Array
  num_classes: int
  batch: Mapping[str, Array] = dataclasses.field(default_factory=dict)
  outputs_fn: Callable[[Array], Mapping[str, Array]] | None = None
  fitted: Any = None

  def cross_entropy(self, x: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy of ``logits_fn(x)``; 0 where the
    label is negative (unlabelled) or the example is masked."""
    logits = self.logits_fn(x).astype(jnp.float32)
    safe = jnp.clip(labels, 0, self.num_classes - 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.where((labels >= 0) & self.mask, ce, 0.0)

  def attack_labels(self, which: str) -> Array:
    """``'true'``: the labels; ``'predicted'``: argmax of the clean logits
    (no label leaking; needed for unlabelled data)."""
    if which == "true":
      return self.labels
    return jnp.argmax(jax.lax.stop_gradient(self.logits_fn(self.x)), axis=-1)


def _check_eps(eps: float, what: str = "eps") -> None:
  if isinstance(eps, jax.core.Tracer):
    return
  if not eps >= 0:
    raise RegistryError(f"{what} must be >= 0 (pixel units of [0, 1] images), got {eps!r}.")


def sign_step(x: Array, grad: Array, step: float) -> Array:
  """``x − step · sign⁺(grad)`` with the reference's sign: ``torch.ge(grad,
  0)`` mapped to ±1, so a zero gradient counts as +1 (ODIN and Mahalanobis
  pre-processing in the ODIN, Mahalanobis and energy code). Not clipped, as
  there."""
  return x - step * jnp.where(grad >= 0, 1.0, -1.0).astype(x.dtype)


def fgsm(loss_fn: LossFn, x: Array, y: Array, *, eps: float,
         clip_min: float = 0.0, clip_max: float = 1.0) -> Array:
  """Fast gradient sign method (Goodfellow et al. 2015), untargeted.

  ``x_adv = clip(x + eps · sign(∇_x Σ_i loss_fn(x, y)_i), clip_min, clip_max)``.

  Args:
    loss_fn: ``(x, y) -> [B]`` per-example loss to increase (e.g. the
      cross-entropy of the model's logits).
    x: images in ``[clip_min, clip_max]`` (pixel space).
    y: labels passed through to ``loss_fn``.
    eps: the ℓ∞ step, in the units of ``x`` (8/255 for 8 of 255 levels).

  Returns:
    The adversarial images, ``|x_adv - x| <= eps`` element-wise, with
    gradients stopped.
  """
  _check_eps(eps)
  grad = jax.grad(lambda z: jnp.sum(loss_fn(z, y)))(x)
  x_adv = jnp.clip(x + eps * jnp.sign(grad), clip_min, clip_max)
  return jax.lax.stop_gradient(x_adv.astype(x.dtype))


def _check_labels_choice(labels: str) -> None:
  if labels not in ("true", "predicted"):
    raise RegistryError(f"labels must be 'true' or 'predicted', got {labels!r}.")


@PERTURBATIONS.register("fgsm")
def fgsm_perturbation(ctx: PerturbContext, eps: float = 8 / 255, labels: str = "true") -> Array:
  """FGSM on the module's cross-entropy: :func:`fgsm` with
  ``loss_fn = ctx.cross_entropy``. ``labels='predicted'`` attacks the clean
  prediction instead of the label."""
  _check_eps(eps)
  _check_labels_choice(labels)
  return fgsm(ctx.cross_entropy, ctx.x, ctx.attack_labels(labels), eps=eps)


def build(spec: Any, *, where: str = "perturb") -> Callable[[PerturbContext], Array]:
  """A registered perturbation with its options bound and checked now
  (before any compilation): ``fn(ctx) -> x_adv``."""
  fn = PERTURBATIONS.build(spec, where=where, runtime=("ctx",))
  try:
    for key in ("eps", "epsilon", "step_size"):
      if key in fn.keywords:
        _check_eps(fn.keywords[key], key)
    if "labels" in fn.keywords:
      _check_labels_choice(fn.keywords["labels"])
  except RegistryError as e:
    raise RegistryError(f"{where}: perturbation {fn.spec_name!r}: {e}") from None
  return fn
