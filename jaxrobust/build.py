"""Building a run: a config in, one frozen :class:`~jaxrobust.build.Run` out.

:func:`build_run` derives, once and before anything is compiled, everything
the training loop (:mod:`jaxrobust.trainer`) and the stage tasks
(:mod:`jaxrobust.tasks`) need from a validated config:

* the **task** -- the dataset whose classes the classifier predicts, its
  number of classes and image shape (:class:`TaskData`), and the data
  settings evaluators and tasks read (:class:`~jaxrobust.data.settings.DataSettings`);
* the **mesh** and the shardings of the state and the batch;
* the **modules** (model, normalisation, optimizer with frozen parameters
  masked, what trains; :class:`~jaxrobust.modules.Module`);
* the **streams** (data read, samplers, label sources, pp chains,
  perturbations) and the step's **updates** (composed loss terms);
* **constants** from earlier stages, the **evaluators** (data loaded,
  options checked) and the checkpoint **metadata**.

Every error a config can cause is raised here, naming the config key. The
builder imports no method: the names a config uses are found in the
registries, which load the method modules on demand
(:mod:`jaxrobust.registry`).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import attacks
from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import config as config_lib
from jaxrobust import evaluators as evaluators_lib
from jaxrobust import generated as generated_lib
from jaxrobust import losses as losses_lib
from jaxrobust import models
from jaxrobust import optim
from jaxrobust import sharding as sharding_lib
from jaxrobust import train_state as state_lib
from jaxrobust import train_step as step_lib
from jaxrobust.data import pipeline
from jaxrobust.data import pp
from jaxrobust.data import sources
from jaxrobust.data import streams as streams_lib
from jaxrobust.data.settings import DataSettings
from jaxrobust.models import heads as heads_lib
from jaxrobust.modules import CLASSIFIER, Module, masked_tx, trainable_paths


def stream_seed(seed: int, name: str) -> int:
  """A stream's sampling seed: the run's seed and the stream's name."""
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def where_of(module: str, key: str) -> str:
  """The config key of a module's ``model``/``optimizer``/``init_from``."""
  return f"config.{key}" if module == CLASSIFIER else f"config.modules.{module}.{key}"


# --- the task's data ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskData:
  """The task: its dataset's spec, number of classes and image shape."""
  spec: sources.DatasetSpec
  num_classes: int
  image_shape: tuple[int, int, int]


def resolve_num_classes(config: ml_collections.ConfigDict, spec: sources.DatasetSpec) -> int:
  given, found = config.data.num_classes, spec.num_classes
  if found is None and given is None:
    raise ValueError(f"dataset {config.data.name!r} has no class labels; it cannot be the "
                     "task (config.data.name); use it as a stream or an OOD eval set.")
  if given is not None and found is not None and given != found:
    raise ValueError(f"config.data.num_classes={given} but dataset {config.data.name!r} has "
                     f"{found} classes.")
  return int(given if given is not None else found)


def task_data(config: ml_collections.ConfigDict, data: DataSettings | None = None) -> TaskData:
  """The task's dataset spec, number of classes and image shape."""
  spec = (data or DataSettings.from_config(config)).spec(config.data.name)
  return TaskData(spec, resolve_num_classes(config, spec),
                  pipeline.image_shape(spec, config.data.image_size))


# --- modules ---------------------------------------------------------------------

def module_specs(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """name -> {model, optimizer, input_shape, num_classes, init_from} (plain
  dicts, the defaults of the schema filled in)."""
  base = config_lib.base_config()
  specs = {CLASSIFIER: {"model": config.model.to_dict(), "optimizer": config.optimizer.to_dict(),
                        "input_shape": None, "num_classes": None,
                        "init_from": config.init_from.to_dict()}}
  for name, m in config.modules.items():
    m = m.to_dict() if hasattr(m, "to_dict") else dict(m)
    model = {**base.model.to_dict(), "kwargs": {}, **m["model"]}
    optimizer = {**config.optimizer.to_dict(), **dict(m.get("optimizer", {}))}
    init_from = {**base.init_from.to_dict(), **dict(m.get("init_from", {}))}
    specs[name] = {"model": model, "optimizer": optimizer, "input_shape": m.get("input_shape"),
                   "num_classes": m.get("num_classes"), "init_from": init_from}
  return specs


def build_modules(config: ml_collections.ConfigDict, *, num_classes: int,
                  image_shape: tuple[int, int, int], total_steps: int, steps_per_epoch: float,
                  specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Module]:
  """Every module: model, normalisation, optimizer with frozen parameters masked."""
  out = {}
  for name, spec in (specs or module_specs(config)).items():
    where = where_of(name, "model")
    m = spec["model"]
    kwargs = dict(m.get("kwargs") or {})
    if config.parallelism == "pmap":
      kwargs["bn_axis_name"] = "batch"
    try:
      k = int(spec["num_classes"] or num_classes) if models.has_classes(m["name"]) else None
      model = models.get_model(m["name"], num_classes=k, dtype=jnp.dtype(m.get("dtype", "float32")),
                               **kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: {e}") from None
    head_specs = heads_lib.build_specs(m.get("heads") or {}, where=f"{where}.heads")
    if head_specs:
      model = heads_lib.WithHeads(model, head_specs)
    opt = ml_collections.ConfigDict(spec["optimizer"])
    try:
      schedule = optim.learning_rate_schedule(opt, total_steps, steps_per_epoch)
      tx = optim.create_optimizer(opt, schedule)
    except ValueError as e:
      raise ValueError(f"{where_of(name, 'optimizer')}: {e}") from None
    custom = spec["input_shape"]
    takes_images = custom is None
    trainable = m.get("trainable", ".*") or ".*"
    out[name] = Module(
        name=name, model=model, num_classes=k,
        input_shape=tuple(image_shape) if takes_images else tuple(custom),
        mean=tuple(config.data.mean) if takes_images else None,
        std=tuple(config.data.std) if takes_images else None,
        tx=masked_tx(tx, trainable), schedule=schedule, trainable=trainable,
        freeze_bn=bool(m.get("freeze_bn", False)),
        heads=tuple(name for name, _ in head_specs))
  return out


def inference_modules(config: ml_collections.ConfigDict, task: TaskData | None = None
                      ) -> dict[str, Module]:
  """The modules of a config for running trained variables (predict,
  evaluation): no training schedule."""
  task = task or task_data(config)
  return build_modules(config, num_classes=task.num_classes, image_shape=task.image_shape,
                       total_steps=1, steps_per_epoch=1.0)


# --- streams, constants, updates -----------------------------------------------------

def build_streams(config: ml_collections.ConfigDict, *, num_classes: int,
                  image_shape: tuple[int, int, int], artifacts: artifacts_lib.Artifacts,
                  data: DataSettings | None = None
                  ) -> tuple[streams_lib.TrainInput, dict[str, step_lib.StreamStep]]:
  """The training streams (data read, hooks resolved) and how the step treats them."""
  defaults = streams_lib.stream_defaults()
  data = data or DataSettings.from_config(config)
  inputs, steps = {}, {}
  for name, cfg in config.streams.items():
    where = f"config.streams.{name}"
    spec = {**defaults, **cfg.to_dict()}
    if generated_lib.is_generated(spec):
      steps[name] = stream_step(name, spec)
      continue
    dataset = spec["data"] or config.data.name
    ds_spec = data.spec(dataset)
    got = pipeline.image_shape(ds_spec, config.data.image_size)
    if spec["through_model"] and got != tuple(image_shape):
      raise ValueError(f"{where}: {dataset!r} has images of shape {got}; the model takes "
                       f"{tuple(image_shape)}.")
    if ds_spec.splits and spec["split"] not in ds_spec.splits and "[" not in spec["split"]:
      raise ValueError(f"{where}.split: dataset {dataset!r} has no split {spec['split']!r}; "
                       f"it has {sorted(ds_spec.splits)}.")
    own_labels = spec["labels"] in ("", "dataset")
    same_space = ds_spec.num_classes is not None and (
        dataset == config.data.name or ds_spec.num_classes == num_classes)
    if own_labels and not same_space:
      spec["labels"] = "unlabeled"  # its labels are not the task's classes
    labelled = same_space or not own_labels
    inputs[name] = streams_lib.build_stream(
        name, spec, data.load(dataset, spec["split"]),
        num_classes=num_classes if labelled else None,
        seed=stream_seed(config.seed, name), artifacts=artifacts)
    steps[name] = stream_step(name, spec)
  return streams_lib.TrainInput(inputs), steps


def stream_step(name: str, spec: Mapping[str, Any]) -> step_lib.StreamStep:
  """How the step treats stream ``name`` of spec ``spec`` (its pp chain,
  views and perturbation, built and checked); reads no data."""
  where = f"config.streams.{name}"
  spec = {**streams_lib.stream_defaults(), **dict(spec)}
  if generated_lib.is_generated(spec):
    return step_lib.StreamStep(
        name=name, generator=generated_lib.generator_of(spec, where),
        noise=generated_lib.parse_noise(spec.get("noise", ""), where),
        batch_size=int(spec["batch_size"]))
  if spec["passes_by_group"] and (spec["views"] > 1 or spec["perturb"]):
    raise ValueError(f"{where}.passes_by_group: separate passes by group take a single-view "
                     "stream without a perturbation.")
  return step_lib.StreamStep(
      name=name, pp=pp.build(spec["pp"], where=f"{where}.pp") if spec["pp"] else None,
      views=int(spec["views"]),
      perturb=attacks.build(spec["perturb"], where=f"{where}.perturb") if spec["perturb"]
      else None, perturb_stats=spec["perturb_stats"],
      passes_by_group=tuple(int(g) for g in spec["passes_by_group"]))


def build_stream_steps(config: ml_collections.ConfigDict) -> dict[str, step_lib.StreamStep]:
  """:func:`stream_step` of every stream of ``config.streams``, from the
  config alone (no data read): with :func:`build_modules` and
  :func:`build_updates` it gives a :class:`~jaxrobust.train_step.StepSpec`
  to feed batches by hand (the PyTorch parity tests)."""
  return {name: stream_step(name, cfg.to_dict()) for name, cfg in config.streams.items()}


def check_generated(stream_steps: Mapping[str, step_lib.StreamStep],
                    modules: Mapping[str, Module]) -> None:
  """Each generated stream's generator exists, takes its noise and returns
  ``images`` of the shape the image modules take (abstract evaluation: nothing
  is compiled)."""
  shapes = {tuple(m.input_shape) for m in modules.values() if m.takes_images}
  for name, st in stream_steps.items():
    if not st.is_generated:
      continue
    where = f"config.streams.{name}"
    if st.generator not in modules:
      raise ValueError(f"{where}.source='module:{st.generator}': no such module; modules: "
                       f"{', '.join(modules)} (add it in config.modules).")
    g = modules[st.generator]
    if g.takes_images or tuple(g.input_shape) != (st.noise.dim,):
      raise ValueError(f"{where}.noise={st.noise.kind}({st.noise.dim}): module "
                       f"{st.generator!r} takes inputs of shape {tuple(g.input_shape)} "
                       f"(config.modules.{st.generator}.input_shape={(st.noise.dim,)} feeds it "
                       "this noise).")
    variables = jax.eval_shape(lambda k, g=g: dict(zip(("params", "batch_stats"), g.init(k))),
                               jax.random.key(0))
    outputs = jax.eval_shape(
        lambda v, z, g=g: g.apply_outputs(v, z, train=False)[0], variables,
        jax.ShapeDtypeStruct((2, st.noise.dim), jnp.float32))
    images = generated_lib.output_images(outputs, st.generator)
    if shapes and tuple(images.shape[1:]) not in shapes:
      raise ValueError(f"{where}: module {st.generator!r} generates images of shape "
                       f"{tuple(images.shape[1:])}; the image modules take {sorted(shapes)[0]} "
                       f"(set config.modules.{st.generator}.model.kwargs to match, e.g. the "
                       "number of channels).")


def load_constants(config: ml_collections.ConfigDict, artifacts: artifacts_lib.Artifacts
                   ) -> dict[str, np.ndarray]:
  return {name: artifacts.load_array(ref, f"config.constants.{name}")
          for name, ref in config.constants.items()}


def build_updates(config: ml_collections.ConfigDict, modules: Mapping[str, Module],
                  stream_steps: Mapping[str, step_lib.StreamStep],
                  constants: Mapping[str, np.ndarray],
                  artifacts: artifacts_lib.Artifacts | None = None) -> list[step_lib.Update]:
  """The updates of one step, their loss terms built and checked (option
  values that are artifact references are loaded: scalars or arrays)."""
  def resolve(value, where):
    if not artifacts_lib.is_ref(value):
      return value
    loaded = (artifacts or artifacts_lib.Artifacts()).load(value, where)
    return float(loaded) if np.ndim(loaded) == 0 else loaded
  through = [n for n in stream_steps if config.streams[n].get("through_model", True)
             and not stream_steps[n].is_generated]
  specs = ({"classifier": {"module": CLASSIFIER, "losses": tuple(config.losses.keys()),
                           "streams": tuple(through)}} if not len(config.updates) else
           {n: {"module": config.updates[n].get("module", CLASSIFIER),
                "losses": tuple(config.updates[n].get("losses", config.losses.keys())),
                "streams": tuple(config.updates[n].get("streams", through)),
                "fresh_noise": tuple(config.updates[n].get("fresh_noise", ())),
                "share_pass": tuple(config.updates[n].get("share_pass", ()))}
            for n in config_lib.order(config.updates, "config.updates", total=True)})
  check_generated(stream_steps, modules)
  out = []
  for name, u in specs.items():
    m = modules[u["module"]]
    generates = tuple(s for s, st in stream_steps.items() if st.is_generated and (
        s in u["streams"] or st.generator == u["module"]))
    for key in ("fresh_noise", "share_pass"):
      for s in u.get(key, ()):
        if s not in generates:
          raise ValueError(f"config.updates.{name}.{key}: {s!r} is not a generated stream "
                           f"this update reads (it reads {list(generates) or 'none'}).")
    grouped = [s for s in u["streams"] if stream_steps[s].passes_by_group]
    if grouped and len(u["streams"]) > 1:
      raise ValueError(f"config.updates.{name}: stream {grouped[0]!r} goes through the model in "
                       "passes by group (config.streams."
                       f"{grouped[0]}.passes_by_group), so it must be the update's only stream; "
                       f"it has {list(u['streams'])}.")
    if u["streams"] and not m.takes_images:
      raise ValueError(f"config.updates.{name}: module {u['module']!r} takes inputs of shape "
                       f"{m.input_shape}, not images; give it no streams (its loss terms call "
                       "it) -- config.updates.{name}.streams=().")
    terms = losses_lib.build_terms(config.losses, u["losses"], num_classes=m.num_classes,
                                   constants=constants, streams=list(stream_steps),
                                   resolve=resolve, heads=list(m.heads))
    out.append(step_lib.Update(name=name, module=u["module"], loss_fn=losses_lib.compose(terms),
                               streams=tuple(u["streams"]),
                               stats_keys=tuple(losses_lib.normalized_keys(terms)),
                               generates=generates, fresh_noise=tuple(u.get("fresh_noise", ())),
                               share_pass=tuple(u.get("share_pass", ()))))
  return out


# --- the run -----------------------------------------------------------------------

def checkpoint_meta(config: ml_collections.ConfigDict, modules: Mapping[str, Module],
                    abstract: state_lib.TrainState,
                    specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """What a checkpoint records to be checked against the run that reads it."""
  return {"dataset": config.data.name,
          "modules": {n: {"model": specs[n]["model"]["name"], "num_classes": m.num_classes,
                          "param_shapes": ckpt_lib.param_shapes(abstract.modules[n].params)}
                      for n, m in modules.items()}}


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a training run needs, derived once from its config.

  Attributes:
    config: the validated config.
    workdir: the run's directory (absolute).
    artifacts: resolves ``artifact:`` references (a stage of a recipe).
    task: the task's dataset, classes and image shape.
    data: the data settings evaluators and tasks read.
    mesh: the device mesh.
    modules: name -> :class:`~jaxrobust.modules.Module`.
    init_from: name -> the module's ``init_from`` options (path, step, ...).
    train_input: the training streams (the only mutable member: the data
      iterators, whose positions are checkpointed).
    stream_steps: how the step treats each stream.
    total_steps: length of the run in steps; ``steps_per_epoch`` of ``train``.
    constants: arrays from earlier stages, by name.
    updates: the step's updates, in order.
    abstract: shapes and dtypes of the train state.
    state_shardings: the train state's shardings over ``mesh``.
    batch_sharding: the batch's sharding over ``mesh``.
    replicated: the replicated sharding over ``mesh``.
    evaluators: key -> evaluator (data loaded, options checked).
    meta: the checkpoints' metadata.
  """
  config: ml_collections.ConfigDict
  workdir: str
  artifacts: artifacts_lib.Artifacts
  task: TaskData
  data: DataSettings
  mesh: jax.sharding.Mesh
  modules: Mapping[str, Module]
  init_from: Mapping[str, Mapping[str, Any]]
  train_input: streams_lib.TrainInput
  stream_steps: Mapping[str, step_lib.StreamStep]
  total_steps: int
  steps_per_epoch: float
  constants: Mapping[str, np.ndarray]
  updates: tuple[step_lib.Update, ...]
  abstract: state_lib.TrainState
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding
  evaluators: Mapping[str, evaluators_lib.Evaluator]
  meta: Mapping[str, Any]

  @property
  def num_classes(self) -> int:
    return self.task.num_classes

  @property
  def step_spec(self) -> step_lib.StepSpec:
    return step_lib.StepSpec(modules=self.modules, streams=self.stream_steps,
                             updates=self.updates, num_classes=self.num_classes)

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints")

  @property
  def global_batch_size(self) -> int:
    return self.train_input.streams["train"].global_batch_size


def build_run(config: ml_collections.ConfigDict, workdir: str, *,
              artifacts: artifacts_lib.Artifacts | None = None,
              validated: bool = False) -> Run:
  """Builds and checks everything of a training run (nothing is compiled).

  ``validated=True`` skips :func:`jaxrobust.config.validate` for a config the
  caller has just validated (the stage runner validates every stage's config
  before the first stage starts).
  """
  if not validated:
    config_lib.validate(config)
  artifacts = artifacts or artifacts_lib.Artifacts()
  workdir = os.path.abspath(workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  data = DataSettings.from_config(config)
  task = task_data(config, data)
  train_input, stream_steps = build_streams(config, num_classes=task.num_classes,
                                            image_shape=task.image_shape, artifacts=artifacts,
                                            data=data)
  main = train_input.streams["train"]
  total_steps = streams_lib.num_steps(config.num_steps, config.num_epochs, main)
  steps_per_epoch = streams_lib.steps_per_epoch(main)
  specs = module_specs(config)
  modules = build_modules(config, num_classes=task.num_classes, image_shape=task.image_shape,
                          total_steps=total_steps, steps_per_epoch=steps_per_epoch, specs=specs)
  constants = load_constants(config, artifacts)
  updates = tuple(build_updates(config, modules, stream_steps, constants, artifacts))
  loss_stats = sorted({k for u in updates for k in u.stats_keys})
  abstract = state_lib.abstract_state(modules, loss_stats)
  for name, m in modules.items():
    trainable_paths(abstract.modules[name].params, m.trainable, f"{where_of(name, 'model')}.trainable")
  batch_sharding = sharding_lib.data_sharding(mesh, config.data_axes)
  evaluators = evaluators_lib.build_evaluators(
      config, modules, num_classes=task.num_classes, image_shape=task.image_shape,
      batch_sharding=batch_sharding, save_dir=os.path.join(workdir, "artifacts"),
      artifacts=artifacts, data=data)
  return Run(
      config=config, workdir=workdir, artifacts=artifacts, task=task,
      data=data, mesh=mesh, modules=modules,
      init_from={n: s["init_from"] for n, s in specs.items()}, train_input=train_input,
      stream_steps=stream_steps, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      constants=constants, updates=updates, abstract=abstract,
      state_shardings=sharding_lib.tree_shardings(abstract, mesh, config.sharding_rules),
      batch_sharding=batch_sharding, replicated=sharding_lib.replicated(mesh),
      evaluators=evaluators, meta=checkpoint_meta(config, modules, abstract, specs))
