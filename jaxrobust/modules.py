"""Modules: the named networks a run trains, each with its own optimizer.

The train state holds one :class:`~jaxrobust.train_state.ModuleState` (params,
batch stats, optax state) per module. The default run has one module,
``classifier``, described by ``config.model`` / ``config.optimizer`` /
``config.init_from``; methods add more in ``config.modules`` (a linear probe, a
GAN's generator and discriminator)::

    config.modules.probe = dict(model=dict(name='linear', kwargs={}),
                                input_shape=(64,), optimizer=dict(learning_rate=0.01))

A :class:`Module` also owns the **input convention**: image modules take
images in ``[0, 1]`` (pixel space) and normalise them with ``config.data.mean``
/ ``std`` inside :meth:`Module.apply`; modules with an ``input_shape`` of their
own (features, noise vectors) take their input as is.

**What trains** (last-layer fine-tuning, DFR): ``trainable`` is a regex
matched against the full ``/``-joined parameter path (``'head/.*'``); the
other parameters get no gradient, no update and no weight decay
(``optax.multi_transform`` with ``set_to_zero``). ``freeze_bn=True`` runs the
module in eval mode while training (BatchNorm uses and keeps its running
statistics; dropout is off), as when only a new head is fitted on frozen
features.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxrobust.data import pp

Array = jax.Array
CLASSIFIER = "classifier"


@dataclasses.dataclass(frozen=True, eq=False)
class Module:
  """One trainable network and how it is fed and optimised.

  Attributes:
    name: key in the train state (``classifier``, ``probe``, ...).
    model: the flax module: a classifier returns ``(logits, features)`` (and
      a dict of extra heads) with ``return_features=True``; any other module
      returns a dict of named outputs (a generator ``{'images': ...}``, a
      discriminator ``{'score': ...}``).
    num_classes: its number of classes, or None for a module without classes.
    input_shape: one example's input shape (for initialisation).
    mean: per-channel mean of the normalisation of ``[0, 1]`` images, or
      None when the module does not take images.
    std: per-channel standard deviation of that normalisation, or None.
    tx: its optax transformation (frozen parameters already masked out).
    schedule: its learning-rate schedule (for logging).
    trainable: regex over parameter paths that are trained.
    freeze_bn: run in eval mode while training.
  """
  name: str
  model: nn.Module
  num_classes: int | None
  input_shape: tuple[int, ...]
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  trainable: str = ".*"
  freeze_bn: bool = False
  heads: tuple[str, ...] = ()  # extra heads (config.model.heads): outputs 'head:<name>'

  @property
  def takes_images(self) -> bool:
    return self.mean is not None

  def normalize(self, x: Array) -> Array:
    """``[0, 1]`` pixels (or uint8) -> ``(x - mean) / std`` per channel."""
    x = pp.to_unit_range(x)
    if not self.takes_images:
      return x
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (x - mean) / std

  def apply_outputs(self, variables: Mapping[str, Any], x: Array, *, train: bool,
                    rng: Array | None = None, update_stats: bool = True
                    ) -> tuple[dict[str, Array], Any]:
    """``({'logits' float32, 'features', 'head:<name>' float32 per extra
    head}, new batch stats or None)`` of a classifier; a module that returns a
    dict of named outputs gives that dict (floating outputs other than
    ``images`` and ``features`` in float32).

    ``train`` selects train mode unless the module freezes BatchNorm;
    ``update_stats=False`` discards the statistics a train-mode pass
    computes (an attack's or a term's extra passes).
    """
    x = self.normalize(x) if self.takes_images else x
    train = train and not self.freeze_bn
    rngs = {"dropout": rng} if (train and rng is not None) else None
    if train:
      out, mutated = self.model.apply(
          dict(variables), x, train=True, return_features=True,
          mutable=["batch_stats"], rngs=rngs)
      new_stats = mutated.get("batch_stats", {}) if update_stats else None
    else:
      out = self.model.apply(dict(variables), x, train=False, return_features=True)
      new_stats = None
    if isinstance(out, Mapping):
      return {k: v.astype(jnp.float32) if k not in ("images", "features") else v
              for k, v in out.items()}, new_stats
    logits, features, heads = out if len(out) == 3 else (*out, {})
    outputs = {"logits": logits.astype(jnp.float32), "features": features}
    # extra heads are identifiers (head:<name>); names with a '/' are the
    # model's own named outputs (CBAM's attention/<block>/<kind>), kept as is
    outputs.update({n if "/" in n else f"head:{n}": v.astype(jnp.float32)
                    for n, v in heads.items()})
    return outputs, new_stats

  def apply(self, variables: Mapping[str, Any], x: Array, *, train: bool,
            rng: Array | None = None, update_stats: bool = True
            ) -> tuple[Array, Array, Any]:
    """``(logits float32, features, new batch stats or None)``: see
    :meth:`apply_outputs` (extra heads left out)."""
    outputs, new_stats = self.apply_outputs(variables, x, train=train, rng=rng,
                                            update_stats=update_stats)
    return outputs["logits"], outputs["features"], new_stats

  def logits_fn(self, variables: Mapping[str, Any], *, train: bool,
                rng: Array | None = None) -> Callable[[Array], Array]:
    """``x -> logits`` with fixed variables and no statistics updates (for
    attacks and input-gradient scores)."""
    return lambda x: self.apply(variables, x, train=train, rng=rng, update_stats=False)[0]

  def init(self, rng: Array) -> tuple[Any, Any]:
    """Fresh ``(params, batch_stats)``."""
    params_rng, dropout_rng = jax.random.split(rng)
    x = jnp.zeros((1,) + tuple(self.input_shape), jnp.float32)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, x, train=False)
    return variables["params"], variables.get("batch_stats", {})

  def init_rng(self, rng: Array) -> Array:
    """This module's initialisation key: depends on the run's key and the
    module's name only, not on which other modules exist."""
    return jax.random.fold_in(rng, zlib.crc32(self.name.encode()) % (2**31))


def flat(tree: Any) -> dict[str, Any]:
  """``{'a/b/kernel': leaf}`` of a nested dict (empty for an empty tree)."""
  return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def unflat(d: Mapping[str, Any]) -> Any:
  return traverse_util.unflatten_dict(dict(d), sep="/") if d else {}


def trainable_paths(params: Any, pattern: str, where: str) -> list[str]:
  """Parameter paths fully matched by ``pattern``; an error if none is."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{where}: {pattern!r} is not a regular expression ({e}).") from None
  paths = list(flat(params))
  chosen = [p for p in paths if regex.fullmatch(p)]
  if not chosen:
    sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
    raise ValueError(f"{where}={pattern!r} matches no parameter (it must match the whole "
                     f"'/'-joined path; the model has: {sample}).")
  return chosen


def masked_tx(tx: optax.GradientTransformation, pattern: str
              ) -> optax.GradientTransformation:
  """``tx`` on the parameters whose path matches ``pattern``; the others get
  zero updates and no optimizer state."""
  if pattern in (".*", ""):
    return tx
  regex = re.compile(pattern)

  def labels(params):
    return unflat({p: "train" if regex.fullmatch(p) else "freeze" for p in flat(params)})

  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def split_trainable(params: Any, pattern: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) flat dicts of ``params``."""
  f = flat(params)
  if pattern in (".*", ""):
    return f, {}
  regex = re.compile(pattern)
  return ({p: v for p, v in f.items() if regex.fullmatch(p)},
          {p: v for p, v in f.items() if not regex.fullmatch(p)})


def image_modules(modules: Mapping[str, Module]) -> Sequence[str]:
  return [n for n, m in modules.items() if m.takes_images]
