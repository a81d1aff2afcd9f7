"""Stage tasks: what a stage of a recipe runs, and the API methods write them with.

A task is a function ``task(ctx: StageContext, **options) -> {result: float}``
registered in :data:`TASKS`::

    @TASKS.register("pseudo_label")
    def pseudo_label(ctx: StageContext, *, checkpoint, threshold=0.3) -> dict[str, float]: ...

Options come from the stage's entry in ``config.stages`` and are checked
against the signature before the recipe starts; a task may also check their
values then, before any stage runs, with a ``check_options(where, **options)``
attribute (``dfr_task.check_options = ...``) that raises naming ``where``. A task reads what earlier
stages wrote (``ctx.artifacts.load('artifact:<stage>/<name>')``), runs models
(:func:`predict_outputs`, :func:`evaluation_setup`), writes arrays or JSON for
later stages (``ctx.artifacts.save``) and, where it produces a model (a
re-fitted head, a converted or averaged checkpoint), a checkpoint that
``init_from``, ``predict`` and evaluation read like a trained one
(:meth:`StageContext.save_model`).

Built in: ``predict``, ``evaluate`` and ``import_torch`` (here) and ``train``
(:mod:`jaxrobust.trainer`). This module builds on :mod:`jaxrobust.build` and
never imports the trainer or any method; the stage runner is
:mod:`jaxrobust.stages`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import build
from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import evaluators as evaluators_lib
from jaxrobust import files
from jaxrobust import sharding as sharding_lib
from jaxrobust.data.settings import DataSettings
from jaxrobust.modules import CLASSIFIER, Module, flat
from jaxrobust.registry import Registry, RegistryError

#: The stage tasks by name (a stage's ``task``).
TASKS = Registry("stage task")


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

  @property
  def where(self) -> str:
    """The stage's config key ``config.stages.<name>``, for messages."""
    return f"config.stages.{self.name}"

  @functools.cached_property
  def data(self) -> DataSettings:
    """How this stage reads datasets (``config.data``)."""
    return DataSettings.from_config(self.config)

  @functools.cached_property
  def task(self) -> build.TaskData:
    """The stage's task (its dataset, number of classes and image shape)."""
    return build.task_data(self.config, self.data)

  @functools.cached_property
  def modules(self) -> dict[str, Module]:
    """The config's modules, built for running trained variables."""
    return build.inference_modules(self.config, self.task)

  def checkpoint_path(self, checkpoint: str, key: str = "checkpoint") -> str:
    """A path or an ``artifact:<stage>/checkpoint`` reference -> the path."""
    return (self.artifacts.path(checkpoint, f"{self.where}.{key}")
            if artifacts_lib.is_ref(checkpoint) else os.path.abspath(checkpoint))

  def save_model(self, variables: Mapping[str, Mapping[str, Any]], *, step: int = 0) -> str:
    """Writes ``{module: {'params': ..., 'batch_stats': ...}}`` as this
    stage's checkpoint (``<stage>/checkpoints/<step>``: orbax, atomic, the
    format and metadata of a trained run's checkpoint), which ``init_from``,
    ``predict`` and ``evaluate`` read like a trained one. Every module must
    be one of the stage config's, with exactly its parameter shapes. Returns
    ``'artifact:<stage>/checkpoint'``."""
    if not variables:
      raise RegistryError(f"{self.where}: save_model got no module.")
    abstract = jax.eval_shape(
        lambda: {n: m.init(jax.random.PRNGKey(0)) for n, m in self.modules.items()})
    specs = build.module_specs(self.config)
    state: dict[str, Any] = {}
    meta: dict[str, Any] = {"dataset": self.config.data.name, "modules": {}}
    for name, v in variables.items():
      if name not in self.modules:
        raise RegistryError(f"{self.where}: save_model: no module {name!r} in the stage's "
                            f"config (modules: {sorted(self.modules)}).")
      params, stats = v.get("params"), v.get("batch_stats") or {}
      want_params, want_stats = abstract[name]
      _check_shapes(params, want_params, f"{self.where}: save_model: module {name!r} params")
      _check_shapes(stats, want_stats, f"{self.where}: save_model: module {name!r} batch_stats")
      state[name] = {"params": jax.tree.map(np.asarray, params),
                     "batch_stats": jax.tree.map(np.asarray, stats)}
      meta["modules"][name] = {"model": specs[name]["model"]["name"],
                               "num_classes": self.modules[name].num_classes,
                               "param_shapes": ckpt_lib.param_shapes(params)}
    checkpointer = ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                         max_to_keep=1, asynchronous=False)
    checkpointer.save(int(step), {"step": np.asarray(step, np.int32), "modules": state},
                      data={}, meta=meta)
    checkpointer.close()
    return f"{artifacts_lib.PREFIX}{self.name}/{artifacts_lib.CHECKPOINT}"


def _check_shapes(got: Any, want: Any, where: str) -> None:
  got_shapes = {k: tuple(np.shape(v)) for k, v in flat(got or {}).items()}
  want_shapes = {k: tuple(v.shape) for k, v in flat(want or {}).items()}
  if got_shapes != want_shapes:
    diff = [f"{k}: {got_shapes.get(k)} (model: {want_shapes.get(k)})"
            for k in sorted(set(got_shapes) | set(want_shapes))
            if got_shapes.get(k) != want_shapes.get(k)]
    raise RegistryError(f"{where} do not fit the model: " + "; ".join(diff[:6])
                        + (" ..." if len(diff) > 6 else ""))


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


def _batch_sharding(config: ml_collections.ConfigDict) -> jax.sharding.NamedSharding:
  return sharding_lib.data_sharding(sharding_lib.make_mesh(config.mesh), config.data_axes)


def predict_outputs(ctx: StageContext, *, checkpoint: str, data: str = "", split: str = "train",
                    fields: Sequence[str] = ("logits", "label"), module: str = CLASSIFIER
                    ) -> dict[str, Any]:
  """Per-example outputs of a checkpoint's ``module`` over ``data:split``
  (default: the task's dataset), in dataset index order: the ``predict``
  task without the saving, for method tasks."""
  from jaxrobust import predict as predict_lib
  from jaxrobust import scores as scores_lib
  config, where = ctx.config, ctx.where
  modules = ctx.modules
  if module not in modules:
    raise RegistryError(f"{where}.module={module!r}: no such module ({sorted(modules)}).")
  score_names = [f for f in fields if f not in predict_lib.BASE_FIELDS]
  scores = {f: scores_lib.build(f, where=f"{where}.fields") for f in score_names}
  source = ctx.data.load(data or config.data.name, split)
  params, stats = ckpt_lib.load_pretrained(ctx.checkpoint_path(checkpoint), module=module,
                                           where=f"{where}.checkpoint")
  check_label_space(params, modules[module].num_classes, where=f"{where}.checkpoint",
                    data=config.data.name)
  predictor = predict_lib.Predictor(modules[module], batch_size=config.eval_batch_size,
                                    batch_sharding=_batch_sharding(config))
  return predictor({"params": params, "batch_stats": stats}, source, fields=fields, scores=scores)


class EvalState:
  """What evaluators read of a train state: the modules' variables."""

  def __init__(self, modules):
    self.modules = modules


def evaluation_setup(ctx: StageContext, config: ml_collections.ConfigDict, checkpoint: str, *,
                     modules: Sequence[str] | None = None, save_dir: str | None = None
                     ) -> tuple[dict[str, evaluators_lib.Evaluator], EvalState]:
  """The evaluators of ``config.evaluators`` and an ``EvalState`` holding
  ``checkpoint``'s variables for ``modules`` (default: every module of the
  config), for stage tasks that evaluate without training. ``checkpoint``: a
  path or an ``artifact:`` reference."""
  from jaxrobust.train_state import ModuleState
  own = config is ctx.config
  data = ctx.data if own else DataSettings.from_config(config)
  task = ctx.task if own else build.task_data(config, data)
  built = ctx.modules if own else build.inference_modules(config, task)
  evaluators = evaluators_lib.build_evaluators(
      config, built, num_classes=task.num_classes, image_shape=task.image_shape,
      batch_sharding=_batch_sharding(config), save_dir=save_dir, artifacts=ctx.artifacts,
      data=data)
  path = ctx.checkpoint_path(checkpoint)
  state = EvalState({name: ModuleState(*ckpt_lib.load_pretrained(
      path, module=name, where=f"{ctx.where}.checkpoint"), None) for name in (modules or built)})
  return evaluators, state


@TASKS.register("evaluate")
def evaluate_task(ctx: StageContext, *, checkpoint: str) -> dict[str, float]:
  """Runs the config's evaluators (``config.evaluators``) on a checkpoint,
  without training: e.g. scores tuned by later stages (``tune_score``) on
  the model an earlier stage trained. Writes ``results.json`` and plots in
  the stage's directory, like a train stage."""
  config = ctx.config
  evaluators, state = evaluation_setup(ctx, config, checkpoint,
                                       save_dir=os.path.join(ctx.workdir, "artifacts"))
  results = evaluators_lib.run(evaluators, state, final=True,
                               plots_dir=os.path.join(ctx.workdir, "plots") if config.plots
                               else None)
  if jax.process_index() == 0:
    files.write_json(os.path.join(ctx.workdir, "results.json"), results, what="results")
  return results


@TASKS.register("predict")
def predict_task(ctx: StageContext, *, checkpoint: str, data: str = "", split: str = "train",
                 fields: Sequence[str] = ("logits", "label"), name: str = "predictions",
                 module: str = CLASSIFIER) -> dict[str, float]:
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
  out = predict_outputs(ctx, checkpoint=checkpoint, data=data, split=split, fields=fields,
                        module=module)
  n = len(next(iter(out.values())))
  out["index"] = np.arange(n, dtype=np.int64)
  ctx.artifacts.save(name, out)
  return {f"{name}/num_examples": float(n)}


@TASKS.register("import_torch")
def import_torch_task(ctx: StageContext, *, path: str, module: str = CLASSIFIER
                      ) -> dict[str, float]:
  """Converts a PyTorch ``state_dict`` file of the stage's model -- a released
  checkpoint of ``hendrycks/pre-training``, ``hendrycks/outlier-exposure``,
  ``wetliu/energy_ood`` (WRN-40-2) or torchvision (ResNet-50) -- into this
  stage's checkpoint (:meth:`StageContext.save_model`), which ``evaluate``,
  ``predict`` and ``init_from`` then read as ``'artifact:<stage>/checkpoint'``.

  Args:
    path: a ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``),
      ``.npz`` or ``.safetensors`` file.
    module: the config's module it is loaded into.

  Raises (naming ``config.stages.<stage>.path``) when the file is missing or
  not a state_dict, or when it does not fit the module's model (another
  architecture, another number of classes), before anything is compiled.
  Results: ``<module>/num_arrays`` and ``<module>/num_params``.
  """
  from jaxrobust import pretrained
  modules = ctx.modules
  if module not in modules:
    raise RegistryError(f"{ctx.where}.module={module!r}: no such module ({sorted(modules)}).")
  params, stats = pretrained.from_torch(os.path.abspath(os.path.expanduser(path)),
                                        model=modules[module], where=f"{ctx.where}.path")
  ctx.save_model({module: {"params": params, "batch_stats": stats}})
  leaves = jax.tree.leaves(params)
  return {f"{module}/num_arrays": float(len(leaves) + len(jax.tree.leaves(stats))),
          f"{module}/num_params": float(sum(np.size(x) for x in leaves))}
