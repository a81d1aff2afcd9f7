"""Evaluators, chosen by type in config and run at the end and every N steps.

``config.evaluators`` maps a key to a typed evaluator::

    evaluators.classification = dict(type='classification', splits=('validation', 'test'))
    evaluators.ood = dict(type='ood', sets={'blobs': 'blobs/gray:test'}, scores=('msp', 'energy'))
    evaluators.robust = dict(type='robust', attacks={'fgsm': 'fgsm(eps=8/255)'})
    evaluators.groups = dict(type='groups', splits=('test',), weights_split='train')

Every key but ``type``, ``every_steps`` (default ``config.eval_every_steps``;
``<= 0``: only at the end) and ``module`` (default ``classifier``) is an option
of the registered evaluator class, checked against its constructor. With
``save=True`` the final evaluation also writes its per-example outputs to
``<workdir>/artifacts/`` (a stage's artifacts: bootstrap intervals, plots). An
evaluator is ``cls(ctx: EvalContext, **options)`` -- the constructor loads and
checks its data, so bad input fails before any compilation -- with
``evaluate(state, *, plots_dir=None, final=False) -> {result key: float}``.

Evaluators of one round share predictions through the context (the test
split's logits are computed once for the classification and OOD evaluators).
Result keys are flat and name what they measure: ``test/accuracy``,
``ood/<score>/<set>/<metric>``, ``robust/<attack>/accuracy``,
``test/worst_group_accuracy`` (:mod:`jaxrobust.evaluators.groups`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from jaxrobust import files
from jaxrobust.data import pipeline
from jaxrobust.data.settings import DataSettings
from jaxrobust.modules import CLASSIFIER, Module
from jaxrobust.predict import Predictor
from jaxrobust.registry import Registry, RegistryError

#: Evaluator classes by ``type``.
EVALUATORS = Registry("evaluator")
COMMON_KEYS = ("type", "every_steps", "module")


@dataclasses.dataclass
class EvalContext:
  """What an evaluator gets: its module, how to predict, and the data
  settings -- not the run's config.

  Attributes:
    data: how splits are read, the task's dataset and training split, the
      seed (:class:`~jaxrobust.data.settings.DataSettings`).
    modules: name -> :class:`~jaxrobust.modules.Module`.
    module: the module this evaluator evaluates.
    predictor: compiled per-example predictions of that module.
    num_classes: K of the task.
    image_shape: (H, W, C) the module takes.
    where: the evaluator's config key, for messages.
    save_dir: where ``save`` writes per-example outputs.
    artifacts: resolves ``artifact:`` references (scores tuned by a stage).
  """
  data: DataSettings
  modules: Mapping[str, Module]
  module: str
  predictor: Predictor
  num_classes: int
  image_shape: tuple[int, int, int]
  where: str
  save_dir: str | None = None
  artifacts: Any = None
  _round: dict[Any, Any] = dataclasses.field(default_factory=dict)
  _loaded: dict[Any, Any] = dataclasses.field(default_factory=dict)

  def load(self, name: str, split: str, *, key: str, rgb: bool = False) -> Any:
    """A split's source (cached), checked to have the module's image shape;
    ``rgb``: one-channel images are repeated into three first."""
    cache_key = (name, split) + (("rgb",) if rgb else ())
    if cache_key not in self._loaded:
      spec = self.data.spec(name)
      got = pipeline.image_shape(spec, self.data.image_size)
      if rgb and got[2] == 1:
        got = got[:2] + (3,)
      if got != tuple(self.image_shape):
        raise ValueError(f"{self.where}.{key}: {name}:{split} has images of shape {got}; the "
                         f"model takes {tuple(self.image_shape)}.")
      if spec.splits and split not in spec.splits and "[" not in split and "+" not in split:
        raise ValueError(f"{self.where}.{key}: dataset {name!r} has no split {split!r}; it has "
                         f"{sorted(spec.splits)}.")
      source = self.data.load(name, split)
      self._loaded[cache_key] = pipeline.to_rgb(source) if rgb else source
    return self._loaded[cache_key]

  def predict(self, state: Any, source: Any, fields, *, perturb=None, perturb_key: str = "",
              scores: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Predictions of this round, cached by (source, fields, perturbation,
    scores); scores with a ``fit`` are fitted once per round."""
    scores = dict(scores or {})
    key = (id(source), tuple(fields), perturb_key,
           tuple(sorted((n, getattr(s, "key", str(id(s)))) for n, s in scores.items())))
    if key not in self._round:
      variables = state.modules[self.module].variables
      fitted = {n: self.fitted(state, s) for n, s in scores.items()
                if getattr(s, "fit", None) is not None}
      self._round[key] = self.predictor(variables, source, fields=fields, perturb=perturb,
                                        perturb_key=perturb_key, scores=scores, fitted=fitted)
      self._round[("pinned", key)] = (source, scores)  # the objects whose ids are in the key
    return self._round[key]

  def fitted(self, state: Any, score: Any) -> Any:
    """A score's fit on this round's model (computed once per round)."""
    key = ("fit", score.fit_key or score.key)
    if key not in self._round:
      ctx = FitContext(self, state.modules[self.module].variables,
                       f"{self.where}.scores.{score.name}")
      self._round[key] = score.fit(ctx)
    return self._round[key]

  def new_round(self) -> None:
    self._round.clear()

  def save(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes per-example outputs to ``<workdir>/artifacts/<name>.npz`` (a
    stage's artifacts, for a recipe), from process 0."""
    if self.save_dir is None:
      raise ValueError(f"{self.where}: this evaluator has nowhere to save outputs.")
    if jax.process_index() == 0:
      files.write_npz(os.path.join(self.save_dir, name + ".npz"), arrays, what="evaluator output")


@dataclasses.dataclass
class FitContext:
  """What a score's ``fit`` sees: the evaluated module's variables and ways to
  run it over whole splits (sharded, in padded batches).

  Attributes:
    eval: the evaluator's context (data settings, module, predictions).
    variables: the module's current variables.
    where: the config key of the score, for messages.
  """
  eval: EvalContext
  variables: Any
  where: str

  @property
  def num_classes(self) -> int:
    return self.eval.num_classes

  def train_source(self) -> Any:
    """The task's training split (``config.streams.train.split`` of
    ``config.data.name``), read without augmentation."""
    return self.eval.load(self.eval.data.name, self.eval.data.train_split, key="fit")

  def predict(self, source: Any, fields) -> dict[str, np.ndarray]:
    return self.eval.predictor(self.variables, source, fields=fields)

  def reduce(self, source: Any, fn: Callable[..., Mapping[str, Any]], key: str,
             args: Any = None) -> dict[str, np.ndarray]:
    return self.eval.predictor.reduce(self.variables, source, fn, key, args)


class Evaluator:
  """Base class: stores the context and ``every_steps``."""
  every_steps: int = -1

  def __init__(self, ctx: EvalContext):
    self.ctx = ctx

  def evaluate(self, state: Any, *, plots_dir: str | None = None, final: bool = False
               ) -> dict[str, float]:
    raise NotImplementedError


def parse_set(entry: str, where: str) -> tuple[str, str]:
  """``'blobs/gray:test'`` -> (``'blobs/gray'``, ``'test'``); a sliced split
  keeps its colons (``'cifar10:train[49000:]'`` -> ``'train[49000:]'``)."""
  head, bracket, tail = str(entry).partition("[")
  name, _, split = head.rpartition(":")
  split += bracket + tail
  if not name:
    raise ValueError(f"{where}: {entry!r} must be 'dataset[/config]:split'.")
  return name, split


def build_evaluators(config: ml_collections.ConfigDict, modules: Mapping[str, Module], *,
                     num_classes: int, image_shape: tuple[int, int, int],
                     batch_sharding: jax.sharding.NamedSharding,
                     save_dir: str | None = None, artifacts: Any = None,
                     data: DataSettings | None = None) -> dict[str, Evaluator]:
  """Every evaluator of ``config.evaluators``, each given its own options and
  the run's :class:`~jaxrobust.data.settings.DataSettings` (``data``, default:
  from ``config``; :func:`make_evaluators`)."""
  return make_evaluators(
      {key: ev.to_dict() if hasattr(ev, "to_dict") else dict(ev)
       for key, ev in config.evaluators.items()},
      modules, data=data or DataSettings.from_config(config), num_classes=num_classes,
      image_shape=image_shape, batch_size=config.eval_batch_size,
      every_steps=config.eval_every_steps, batch_sharding=batch_sharding, save_dir=save_dir,
      artifacts=artifacts)


def make_evaluators(specs: Mapping[str, Mapping[str, Any]], modules: Mapping[str, Module], *,
                    data: DataSettings, num_classes: int, image_shape: tuple[int, int, int],
                    batch_size: int, every_steps: int,
                    batch_sharding: jax.sharding.NamedSharding, save_dir: str | None = None,
                    artifacts: Any = None, where: str = "config.evaluators"
                    ) -> dict[str, Evaluator]:
  """Evaluators from ``{key: {type, every_steps, module, **options}}``: data
  loaded and options checked; ``every_steps`` is the default of those that do
  not set it, ``save_dir`` receives per-example outputs of evaluators asked
  to save them."""
  out: dict[str, Evaluator] = {}
  predictors: dict[str, Predictor] = {}
  rounds: dict[str, dict] = {}  # per module: predictions shared by a round's evaluators
  loaded: dict = {}
  for key, cfg in specs.items():
    at = f"{where}.{key}"
    cfg = dict(cfg)
    if "type" not in cfg:
      raise RegistryError(f"{at} has no 'type' (one of {', '.join(EVALUATORS.names())}).")
    module = cfg.pop("module", CLASSIFIER)
    if module not in modules:
      raise RegistryError(f"{at}.module={module!r}: no such module; modules: "
                          f"{sorted(modules)}.")
    every = cfg.pop("every_steps", None)
    if module not in predictors:
      predictors[module] = Predictor(modules[module], batch_size=batch_size,
                                     batch_sharding=batch_sharding)
      rounds[module] = {}
    ctx = EvalContext(data, modules, module, predictors[module], num_classes, image_shape,
                      at, save_dir, artifacts, rounds[module], loaded)
    kind = cfg.pop("type")
    evaluator = EVALUATORS.build({"name": kind, **cfg}, where=at, runtime=("ctx",))(ctx)
    evaluator.every_steps = int(every_steps if every is None else every)
    out[key] = evaluator
  return out


def run(evaluators: Mapping[str, Evaluator], state: Any, *, step: int | None = None,
        plots_dir: str | None = None, final: bool = False) -> dict[str, float]:
  """Runs the evaluators due at ``step`` (all when ``step`` is None); ``final``
  marks the end-of-run evaluation (evaluators then save their outputs)."""
  results: dict[str, float] = {}
  for e in evaluators.values():
    e.ctx.new_round()
  for e in evaluators.values():
    if step is None or (e.every_steps > 0 and step % e.every_steps == 0):
      results.update(e.evaluate(state, plots_dir=plots_dir, final=final))
  for e in evaluators.values():
    e.ctx.new_round()
  return results


def take_images(evaluators: Mapping[str, Evaluator]) -> dict[str, np.ndarray]:
  """Images ``[N, H, W, C]`` in ``[0, 1]`` the evaluators drew in their last
  round (an evaluator's ``images`` dict, e.g. a generator's samples), by
  name; each evaluator's dict is emptied."""
  out: dict[str, np.ndarray] = {}
  for e in evaluators.values():
    out.update(getattr(e, "images", None) or {})
    if getattr(e, "images", None):
      e.images = {}
  return out


@functools.cache
def _register_builtin() -> None:
  from jaxrobust.evaluators import classification, groups, ood, robust, verification  # noqa: F401


_register_builtin()
