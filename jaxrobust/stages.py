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
the options of its task, checked against the task's signature. Tasks are
registered in :data:`jaxrobust.tasks.TASKS` (also reachable as
``stages.TASKS``)::

    @TASKS.register("pseudo_label")
    def pseudo_label(ctx: StageContext, *, threshold=0.3) -> dict[str, float]: ...

``train`` (:func:`jaxrobust.trainer.train`), ``predict`` and ``evaluate``
(:mod:`jaxrobust.tasks`) are built in; methods add theirs (``glc_matrix``,
``target_prior``, ...), found by name when a recipe names them. A task returns its results (flat floats) and writes
artifacts with ``ctx.artifacts.save(name, arrays)``; later stages read them as
``'artifact:<stage>/<name>'`` (:mod:`jaxrobust.artifacts`). A ``train``
stage's checkpoint is ``'artifact:<stage>/checkpoint'``.

**Restart.** A finished stage writes ``<workdir>/<stage>/DONE.json`` (its
results, and the task, options and merged config it ran with) atomically and
is skipped when the recipe is run again; a stage recorded with another task,
options or config is an error naming the keys that differ, before any stage
runs (its results would not be this config's); an interrupted
``train`` stage resumes from its own checkpoint; other tasks run again from the
start. SIGTERM (:mod:`jaxrobust.preemption`) stops a training stage after its
current step with a checkpoint, and any other stage when it has finished and
is recorded; the recipe then raises
:class:`~jaxrobust.preemption.PreemptedError` (``launch.train`` and
``launch.reproduce`` exit with 143). The same command runs a one-stage config or a recipe:
``python -m launch.train --config RECIPE --workdir DIR``. The top-level
``<workdir>/results.json`` holds every stage's results under its name
(``finetune/test/accuracy``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import ml_collections

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import config as config_lib
from jaxrobust import distributed
from jaxrobust import files
from jaxrobust import preemption
from jaxrobust import trainer
from jaxrobust.registry import RegistryError, Spec, suggest
from jaxrobust.tasks import TASKS, StageContext

log = logging.getLogger("jaxrobust")

DONE = "DONE.json"
STAGE_KEYS = ("task", "config", "after")


def _plain(x: Any) -> Any:
  return x.to_dict() if hasattr(x, "to_dict") else x


def merge(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str
          ) -> ml_collections.ConfigDict:
  """A stage's config: the recipe's ``config`` without its stages, with the
  stage's ``overrides`` applied (:func:`jaxrobust.config.merge`)."""
  base = copy.deepcopy(config)
  base.unlock()
  base.stages = ml_collections.ConfigDict()
  return config_lib.merge(base, overrides, where)


def stage_configs(config: ml_collections.ConfigDict) -> dict[str, tuple[str, dict, Any]]:
  """``{stage: (task name, task options, merged config)}`` in run order, all
  checked once: tasks and their options, configs, and every ``artifact:``
  reference names another stage of the recipe (which then runs first)."""
  names = list(config.stages.keys())
  checked, uses = {}, {}
  for name in names:
    where = f"config.stages.{name}"
    stage = _plain(config.stages[name])
    if not isinstance(stage, Mapping) or "task" not in stage:
      raise RegistryError(f"{where} needs a 'task' ({', '.join(TASKS.names())}).")
    options = {k: v for k, v in stage.items() if k not in STAGE_KEYS}
    task = stage["task"]
    _, bound = TASKS.resolve(Spec(task, (), options), where=where, runtime=("ctx",))
    check = getattr(TASKS.get(task, where), "check_options", None)
    if check is not None:  # the task's own checks of its option values, before any stage runs
      check(where, **bound)
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
  if not len(config.stages):
    return trainer.train_and_evaluate(config, workdir)
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  plan = stage_configs(config)
  names = list(plan)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "config.json"),
                     json.loads(config.to_json_best_effort()), what="config")
  made = {name: _made(task, options, merged) for name, (task, options, merged) in plan.items()}
  for name in plan:
    _check_record(workdir, name, made[name])
  results: dict[str, float] = {}
  with preemption.watching():
    for i, (name, (task, options, merged)) in enumerate(plan.items()):
      results.update({f"{name}/{k}": v for k, v in _run_stage(
          workdir, names, name, task, options, merged, made[name]).items()})
      # One process stops between stages on SIGTERM; several stop together
      # inside the next stage's loop (the trainer's sync point).
      if preemption.requested() and i + 1 < len(names) and jax.process_count() == 1:
        raise preemption.PreemptedError(
            f"preempted (SIGTERM) after stage {name}: it is done and recorded; run the same "
            f"command again to resume from stage {names[i + 1]}.")
    if jax.process_index() == 0:
      files.write_json(os.path.join(workdir, "results.json"), results, what="results")
    if preemption.requested() and jax.process_count() == 1:
      # Its caller (seeds of a reproduction, a sweep) must not go on either.
      raise preemption.PreemptedError(
          f"preempted (SIGTERM) during the last stage, {names[-1]}: the recipe is done and "
          f"its results are in {workdir}; the same command only re-reads them.")
  return results


def _made(task: str, options: Mapping[str, Any], merged: ml_collections.ConfigDict
          ) -> dict[str, Any]:
  """How a stage is made, as its ``DONE.json`` records it (plain JSON)."""
  return json.loads(json.dumps({"task": task, "options": options,
                                "config": json.loads(merged.to_json_best_effort())},
                               sort_keys=True, default=repr))


def _check_record(workdir: str, name: str, made: Mapping[str, Any]) -> None:
  """A finished stage recorded with another task, options or config: one
  error naming the differing keys (records without ``made`` predate it)."""
  done = os.path.join(workdir, name, DONE)
  if not os.path.exists(done):
    return
  with open(done, encoding="utf-8") as f:
    recorded = json.load(f).get("made")
  if recorded is None or recorded == made:
    return
  diffs = distributed.config_differences(recorded, made)
  shown = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, old, new in diffs[:5]) + (
      f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
  raise ValueError(
      f"config.stages.{name}: {done} records a finished stage made differently ({shown}). "
      f"A finished stage is skipped, so its results would not be this config's: use a new "
      f"workdir, or delete {os.path.dirname(done)} to run the stage again.")


def _run_stage(workdir: str, names: list[str], name: str, task: str, options: dict,
               merged: ml_collections.ConfigDict, made: Mapping[str, Any]) -> dict[str, float]:
  """One stage: skipped when its record exists, else run and recorded."""
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
    fn = TASKS.build(Spec(task, (), options), where=f"config.stages.{name}",
                     runtime=("ctx",))
    stage_results = {k: float(v) for k, v in (fn(ctx) or {}).items()}
    if jax.process_index() == 0:
      files.write_json(done, {"task": task, "results": stage_results,
                              "made": made}, what="stage record")
    if jax.process_count() > 1:  # the stage's artifacts, written by process 0, are in place
      multihost_utils.sync_global_devices(f"jaxrobust stage {name} done")
  return stage_results
