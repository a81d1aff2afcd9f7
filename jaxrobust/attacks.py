"""Input perturbations (adversarial attacks) in pixel space, and their registry.

Two layers:

* **Public attacks** that work on any model: ``fgsm(loss_fn, x, y, *, eps)``
  and ``pgd(loss_fn, x, y, *, eps, step_size, steps, norm, rng, ...)`` with
  ``loss_fn(x, y) -> per-example loss`` and ``x`` in ``[0, 1]``. They are
  pure and jittable; under ``jax.jit`` with a batch-sharded ``x`` they run
  sharded like the step.
* **Registered perturbations** (:data:`PERTURBATIONS`), what configs name:
  ``streams.train.perturb = "fgsm(eps=8/255)"`` perturbs a training stream
  inside the jitted step (with the current parameters, before the forward pass
  that is differentiated), and ``evaluators.robust.attacks = {"fgsm":
  "fgsm(eps=8/255)"}`` measures robust accuracy. A perturbation is
  ``perturb(ctx: PerturbContext, **options) -> x_adv`` in ``[0, 1]`` -- or,
  inside a training step (``ctx.forward`` set), ``(x_adv, stats)``: the
  BatchNorm statistics after its own train-mode passes, each pass with its
  own dropout key, as PyTorch's ``model.train()`` attacks draw fresh dropout
  masks and update the running statistics on every pass. Its result is
  treated as data (gradients are stopped), as in the reference code.
  Registered:

  - ``fgsm(eps=8/255, labels='true')``: one signed-gradient step.
  - ``pgd(eps=8/255, step_size=2/255, steps=10, norm='linf', random_start=True,
    labels='true', target='none')``: projected gradient descent as in
    Hendrycks et al.'s ``PGD_linf`` / ``PGD_l2`` (``target='random'``:
    ``PGDTarget``, towards a random wrong class). PGD-10 for adversarial
    training, ``pgd(steps=20)`` for robust accuracy, as in their ``test.py``.

Units: ε is in pixel units of ``[0, 1]`` images (8/255 is one of 255 levels
times 8), as in Hendrycks et al.'s ``PGD_linf`` which attacks ``x ∈ [0, 1]``
and normalises inside the model. Normalisation by the dataset's mean/std happens
inside ``ctx.logits_fn``, so an attack never divides by the std itself.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxrobust.registry import Registry, RegistryError

Array = jax.Array
LossFn = Callable[[Array, Array], Array]

#: Perturbations a stream's ``perturb`` or a ``robust`` evaluator names.
PERTURBATIONS = Registry("perturbation")


@dataclasses.dataclass(frozen=True)
class PerturbContext:
  """What a perturbation sees.

  Attributes:
    logits_fn: ``x01 -> logits`` of the attacked module with its current
      variables (normalisation inside; BatchNorm in the mode of the caller --
      train mode in a training step, as the reference attacks ``model.train()``
      -- statistics not updated; in train mode one fixed dropout key).
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
    forward: in a training step, ``(x01, stats, key) -> (logits, stats)``: one
      train-mode pass with its own dropout key that returns the BatchNorm
      statistics after the pass (updated when the stream's
      ``perturb_stats='update'``, as PyTorch's train-mode attack passes do;
      returned unchanged with ``'discard'``). None outside training.
    stats: the module's BatchNorm statistics before the perturbation (with
      ``forward``).
    dropout_rng: the key the passes of the perturbation fold their index into
      (with ``forward``).
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
  forward: Callable[[Array, Any, Array], tuple[Array, Any]] | None = None
  stats: Any = None
  dropout_rng: Array | None = None

  def cross_entropy(self, x: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy of ``logits_fn(x)``; 0 where the
    label is negative (unlabelled) or the example is masked."""
    return self._masked_ce(self.logits_fn(x), labels)

  def cross_entropy_pass(self, x: Array, labels: Array, stats: Any, index: Any
                         ) -> tuple[Array, Any]:
    """:meth:`cross_entropy` of pass ``index`` of a perturbation: in a
    training step a train-mode pass with dropout key ``fold_in(dropout_rng,
    index)`` that threads the BatchNorm statistics (``forward``); else
    ``logits_fn`` with ``stats`` passed through."""
    if self.forward is None:
      return self.cross_entropy(x, labels), stats
    logits, stats = self.forward(x, stats, jax.random.fold_in(self.dropout_rng, index))
    return self._masked_ce(logits, labels), stats

  def _masked_ce(self, logits: Array, labels: Array) -> Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
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


def fgsm(loss_fn: Callable[..., Any], x: Array, y: Array, *, eps: float,
         clip_min: float = 0.0, clip_max: float = 1.0, state: Any = None) -> Any:
  """Fast gradient sign method (Goodfellow et al. 2015), untargeted.

  ``x_adv = clip(x + eps · sign(∇_x Σ_i loss_fn(x, y)_i), clip_min, clip_max)``.

  Args:
    loss_fn: ``(x, y) -> [B]`` per-example loss to increase (e.g. the
      cross-entropy of the model's logits).
    x: images in ``[clip_min, clip_max]`` (pixel space).
    y: labels passed through to ``loss_fn``.
    eps: the ℓ∞ step, in the units of ``x`` (8/255 for 8 of 255 levels).

    state: with a state, ``loss_fn(x, y, state, 0) -> (loss, state)`` threads
      it through the pass (BatchNorm statistics of a train-mode attack) and
      the result is ``(x_adv, state)``.

  Returns:
    The adversarial images, ``|x_adv - x| <= eps`` element-wise, with
    gradients stopped (and the state after the pass, when given).
  """
  _check_eps(eps)
  if state is None:
    grad = jax.grad(lambda z: jnp.sum(loss_fn(z, y)))(x)
  else:
    grad, state = jax.grad(lambda z: _summed(loss_fn(z, y, state, 0)), has_aux=True)(x)
  x_adv = jax.lax.stop_gradient(jnp.clip(x + eps * jnp.sign(grad), clip_min, clip_max)
                                .astype(x.dtype))
  return x_adv if state is None else (x_adv, jax.lax.stop_gradient(state))


def _summed(loss_and_state: tuple[Array, Any]) -> tuple[Array, Any]:
  loss, state = loss_and_state
  return jnp.sum(loss), state


NORMS = ("linf", "l2")
TARGETS = ("none", "random")


def _check_steps(steps: Any) -> None:
  if isinstance(steps, jax.core.Tracer):
    return
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise RegistryError(f"steps must be an int >= 1 (attack iterations, static), got {steps!r}.")


def _check_choice(value: Any, what: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise RegistryError(f"{what} must be one of {', '.join(repr(c) for c in choices)}; "
                        f"got {value!r}.")


def _per_example_l2(v: Array) -> Array:
  """``‖v_i‖₂`` over all but the batch axis, shaped ``[B, 1, ..., 1]``."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def _l2_normalize(v: Array) -> Array:
  """``v_i / ‖v_i‖₂`` per example; 0 where ``v_i = 0`` (the reference divides
  by zero there and gets NaN)."""
  n = _per_example_l2(v)
  return jnp.where(n > 0, v / jnp.where(n > 0, n, 1), jnp.zeros_like(v))


def pgd(loss_fn: Callable[..., Any], x: Array, y: Array, *, eps: float, step_size: float,
        steps: int, norm: str = "linf", rng: Array | None = None, random_start: bool = True,
        targeted: bool = False, clip_min: float = 0.0, clip_max: float = 1.0,
        unroll: int | bool | None = None, state: Any = None) -> Any:
  """Projected gradient descent (Madry et al. 2018) on ``Σ_i loss_fn(x, y)_i``.

  ``norm='linf'``: ``x ← Π(x + step_size · sign(∇))``; ``norm='l2'``:
  ``x ← Π(x + step_size · ∇_i / ‖∇_i‖₂)`` per example (a zero gradient gives
  a zero step). ``Π`` projects onto the ε-ball around the clean ``x`` (per
  example for ℓ2, element-wise for ℓ∞) and then clamps to ``[clip_min,
  clip_max]`` (which keeps the ball constraint, as the clean ``x`` is in the
  box). ``targeted=True`` descends on ``loss_fn`` (``y`` is then the target
  class) instead of ascending.

  Reference: Hendrycks et al. (2019), "Using Pre-Training Can Improve Model
  Robustness and Uncertainty", ``robustness/adversarial/attacks.py``:
  ``PGD_linf`` attacks ``x ∈ [0, 1]`` (the model sees ``2x − 1``) with ε =
  8/255, step 2/255, 10 steps for training and 20 for testing, a uniform
  random start in ``[−ε, ε]``, the sum-reduced cross-entropy and the sign of
  its gradient, projection onto the ε-ball and clamping to ``[0, 1]`` after
  every step. ``PGD_l2`` starts at a random direction scaled to a random norm
  ``≤ ε`` and takes normalised-gradient steps with an ℓ2 projection;
  ``PGDTarget`` is ``PGD_linf`` descending on the cross-entropy to a random
  wrong class.

  Where this departs from the reference:

  * the projection is onto the ε-ball around the clean ``x``. In
    ``PGD_linf``, ``adv_bx = bx.detach()`` shares storage with ``bx``, so the
    in-place ``adv_bx += noise`` of the random start moves ``bx`` too and
    every projection is onto the ball around ``bx + noise``: its adversarial
    examples reach 2ε from the clean images. That is a reference bug, not
    copied here;
  * the ℓ∞ random start is clamped to ``[clip_min, clip_max]`` before the
    first gradient (``PGD_linf`` evaluates the first gradient at the unclamped
    start; ``PGD_l2`` and the commented-out ``PGD`` of the same file clamp);
  * the ℓ2 random start draws its norm ``U(0, 1) · ε`` per example
    (``PGD_l2`` draws one ``np.random.rand()`` for the whole batch);
  * a zero gradient gives a zero ℓ2 step instead of NaN. ``sign(0) = 0`` for
    ℓ∞, as ``torch.sign``.

  The steps are a ``jax.lax.fori_loop``, fully unrolled on the CPU backend by
  default: XLA:CPU canonicalises convolution dimension numbers only in the
  entry computation, so inside a while-loop body the input-gradient
  convolutions (kernel in ``01oi`` order) fall back to a naive loop kernel
  (jax-ml/jax#12868); a rolled PGD-10 on WRN-16-2 ran about 20x slower than
  the unrolled one. On accelerators the loop stays rolled (faster compiles).

  Args:
    loss_fn: ``(x, y) -> [B]`` per-example loss (e.g. the cross-entropy of the
      model's logits).
    x: clean images ``[B, ...]`` in ``[clip_min, clip_max]`` (pixel space).
    y: labels (targets when ``targeted``) passed through to ``loss_fn``.
    eps: radius of the ball, in the units of ``x`` (8/255 = 8 of 255 levels).
    step_size: the step, in the units of ``x`` (ℓ∞: per element; ℓ2: the
      per-example step norm).
    steps: number of gradient steps, a static Python int ``>= 1``.
    norm: ``'linf'`` or ``'l2'``.
    rng: a PRNG key; needed when ``random_start``.
    random_start: start at a random point of the ball (else at ``x``).
    targeted: descend on ``loss_fn`` towards ``y`` instead of ascending.
    clip_min, clip_max: the valid pixel range.
    unroll: ``jax.lax.fori_loop``'s ``unroll``; None: ``True`` (fully
      unrolled) on the CPU backend, 1 (rolled) elsewhere.
    state: with a state, ``loss_fn(x, y, state, i) -> (loss, state)`` for
      step ``i`` threads it through the steps (the BatchNorm statistics of a
      train-mode attack, each pass with its own dropout key), and the result
      is ``(x_adv, state)``.

  Returns:
    ``x_adv``, same shape and dtype as ``x``, within ε of ``x`` in the chosen
    norm and in ``[clip_min, clip_max]``, with gradients stopped (and the
    state after the last step, when given).
  """
  _check_eps(eps)
  _check_eps(step_size, "step_size")
  _check_steps(steps)
  _check_choice(norm, "norm", NORMS)
  if random_start and rng is None:
    raise RegistryError("pgd: random_start=True needs rng (a PRNG key); pass rng= or "
                        "random_start=False.")
  x = jax.lax.stop_gradient(x)
  dtype = x.dtype
  l2 = norm == "l2"

  def project(z: Array) -> Array:
    d = z - x
    if l2:
      n = _per_example_l2(d)
      d = d * jnp.where(n > eps, eps / jnp.where(n > 0, n, 1), 1).astype(dtype)
    else:
      d = jnp.clip(d, -eps, eps)
    return jnp.clip(x + d, clip_min, clip_max).astype(dtype)

  if random_start:
    if l2:
      k_dir, k_norm = jax.random.split(rng)
      direction = _l2_normalize(jax.random.normal(k_dir, x.shape, dtype))
      radius = jax.random.uniform(k_norm, (x.shape[0],) + (1,) * (x.ndim - 1), dtype)
      start = x + direction * radius * eps
    else:
      start = x + jax.random.uniform(rng, x.shape, dtype, -eps, eps)
    start = jnp.clip(start, clip_min, clip_max).astype(dtype)
  else:
    start = x

  stateful = state is not None
  if stateful:
    grad_fn = jax.grad(lambda z, st, i: _summed(loss_fn(z, y, st, i)), has_aux=True)
  else:
    plain = jax.grad(lambda z: jnp.sum(loss_fn(z, y)))
    grad_fn = lambda z, st, i: (plain(z), st)
  ascent = -1.0 if targeted else 1.0

  def body(i, carry):
    z, st = carry
    g, st = grad_fn(z, st, i)
    direction = _l2_normalize(g) if l2 else jnp.sign(g)
    return project(z + (ascent * step_size) * direction.astype(dtype)), st

  if unroll is None:
    unroll = True if jax.default_backend() == "cpu" else 1
  x_adv, state = jax.lax.fori_loop(0, steps, body, (start, state), unroll=unroll)
  x_adv = jax.lax.stop_gradient(x_adv.astype(dtype))
  return (x_adv, jax.lax.stop_gradient(state)) if stateful else x_adv


def random_other_class(rng: Array, labels: Array, num_classes: int) -> Array:
  """A class drawn uniformly from the ``num_classes − 1`` classes other than
  ``labels`` (``PGDTarget``'s random wrong target, re-drawn there until it
  differs); ``-1`` stays ``-1`` (unlabelled)."""
  if num_classes < 2:
    raise RegistryError(f"a random wrong target needs >= 2 classes, got num_classes={num_classes}.")
  offset = jax.random.randint(rng, labels.shape, 1, num_classes, dtype=labels.dtype)
  return jnp.where(labels >= 0, (labels + offset) % num_classes, labels)


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
  if ctx.forward is None:
    return fgsm(ctx.cross_entropy, ctx.x, ctx.attack_labels(labels), eps=eps)
  return fgsm(ctx.cross_entropy_pass, ctx.x, ctx.attack_labels(labels), eps=eps,
              state=ctx.stats)


@PERTURBATIONS.register("pgd")
def pgd_perturbation(ctx: PerturbContext, eps: float = 8 / 255, step_size: float = 2 / 255,
                     steps: int = 10, norm: str = "linf", random_start: bool = True,
                     labels: str = "true", target: str = "none") -> Array:
  """PGD on the module's cross-entropy: :func:`pgd` with ``loss_fn =
  ctx.cross_entropy`` and the random start drawn from ``ctx.rng``.

  Defaults are Hendrycks et al.'s ``PGD_linf`` for training (ε = 8/255, step
  2/255, 10 steps); their test attack is ``pgd(steps=20)``.
  ``target='none'``: untargeted on ``ctx.attack_labels(labels)``;
  ``target='random'``: ``PGDTarget``, descending on the cross-entropy to a
  class drawn uniformly among the others (from ``ctx.rng``). Masked and
  unlabelled examples (no loss) are returned clean, without the random start.
  """
  _check_eps(eps)
  _check_eps(step_size, "step_size")
  _check_steps(steps)
  _check_choice(norm, "norm", NORMS)
  _check_choice(target, "target", TARGETS)
  _check_labels_choice(labels)
  start_rng, target_rng = jax.random.split(ctx.rng)
  y = ctx.attack_labels(labels)
  if target == "random":
    y = random_other_class(target_rng, y, ctx.num_classes)
  options = dict(eps=eps, step_size=step_size, steps=steps, norm=norm, rng=start_rng,
                 random_start=random_start, targeted=target == "random")
  if ctx.forward is None:
    x_adv, stats = pgd(ctx.cross_entropy, ctx.x, y, **options), None
  else:
    x_adv, stats = pgd(ctx.cross_entropy_pass, ctx.x, y, state=ctx.stats, **options)
  attacked = ((y >= 0) & ctx.mask).reshape((-1,) + (1,) * (ctx.x.ndim - 1))
  x_adv = jnp.where(attacked, x_adv, ctx.x)
  return x_adv if ctx.forward is None else (x_adv, stats)


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
    if "steps" in fn.keywords:
      _check_steps(fn.keywords["steps"])
    if "norm" in fn.keywords:
      _check_choice(fn.keywords["norm"], "norm", NORMS)
    if "target" in fn.keywords:
      _check_choice(fn.keywords["target"], "target", TARGETS)
  except RegistryError as e:
    raise RegistryError(f"{where}: perturbation {fn.spec_name!r}: {e}") from None
  return fn
