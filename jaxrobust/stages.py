"""Recipes: ordered stages, each a task, passing artifacts forward.

A config with ``config.stages`` is a recipe::

    c.stages.pretrain = dict(task='train', config=dict(data=dict(name='glyphs'), num_epochs=2))
    c.stages.finetune = dict(task='train', config=dict(
        init_from=dict(path='artifact:pretrain/checkpoint'),
        optimizer=dict(learning_rate=0.001)))

Each stage runs in ``<workdir>/<stage>/`` with the recipe's config updated by
the stage's ``config`` overrides (every stage's config is merged and validated
before the first stage starts, so a typo in the last stage fails at once).
Stages run in data-flow order: after every stage they take an artifact from
and the stages named in their ``after`` tuple (ties by name; a ConfigDict does
not keep the order its keys were written in). The other keys of a stage are
the options of its task, checked against the task's signature. Tasks are registered in :data:`TASKS`::

    @TASKS.register("pseudo_label")
    def pseudo_label(ctx: StageContext, *, threshold=0.3) -> dict[str, float]: ...

``train`` (:func:`jaxrobust.trainer.train_and_evaluate`) and ``predict``
(:func:`predict_task`) are built in; methods add theirs (``glc_matrix``,
``target_prior``, ...). A task returns its results (flat floats) and writes
artifacts with ``ctx.artifacts.save(name, arrays)``; later stages read them as
``'artifact:<stage>/<name>'`` (:mod:`jaxrobust.artifacts`). A ``train``
stage's checkpoint is ``'artifact:<stage>/checkpoint'``.

**Restart.** A finished stage writes ``<workdir>/<stage>/DONE.json`` (its
results) atomically and is skipped when the recipe is run again; an interrupted
``train`` stage resumes from its own checkpoint; other tasks run again from the
start. The same command runs a one-stage config or a recipe:
``python -m launch.train --config RECIPE --workdir DIR``. The top-level
``<workdir>/results.json`` holds every stage's results under its name
(``finetune/test/accuracy``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import config as config_lib
from jaxrobust.registry import Registry, RegistryError, suggest

log = logging.getLogger("jaxrobust")

TASKS = Registry("stage task")
DONE = "DONE.json"
STAGE_KEYS = ("task", "config", "after")


@dataclasses.dataclass
class StageContext:
  """What a stage task gets.

  Attributes:
    name: the stage's name.
    workdir: the stage's directory ``<recipe workdir>/<stage>``.
    config: the recipe's config with this stage's overrides, validated.
    artifacts: reads earlier stages' artifacts and writes this stage's.
  """
  name: str
  workdir: str
  config: ml_collections.ConfigDict
  artifacts: artifacts_lib.Artifacts


def _plain(x: Any) -> Any:
  return x.to_dict() if hasattr(x, "to_dict") else x


def merge(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str
          ) -> ml_collections.ConfigDict:
  """``config`` (its stages removed) with nested ``overrides`` applied.

  Sub-dicts are updated key by key, so a stage can change one option of one
  stream; an empty mapping replaces (``evaluators={'ood': {'sets': {}}}``
  removes the OOD sets), and ``None`` removes one entry of a free-form
  sub-dict (``losses={'cross_entropy': None}``). Unknown keys raise naming
  ``where``.
  """
  out = copy.deepcopy(config)
  out.unlock()  # config_flags locks the recipe; free-form sub-dicts (evaluators, constants) grow
  out.stages = ml_collections.ConfigDict()

  def apply(target, upd, path):
    for k, v in upd.items():
      key = f"{path}.{k}"
      if (hasattr(v, "items") and len(v) and k in target
          and isinstance(target[k], ml_collections.ConfigDict)):
        apply(target[k], v, key)
        continue
      free = any(key.startswith(f"{where}.{f}") for f in config_lib.FREE_FORM)
      if v is None and free:  # None removes an entry of a free-form sub-dict (a loss term)
        if k in target:
          del target[k]
        continue
      if k not in target and not free:
        raise ValueError(f"{key}: no such key in the config{suggest(k, target.keys())}.")
      value = ml_collections.ConfigDict(_plain(v)) if hasattr(v, "items") else _plain(v)
      try:
        target[k] = value
      except TypeError:  # another type than the default (a score list given as a mapping)
        del target[k]
        target[k] = value

  apply(out, _plain(overrides) or {}, where)
  return out


def stage_configs(config: ml_collections.ConfigDict) -> dict[str, tuple[str, dict, Any]]:
  """``{stage: (task name, task options, merged config)}`` in run order, all
  checked: tasks and their options, configs, and every ``artifact:``
  reference names another stage of the recipe (which then runs first)."""
  from jaxrobust import methods  # noqa: F401  (registers every method's tasks)
  names = list(config.stages.keys())
  checked, uses = {}, {}
  for name in names:
    where = f"config.stages.{name}"
    stage = _plain(config.stages[name])
    if not isinstance(stage, Mapping) or "task" not in stage:
      raise RegistryError(f"{where} needs a 'task' ({', '.join(TASKS.names())}).")
    options = {k: v for k, v in stage.items() if k not in STAGE_KEYS}
    task = stage["task"]
    TASKS.resolve({"name": task, **options}, where=where, runtime=("ctx",))
    merged = merge(config, stage.get("config") or {}, f"{where}.config")
    try:
      config_lib.validate(merged)
    except ValueError as e:
      raise ValueError(f"{where} (the stage's merged config): {e}") from None
    refs = artifacts_lib.find_refs(merged.to_dict()) + artifacts_lib.find_refs(options)
    uses[name] = set()
    for key, ref in refs:
      stage_name = artifacts_lib.parse_ref(ref, f"{where}: {key}")[0]
      if stage_name not in names:
        raise artifacts_lib.ArtifactError(
            f"{where}: {key}={ref!r} refers to stage {stage_name!r}, which is not in the "
            f"recipe{suggest(stage_name, names)}; stages: {', '.join(names)}.")
      if stage_name == name:
        raise artifacts_lib.ArtifactError(f"{where}: {key}={ref!r} refers to its own stage.")
      uses[name].add(stage_name)
    checked[name] = (task, options, merged)
  return {n: checked[n] for n in config_lib.order(config.stages, "config.stages",
                                                   implicit=uses)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs a one-stage config (in ``workdir``) or a recipe (stage by stage)."""
  from jaxrobust import trainer
  if not len(config.stages):
    return trainer.train_and_evaluate(config, workdir)
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  plan = stage_configs(config)
  names = list(plan)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    trainer.write_json(os.path.join(workdir, "config.json"),
                       json.loads(config.to_json_best_effort()))
  results: dict[str, float] = {}
  for name, (task, options, merged) in plan.items():
    stage_dir = os.path.join(workdir, name)
    done = os.path.join(stage_dir, DONE)
    if os.path.exists(done):
      with open(done, encoding="utf-8") as f:
        stage_results = json.load(f)["results"]
      log.warning("stage %s: done, skipped (%s)", name, done)
    else:
      os.makedirs(stage_dir, exist_ok=True)
      log.warning("stage %s: task %s", name, task)
      ctx = StageContext(name, stage_dir, merged, artifacts_lib.Artifacts(workdir, names, name))
      fn = TASKS.build({"name": task, **options}, where=f"config.stages.{name}",
                       runtime=("ctx",))
      stage_results = {k: float(v) for k, v in (fn(ctx) or {}).items()}
      if jax.process_index() == 0:
        trainer.write_json(done, {"task": task, "results": stage_results})
      if jax.process_count() > 1:  # the stage's artifacts, written by process 0, are in place
        multihost_utils.sync_global_devices(f"jaxrobust stage {name} done")
    results.update({f"{name}/{k}": v for k, v in stage_results.items()})
  if jax.process_index() == 0:
    trainer.write_json(os.path.join(workdir, "results.json"), results)
  return results


@TASKS.register("train")
def train_task(ctx: StageContext) -> dict[str, float]:
  """Trains and evaluates (:func:`jaxrobust.trainer.train_and_evaluate`) in
  the stage's directory; its checkpoint is ``artifact:<stage>/checkpoint``."""
  from jaxrobust import trainer
  return trainer.train_and_evaluate(ctx.config, ctx.workdir, artifacts=ctx.artifacts)


def _built_modules(config: ml_collections.ConfigDict):
  """(num_classes, image_shape, modules) of a config, as the trainer builds them."""
  from jaxrobust import trainer
  from jaxrobust.data import pipeline, sources
  spec = sources.get_spec(config.data.name, data_dir=config.data.data_dir)
  num_classes = trainer.resolve_num_classes(config, spec)
  image_shape = pipeline.image_shape(spec, config.data.image_size)
  return num_classes, image_shape, trainer.build_modules(
      config, num_classes=num_classes, image_shape=image_shape, total_steps=1, steps_per_epoch=1.0)


def _checkpoint_path(ctx: StageContext, checkpoint: str) -> str:
  where = f"config.stages.{ctx.name}.checkpoint"
  return (ctx.artifacts.path(checkpoint, where) if artifacts_lib.is_ref(checkpoint)
          else os.path.abspath(checkpoint))


def check_label_space(params: Any, num_classes: int, *, where: str, data: str) -> None:
  """Raises when a checkpoint's ``head`` has another number of classes than
  the model the stage builds for ``data`` (e.g. a teacher or source model of
  another label space), before anything is compiled."""
  head = params.get("head") if hasattr(params, "get") else None
  kernel = head.get("kernel") if hasattr(head, "get") else None
  if kernel is not None and kernel.shape[-1] != num_classes:
    raise RegistryError(
        f"{where}: the checkpoint's head has {kernel.shape[-1]} classes, but the stage's model "
        f"has {num_classes} (config.data.name={data!r}); the checkpoint was trained on another "
        "label space.")


def predict_outputs(ctx: StageContext, *, checkpoint: str, data: str = "", split: str = "train",
                    fields: Sequence[str] = ("logits", "label"), module: str = "classifier"
                    ) -> dict[str, Any]:
  """Per-example outputs of a checkpoint's ``module`` over ``data:split``
  (default: the task's dataset), in dataset index order: the ``predict``
  task without the saving, for method tasks."""
  from jaxrobust import predict as predict_lib
  from jaxrobust import scores as scores_lib
  from jaxrobust import sharding as sharding_lib
  from jaxrobust.checkpoint import load_pretrained
  from jaxrobust.data import pipeline
  config = ctx.config
  where = f"config.stages.{ctx.name}"
  _, _, modules = _built_modules(config)
  if module not in modules:
    raise RegistryError(f"{where}.module={module!r}: no such module ({sorted(modules)}).")
  score_names = [f for f in fields if f not in predict_lib.BASE_FIELDS]
  scores = {f: scores_lib.build(f, where=f"{where}.fields") for f in score_names}
  source = pipeline.load_split(data or config.data.name, split, data_dir=config.data.data_dir,
                               cache=config.data.cache, image_size=config.data.image_size)
  params, stats = load_pretrained(_checkpoint_path(ctx, checkpoint), module=module,
                                  where=f"{where}.checkpoint")
  check_label_space(params, modules[module].num_classes, where=f"{where}.checkpoint",
                    data=config.data.name)
  mesh = sharding_lib.make_mesh(config.mesh)
  predictor = predict_lib.Predictor(
      modules[module], batch_size=config.eval_batch_size,
      batch_sharding=sharding_lib.data_sharding(mesh, config.data_axes))
  return predictor({"params": params, "batch_stats": stats}, source, fields=fields, scores=scores)


def evaluation_setup(ctx: StageContext, config: ml_collections.ConfigDict, checkpoint: str, *,
                     modules: Sequence[str] | None = None, save_dir: str | None = None):
  """The evaluators of ``config.evaluators`` and an ``EvalState`` holding
  ``checkpoint``'s variables for ``modules`` (default: every module of the
  config), for stage tasks that evaluate without training. ``checkpoint``: a
  path or an ``artifact:`` reference."""
  from jaxrobust import evaluators as evaluators_lib
  from jaxrobust import sharding as sharding_lib
  from jaxrobust.checkpoint import load_pretrained
  from jaxrobust.train_state import ModuleState
  where = f"config.stages.{ctx.name}"
  num_classes, image_shape, built = _built_modules(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  evaluators = evaluators_lib.build_evaluators(
      config, built, num_classes=num_classes, image_shape=image_shape,
      batch_sharding=sharding_lib.data_sharding(mesh, config.data_axes),
      save_dir=save_dir, artifacts=ctx.artifacts)
  path = _checkpoint_path(ctx, checkpoint)
  state = EvalState({name: ModuleState(*load_pretrained(path, module=name,
                                                         where=f"{where}.checkpoint"), None)
                     for name in (modules or built)})
  return evaluators, state


@TASKS.register("evaluate")
def evaluate_task(ctx: StageContext, *, checkpoint: str) -> dict[str, float]:
  """Runs the config's evaluators (``config.evaluators``) on a checkpoint,
  without training: e.g. scores tuned by later stages (``tune_score``) on
  the model an earlier stage trained. Writes ``results.json`` and plots in
  the stage's directory, like a train stage."""
  from jaxrobust import evaluators as evaluators_lib
  from jaxrobust import trainer
  config = ctx.config
  config_lib.validate(config)
  evaluators, state = evaluation_setup(ctx, config, checkpoint,
                                       save_dir=os.path.join(ctx.workdir, "artifacts"))
  results = evaluators_lib.run(evaluators, state, final=True,
                               plots_dir=os.path.join(ctx.workdir, "plots") if config.plots
                               else None)
  if jax.process_index() == 0:
    trainer.write_json(os.path.join(ctx.workdir, "results.json"), results)
  return results


class EvalState:
  """What evaluators read of a train state: the modules' variables."""

  def __init__(self, modules):
    self.modules = modules


@TASKS.register("predict")
def predict_task(ctx: StageContext, *, checkpoint: str, data: str = "", split: str = "train",
                 fields: Sequence[str] = ("logits", "label"), name: str = "predictions",
                 module: str = "classifier") -> dict[str, float]:
  """Per-example outputs of a trained module over a split, in dataset index
  order, saved as the npz artifact ``name`` (one array per field, plus
  ``index``).

  Args:
    checkpoint: a run's checkpoint: ``'artifact:<stage>/checkpoint'`` or a path.
    data: dataset (default: ``config.data.name``).
    split: its split.
    fields: :mod:`jaxrobust.predict` fields (``logits``, ``features``,
      ``probs``, ``label``, ``correct``, ``nll``, or a score name).
    name: the artifact's name.
    module: which module of the checkpoint.
  """
  import numpy as np
  out = predict_outputs(ctx, checkpoint=checkpoint, data=data, split=split, fields=fields,
                        module=module)
  n = len(next(iter(out.values())))
  out["index"] = np.arange(n, dtype=np.int64)
  ctx.artifacts.save(name, out)
  return {f"{name}/num_examples": float(n)}
