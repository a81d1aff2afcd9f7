"""Loss terms, composed from config into each update's loss.

A loss term is a small pure function registered by name::

    @LOSSES.register("cross_entropy")
    def cross_entropy(inputs: LossInputs, *, stream="train", ...) -> (loss, metrics)

``config.losses`` maps a key to the term's options plus

* ``weight`` (default 1) -- its factor in the sum;
* ``name`` -- the registered term, when the key is not its name (so one term
  can appear twice, e.g. on two streams);
* ``normalize_by`` -- the key of another term of the same update: the term's
  value is rescaled to that term's magnitude, ``weight · sg(L̄_other / L̄) · L``
  (the gradient keeps the direction of ``L`` and the size of ``L_other``:
  Zoph et al.'s loss normalisation), without the term knowing the other.
  ``L̄`` are the values of this batch, or, with ``normalize_momentum`` m > 0,
  bias-corrected moving averages ``L̄_t = m L̄_{t-1} + (1 - m) L_t`` kept in
  the train state (``TrainState.loss_stats``), as the paper defines them;
* ``head`` -- an extra head of the module (``config.model.heads``): the term
  reads that head's output as ``logits`` (and its width as ``num_classes``),
  so any term works on any head (joint training's source-task head, SimCLR's
  projection head).

Each update (:mod:`jaxrobust.train_step`) sums the terms it lists; the default
update sums them all. Every term reduces with its stream's validity ``mask`` so
padded examples never count; per-example ``weight`` fields (importance
weights) and ``soft_label`` rows (pseudo-labels) are honoured by
:func:`cross_entropy`.

A term that reads arrays made by an earlier stage (``config.constants``)
declares their shapes with ``info={'constants': fn}``, ``fn(options,
num_classes) -> {constant name: expected shape}``, so a K×K matrix for
another K fails before compilation; ``info={'check': fn}``, ``fn(options,
num_classes)`` raising :class:`~jaxrobust.registry.RegistryError`, checks
option values the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxrobust.metrics._validate import masked_mean as metrics_masked_mean
from jaxrobust.registry import Registry, RegistryError

Array = jax.Array

#: The loss terms by name (``config.losses``).
LOSSES = Registry("loss term")
#: The type of a composed loss, ``LossInputs -> (loss, {metric: value})``.
LossFn = Callable[["LossInputs"], tuple[Array, dict[str, Array]]]
COMPOSITION_KEYS = ("weight", "name", "normalize_by", "normalize_momentum", "head")


class _Outputs(dict):
  """A stream -> outputs mapping whose missing keys say what to do."""

  def __init__(self, data, module: str, streams: Sequence[str]):
    super().__init__(data)
    self.module, self.streams = module, tuple(streams)

  def __missing__(self, key):
    raise KeyError(
        f"stream {key!r} did not go through module {self.module!r} in this update (its "
        f"forward pass has {self.streams}); list it in the update's `streams` "
        "(config.updates.<name>.streams) or set config.streams.<name>.through_model=True.")


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What a loss term sees inside an update of the train step.

  Attributes:
    outputs: stream -> ``{'logits': [B·V, K] float32, 'features': [B·V, D]}``
      of the trained module, from ONE forward pass over the update's streams
      (concatenated, so BatchNorm sees them together as in the OE/energy code).
    batch: stream -> ``{'image' (uint8), 'label', 'mask', 'index', and the
      label source's fields: 'soft_label', 'weight', 'group'}``.
    images: stream -> the ``[0, 1]`` images actually fed (after pp and
      perturbation; ``[B·V, H, W, C]``).
    num_classes: K.
    params: the trained module's parameters (being differentiated).
    rng: a key for stochastic terms (already folded with the step).
    step: the global step (int32 scalar).
    constants: name -> array from ``config.constants`` (earlier stages).
    module: the trained module's name.
    call: ``call(module, x, *, train=False) -> {'logits', 'features'}`` runs
      any module: the trained one differentiably (with its current, traced
      parameters), others with gradients stopped. Train-mode calls use batch
      statistics but discard their updates.
    views: stream -> number of views (``outputs`` rows are view-major).
    axis_name: the device axis of the pmap form of the step (None under the
      global-view jit, where a batch is already the global batch): terms that
      need other devices' examples (SimCLR's negatives) gather over it.
    loss_stats: moving averages of term values (``normalize_momentum``).
  """
  outputs: Mapping[str, Mapping[str, Array]]
  batch: Mapping[str, Mapping[str, Array]]
  num_classes: int
  params: Any
  rng: Array
  step: Array
  images: Mapping[str, Array] = dataclasses.field(default_factory=dict)
  constants: Mapping[str, Array] = dataclasses.field(default_factory=dict)
  module: str = "classifier"
  call: Callable[..., Mapping[str, Array]] | None = None
  views: Mapping[str, int] = dataclasses.field(default_factory=dict)
  axis_name: str | None = None
  loss_stats: Mapping[str, Array] = dataclasses.field(default_factory=dict)

  def apply(self, x: Array, *, train: bool = True) -> Mapping[str, Array]:
    """The trained module on ``x`` (differentiable; no statistics update)."""
    return self.call(self.module, x, train=train)

  def view(self, stream: str, key: str = "logits") -> Array:
    """``outputs[stream][key]`` as ``[V, B, ...]``."""
    v = self.views.get(stream, 1)
    x = self.outputs[stream][key]
    return x.reshape((v, x.shape[0] // v) + x.shape[1:])


def masked_mean(values: Array, mask: Array | None, weights: Array | None = None) -> Array:
  """Mean of ``values`` over valid entries (optionally weighted); 0 if none
  (``jaxrobust.metrics._validate.masked_mean`` with ``empty=0``). ``mask=None``:
  every entry is valid."""
  mask = jnp.ones(jnp.shape(values), bool) if mask is None else jnp.asarray(mask, bool)
  return metrics_masked_mean(values, mask, weights, empty=0.0)


def _check_cross_entropy(options: Mapping[str, Any], num_classes: int | None) -> None:
  cw = options.get("class_weights")
  if cw is not None and num_classes is not None and len(cw) != num_classes:
    raise RegistryError(f"class_weights has {len(cw)} entries for {num_classes} classes.")
  if not 0 <= options.get("label_smoothing", 0.0) < 1:
    raise RegistryError(f"label_smoothing must be in [0, 1), got {options['label_smoothing']}.")


@LOSSES.register("cross_entropy", info={"check": _check_cross_entropy})
def cross_entropy(inputs: LossInputs, *, stream: str = "train",
                  label_smoothing: float = 0.0,
                  class_weights: tuple[float, ...] | None = None
                  ) -> tuple[Array, dict[str, Array]]:
  """Softmax cross-entropy with optional label smoothing and class weights.

  Targets are the stream's ``soft_label`` rows when its label source gives
  them (Noisy Student's soft pseudo-labels), else one-hot ``label``; rows
  with ``label = -1`` (unlabelled) do not count. With class
  weights ``w`` the reduction is PyTorch's ``CrossEntropyLoss(weight=w)``:
  ``sum_i w[y_i] l_i / sum_i w[y_i]`` over valid examples (class imbalance,
  Hendrycks et al. 2019 §4); a per-example ``weight`` field multiplies in the
  same way (importance weights).
  """
  batch = inputs.batch[stream]
  logits = inputs.outputs[stream]["logits"]
  labels, mask = batch["label"], batch["mask"]
  k = inputs.num_classes
  if logits.shape[0] != labels.shape[0]:
    raise RegistryError(f"cross_entropy: stream {stream!r} has {inputs.views.get(stream)} views; "
                        "a term for multi-view streams must handle them.")
  if "soft_label" in batch:
    targets = batch["soft_label"]
  else:
    targets = jax.nn.one_hot(labels, k)
    mask = mask & (labels >= 0)  # unlabelled rows (-1) do not count
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, targets)
  weights = batch.get("weight")
  if class_weights is not None:
    cw = jnp.asarray(class_weights, jnp.float32)
    if cw.shape != (k,):
      raise RegistryError(f"cross_entropy: class_weights has {cw.shape[0]} entries for {k} "
                          "classes.")
    weights = cw[labels] if weights is None else weights * cw[labels]
  loss = masked_mean(per_example, mask, weights)
  acc = masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)
  return loss, {f"{stream}/accuracy": acc}


@dataclasses.dataclass(frozen=True)
class Term:
  """One built loss term of ``config.losses``: its key, registered name,
  weight, normalisation and function."""
  key: str
  name: str
  weight: float
  normalize_by: str | None
  fn: Callable[..., tuple[Array, dict[str, Array]]]
  head: str | None = None
  normalize_momentum: float = 0.0


STATS = "loss_stats/"  # metric keys that are new moving averages, moved to the state


def normalized_keys(terms: Sequence[Term]) -> list[str]:
  """The term keys whose moving averages a step keeps (both sides of every
  ``normalize_by`` with ``normalize_momentum > 0``)."""
  keys = set()
  for t in terms:
    if t.normalize_by is not None and t.normalize_momentum > 0:
      keys.update((t.key, t.normalize_by))
  return sorted(keys)


def _on_head(inputs: LossInputs, head: str, key: str) -> LossInputs:
  """``inputs`` whose ``logits`` are the extra head ``head``'s outputs."""
  name = f"head:{head}"
  outputs = {}
  for s, o in inputs.outputs.items():
    if name not in o:
      have = sorted(k[5:] for k in o if k.startswith("head:"))
      raise RegistryError(f"config.losses.{key}.head={head!r}: module {inputs.module!r} has no "
                          f"such head (config.model.heads: {have}).")
    outputs[s] = {**o, "logits": o[name]}
  some = next(iter(outputs.values()), None)
  return dataclasses.replace(
      inputs, outputs=_Outputs(outputs, inputs.outputs.module, inputs.outputs.streams),
      num_classes=int(some["logits"].shape[-1]) if some is not None else inputs.num_classes)


def build_terms(losses: Mapping[str, Any], keys: Sequence[str] | None = None, *,
                num_classes: int | None = None,
                constants: Mapping[str, Any] | None = None,
                streams: Sequence[str] | None = None, where: str = "config.losses",
                resolve: Callable[[Any, str], Any] | None = None,
                heads: Sequence[str] | None = None) -> list[Term]:
  """The terms of ``config.losses`` named by ``keys`` (all when None), each
  with options checked against its signature, its streams and constants
  checked, before any compilation. ``resolve(value, where)`` replaces option
  values that are artifact references (a margin computed by an earlier
  stage) by what they point to."""
  losses = {k: dict(v) for k, v in dict(losses).items()}
  keys = list(losses) if keys is None else list(keys)
  if not keys:
    raise RegistryError(f"{where} is empty: nothing to train.")
  terms = []
  for key in keys:
    if key not in losses:
      from jaxrobust.registry import suggest
      raise RegistryError(f"{where}: no loss term {key!r}{suggest(key, losses)}; "
                          f"defined: {sorted(losses)}.")
    cfg = dict(losses[key])
    if resolve is not None:
      cfg = {k: resolve(v, f"{where}.{key}.{k}") for k, v in cfg.items()}
    weight = float(cfg.pop("weight", 1.0))
    name = cfg.pop("name", key)
    normalize_by = cfg.pop("normalize_by", None) or None
    momentum = float(cfg.pop("normalize_momentum", 0.0))
    head = cfg.pop("head", None) or None
    if not 0.0 <= momentum < 1.0:
      raise RegistryError(f"{where}.{key}.normalize_momentum must be in [0, 1), got {momentum}.")
    if momentum and normalize_by is None:
      raise RegistryError(f"{where}.{key}.normalize_momentum is set but normalize_by is not.")
    if head is not None and heads is not None and head not in heads:
      raise RegistryError(f"{where}.{key}.head={head!r}: the module has no such head "
                          f"(config.model.heads: {sorted(heads)}).")
    fn = LOSSES.build({"name": name, **cfg}, where=f"{where}.{key}", runtime=("inputs",))
    options = LOSSES.options_with_defaults(fn)
    for opt, value in options.items():
      if streams is not None and (opt == "stream" or opt.endswith("_stream")) and (
          value not in streams):
        raise RegistryError(f"{where}.{key}.{opt}={value!r}: there is no such stream "
                            f"(config.streams has {sorted(streams)}).")
    info = LOSSES.info(name)
    if "check" in info:
      try:
        info["check"](options, num_classes)
      except RegistryError as e:
        raise RegistryError(f"{where}.{key}: {e}") from None
    if "constants" in info:
      _check_constants(info["constants"](options, num_classes), constants or {},
                       f"{where}.{key}")
    terms.append(Term(key, name, weight, normalize_by, fn, head, momentum))
  known = [t.key for t in terms]
  for t in terms:
    if t.normalize_by is not None and t.normalize_by not in known:
      raise RegistryError(f"{where}.{t.key}.normalize_by={t.normalize_by!r} is not a term of "
                          f"the same update ({known}).")
  return terms


def _check_constants(expected: Mapping[str, tuple], constants: Mapping[str, Any],
                     where: str) -> None:
  for name, shape in expected.items():
    if name not in constants:
      raise RegistryError(f"{where}: needs constant {name!r}, which config.constants does not "
                          f"define (it has {sorted(constants)}).")
    got = tuple(getattr(constants[name], "shape", ()))
    if tuple(shape) != got:
      raise RegistryError(f"{where}: constant {name!r} has shape {got}; this term needs "
                          f"{tuple(shape)}.")


def compose(terms: Sequence[Term]) -> LossFn:
  """``inputs -> (total, metrics)``: the weighted (and normalised) sum."""

  tracked = normalized_keys(terms)
  momentum = {t.key: t.normalize_momentum for t in terms if t.normalize_momentum > 0}
  for t in terms:  # both sides of a normalisation average with the same momentum
    if t.key in momentum:
      momentum.setdefault(t.normalize_by, momentum[t.key])

  def total_loss(inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    values: dict[str, Array] = {}
    metrics: dict[str, Array] = {}
    for t in terms:
      value, extra = t.fn(_on_head(inputs, t.head, t.key) if t.head else inputs)
      values[t.key] = value
      metrics[f"loss/{t.key}"] = value
      metrics.update(extra)
    averages = {}
    for key in tracked:  # bias-corrected moving averages (Adam-style), from step 0
      m = momentum[key]
      raw = m * inputs.loss_stats.get(key, jnp.zeros((), jnp.float32)) + (
          1 - m) * jax.lax.stop_gradient(values[key])
      metrics[f"{STATS}{key}"] = raw
      averages[key] = raw / (1 - m ** (jnp.asarray(inputs.step, jnp.float32) + 1))
    total = jnp.zeros((), jnp.float32)
    for t in terms:
      value = values[t.key]
      if t.normalize_by is not None:
        num, den = ((averages[t.normalize_by], averages[t.key]) if t.normalize_momentum > 0
                    else (values[t.normalize_by], value))
        scale = jax.lax.stop_gradient(num / jnp.maximum(den, 1e-12))
        metrics[f"loss/{t.key}/scale"] = scale
        value = scale * value
      total = total + t.weight * value
    metrics["loss"] = total
    return total, metrics

  return total_loss


def build_loss(losses: Mapping[str, Any], **kwargs: Any) -> LossFn:
  """:func:`build_terms` + :func:`compose` for every term of ``losses``."""
  return compose(build_terms(losses, **kwargs))
