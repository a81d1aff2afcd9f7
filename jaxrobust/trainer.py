"""The one trainer: config in, trained modules and ``results.json`` out.

:func:`train_and_evaluate` builds everything from the config -- mesh, modules
(models, optimizers, what trains), streams (data, pp, perturbations, samplers,
label sources), the updates of one step (composed loss terms), constants from
earlier stages, evaluators -- and checks all of it before anything is
compiled. It then resumes from ``<workdir>/checkpoints`` when a checkpoint
exists (else initialises, from ``config.init_from`` where given), runs the
compiled step, logs, checkpoints, evaluates, and writes

* ``<workdir>/config.json`` -- the resolved config,
* ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard/`` -- training curves,
* ``<workdir>/results.json`` -- flat final metrics such as ``test/accuracy``,
* ``<workdir>/plots/`` -- the evaluators' figures.

Methods extend it only through the registries its hooks read (loss terms,
scores, pp ops, perturbations, samplers, index lists, label sources,
evaluators, stage tasks); it imports no method by name. Multi-stage recipes
call it once per ``train`` stage (:mod:`jaxrobust.stages`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
import time
import zlib
from typing import Any, Mapping

import jax
from jax._src import distributed as distributed_state  # preemption service state
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import attacks
from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import config as config_lib
from jaxrobust import evaluators as evaluators_lib
from jaxrobust import losses as losses_lib
from jaxrobust import methods  # noqa: F401  (registers every method's hooks)
from jaxrobust import metric_writers
from jaxrobust import models
from jaxrobust import optim
from jaxrobust import pretrained
from jaxrobust import sharding as sharding_lib
from jaxrobust import train_state as state_lib
from jaxrobust import train_step as step_lib
from jaxrobust.data import pipeline
from jaxrobust.data import pp
from jaxrobust.data import sources
from jaxrobust.data import streams as streams_lib
from jaxrobust.models import heads as heads_lib
from jaxrobust.modules import CLASSIFIER, Module, masked_tx, trainable_paths

log = logging.getLogger("jaxrobust")


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN or inf."""


class PreemptedError(RuntimeError):
  """SIGTERM arrived: the run finished its step, saved a checkpoint and
  stopped; the same command resumes it."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted (SIGTERM) at step {step}: checkpoint saved in {directory}; "
                     "run the same command again to resume.")
    self.step = step


class _Preemption:
  """Whether to stop after this step: SIGTERM seen by this process or, on
  several processes, JAX's preemption sync point (every process stops at the
  same step, so none waits forever in a collective)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._synced = jax.process_count() > 1 and getattr(
        distributed_state.global_state, "preemption_sync_manager", None) is not None
    # Several processes: JAX's preemption notifier (installed by
    # jax.distributed.initialize) must keep SIGTERM; a Python handler would
    # replace it and the sync point would never come.
    if threading.current_thread() is threading.main_thread() and not self._synced:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def due(self, step: int) -> bool:
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (temporary file, then rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def stream_seed(seed: int, name: str) -> int:
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def resolve_num_classes(config: ml_collections.ConfigDict, spec: sources.DatasetSpec) -> int:
  given, found = config.data.num_classes, spec.num_classes
  if found is None and given is None:
    raise ValueError(f"dataset {config.data.name!r} has no class labels; it cannot be the "
                     "task (config.data.name); use it as a stream or an OOD eval set.")
  if given is not None and found is not None and given != found:
    raise ValueError(f"config.data.num_classes={given} but dataset {config.data.name!r} has "
                     f"{found} classes.")
  return int(given if given is not None else found)


# --- modules ----------------------------------------------------------------------

def _module_specs(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """name -> {model, optimizer, input_shape, num_classes, init_from} (plain dicts)."""
  specs = {CLASSIFIER: {"model": config.model.to_dict(), "optimizer": config.optimizer.to_dict(),
                        "input_shape": None, "num_classes": None,
                        "init_from": config.init_from.to_dict()}}
  for name, m in config.modules.items():
    m = m.to_dict() if hasattr(m, "to_dict") else dict(m)
    model = {**config_lib.base_config().model.to_dict(), "kwargs": {}, **m["model"]}
    optimizer = {**config.optimizer.to_dict(), **dict(m.get("optimizer", {}))}
    init_from = {**config_lib.base_config().init_from.to_dict(), **dict(m.get("init_from", {}))}
    specs[name] = {"model": model, "optimizer": optimizer, "input_shape": m.get("input_shape"),
                   "num_classes": m.get("num_classes"), "init_from": init_from}
  return specs


def build_modules(config: ml_collections.ConfigDict, *, num_classes: int,
                  image_shape: tuple[int, int, int], total_steps: int, steps_per_epoch: float
                  ) -> dict[str, Module]:
  """Every module: model, normalisation, optimizer with frozen parameters masked."""
  out = {}
  for name, spec in _module_specs(config).items():
    where = "config.model" if name == CLASSIFIER else f"config.modules.{name}.model"
    m = spec["model"]
    kwargs = dict(m.get("kwargs") or {})
    if config.parallelism == "pmap":
      kwargs["bn_axis_name"] = "batch"
    k = int(spec["num_classes"] or num_classes)
    try:
      model = models.get_model(m["name"], num_classes=k, dtype=jnp.dtype(m.get("dtype", "float32")),
                               **kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: {e}") from None
    head_specs = heads_lib.build_specs(m.get("heads") or {}, where=f"{where}.heads")
    if head_specs:
      model = heads_lib.WithHeads(model, head_specs)
    opt = ml_collections.ConfigDict(spec["optimizer"])
    opt_where = "config.optimizer" if name == CLASSIFIER else f"config.modules.{name}.optimizer"
    try:
      schedule = optim.learning_rate_schedule(opt, total_steps, steps_per_epoch)
      tx = optim.create_optimizer(opt, schedule)
    except ValueError as e:
      raise ValueError(f"{opt_where}: {e}") from None
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


# --- streams and updates ---------------------------------------------------------

def build_streams(config: ml_collections.ConfigDict, *, num_classes: int,
                  image_shape: tuple[int, int, int], artifacts: artifacts_lib.Artifacts
                  ) -> tuple[streams_lib.TrainInput, dict[str, step_lib.StreamStep]]:
  """The training streams (data read, hooks resolved) and how the step treats them."""
  defaults = streams_lib.stream_defaults()
  data_dir = config.data.data_dir
  inputs, steps = {}, {}
  for name, cfg in config.streams.items():
    where = f"config.streams.{name}"
    spec = {**defaults, **cfg.to_dict()}
    dataset = spec["data"] or config.data.name
    ds_spec = sources.get_spec(dataset, data_dir=data_dir)
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
    source = pipeline.load_split(dataset, spec["split"], data_dir=data_dir,
                                 cache=config.data.cache, image_size=config.data.image_size)
    inputs[name] = streams_lib.build_stream(
        name, spec, source, num_classes=num_classes if labelled else None,
        seed=stream_seed(config.seed, name), artifacts=artifacts)
    steps[name] = step_lib.StreamStep(
        name=name, pp=pp.build(spec["pp"], where=f"{where}.pp") if spec["pp"] else None,
        views=int(spec["views"]),
        perturb=attacks.build(spec["perturb"], where=f"{where}.perturb") if spec["perturb"]
        else None)
  return streams_lib.TrainInput(inputs), steps


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
  through = [n for n in stream_steps if config.streams[n].get("through_model", True)]
  specs = ({"classifier": {"module": CLASSIFIER, "losses": tuple(config.losses.keys()),
                           "streams": tuple(through)}} if not len(config.updates) else
           {n: {"module": config.updates[n].get("module", CLASSIFIER),
                "losses": tuple(config.updates[n].get("losses", config.losses.keys())),
                "streams": tuple(config.updates[n].get("streams", through))}
            for n in config_lib.order(config.updates, "config.updates", total=True)})
  out = []
  for name, u in specs.items():
    m = modules[u["module"]]
    if u["streams"] and not m.takes_images:
      raise ValueError(f"config.updates.{name}: module {u['module']!r} takes inputs of shape "
                       f"{m.input_shape}, not images; give it no streams (its loss terms call "
                       "it) -- config.updates.{name}.streams=().")
    terms = losses_lib.build_terms(config.losses, u["losses"], num_classes=m.num_classes,
                                   constants=constants, streams=list(stream_steps),
                                   resolve=resolve, heads=list(m.heads))
    out.append(step_lib.Update(name=name, module=u["module"], loss_fn=losses_lib.compose(terms),
                               streams=tuple(u["streams"]),
                               stats_keys=tuple(losses_lib.normalized_keys(terms))))
  return out


# --- state -----------------------------------------------------------------------

def _meta(config, modules, abstract) -> dict[str, Any]:
  return {"dataset": config.data.name,
          "modules": {n: {"model": _model_name(config, n), "num_classes": m.num_classes,
                          "param_shapes": ckpt_lib.param_shapes(abstract.modules[n].params)}
                      for n, m in modules.items()}}


def _model_name(config, name: str) -> str:
  return config.model.name if name == CLASSIFIER else config.modules[name].model.name


def _init_from(config, name: str, state, shardings, artifacts) -> Any:
  """Copies pre-trained parameters into module ``name`` as its init_from says."""
  spec = _module_specs(config)[name]["init_from"]
  if not spec["path"]:
    return state
  where = ("config.init_from" if name == CLASSIFIER else f"config.modules.{name}.init_from")
  path = spec["path"]
  path = (artifacts.path(path, f"{where}.path") if artifacts_lib.is_ref(path)
          else os.path.abspath(path))
  src_params, src_stats = ckpt_lib.load_pretrained(path, spec["step"], where=where)
  ms = state.modules[name]
  params, stats, reset = pretrained.merge_pretrained(
      ms.params, ms.batch_stats, src_params, src_stats, reset_head=spec["reset_head"],
      load_batch_stats=spec["load_batch_stats"], skip=spec.get("skip", ""))
  modules = dict(state.modules)
  modules[name] = ms.replace(
      params=jax.device_put(params, shardings.modules[name].params),
      batch_stats=jax.device_put(stats, shardings.modules[name].batch_stats))
  total = len(jax.tree.leaves(ms.params))
  log.warning("init_from: module %s loaded %d of %d parameter arrays from %s; re-initialised: %s",
              name, total - len(reset), total,
              path, ", ".join(reset) if reset else "none")
  return state.replace(modules=modules)


def _initial_state(config, modules, abstract, state_shardings, checkpointer, meta, train_input,
                   artifacts) -> tuple[state_lib.TrainState, int]:
  """Resume from the workdir's latest checkpoint (state and input positions),
  else initialise (pre-trained parameters where ``init_from`` says); returns
  the state, sharded as ``state_shardings``, and its step."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_shardings)
  state, step = checkpointer.restore_latest(target, data=train_input.restore_args(),
                                            expected_meta=meta, seek=train_input.seek)
  if state is not None:
    log.warning("resumed from step %d (%s/%d)", step, checkpointer.directory, step)
    return state, step
  state = jax.jit(lambda r: state_lib.create_state(modules, r, sorted(abstract.loss_stats)),
                  out_shardings=state_shardings)(jax.random.PRNGKey(config.seed))
  for name in modules:
    state = _init_from(config, name, state, state_shardings, artifacts)
  return state, 0


def _check_finite(step: int, metrics: Mapping[str, Any], last_saved: int | None,
                  ckpt_dir: str) -> dict[str, float]:
  values = {k: float(np.asarray(v).mean()) for k, v in jax.device_get(dict(metrics)).items()}
  bad = {k: v for k, v in values.items()
         if re.fullmatch(r"(.*/)?(loss|grad_norm)", k) and not math.isfinite(v)}
  if bad:
    where = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}"
             if last_saved is not None else "no checkpoint was written yet")
    raise NonFiniteLossError(
        f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
        f"training stopped ({where}). Lower the learning rate or check the inputs.")
  return values


def _plot_stream_samples(config, stream_steps: Mapping[str, step_lib.StreamStep],
                         host_batch: Mapping[str, Any], root_rng: np.ndarray,
                         plots_dir: str) -> None:
  """``plots/samples_<stream>.png``: the first step's images of every stream
  with an augmentation chain or several views, as the jit step sees them
  (this process's slice; the pmap step folds in the device index too)."""
  from jaxrobust import plots
  spec = step_lib.StepSpec(modules={}, streams=stream_steps, updates=(), num_classes=0)
  shown = [n for n, s in stream_steps.items() if s.pp is not None or s.views > 1]
  if not shown:
    return
  pp_rng = step_lib.step_keys(jnp.asarray(root_rng), 0)[0]
  local = {n: {"image": jnp.asarray(b["image"])} for n, b in host_batch.items()}
  images = jax.jit(lambda b, r: step_lib.images01(spec, b, r))(local, pp_rng)
  os.makedirs(plots_dir, exist_ok=True)
  for name in shown:
    st = stream_steps[name]
    n = host_batch[name]["image"].shape[0]
    x = np.asarray(images[name])
    k = min(n, 8) if st.views > 1 else len(x)  # several views: the first 8 images' side by side
    x = np.stack([x[v * n:v * n + k] for v in range(st.views)], 1).reshape((-1,) + x.shape[1:])
    labels = np.repeat(np.asarray(host_batch[name]["label"])[:k], st.views)
    chain = config.streams[name].get("pp", "") or "none"
    plots.sample_grid(x, labels=labels, columns=8 if st.views == 1 else 2 * st.views,
                      path=os.path.join(plots_dir, f"samples_{name}.png"),
                      title=f"Stream '{name}' at step 0 after pp '{chain}'"
                      + (f", {st.views} views per image" if st.views > 1 else ""))


# --- the loop ----------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       artifacts: artifacts_lib.Artifacts | None = None) -> dict[str, float]:
  """Trains and evaluates as ``config`` says; returns the final results.

  ``artifacts`` resolves ``artifact:`` references when this run is a stage
  of a recipe (:func:`jaxrobust.stages.run`).
  """
  config_lib.validate(config)
  artifacts = artifacts or artifacts_lib.Artifacts()
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))

  # Everything below is built and checked before the first compilation.
  mesh = sharding_lib.make_mesh(config.mesh)
  spec = sources.get_spec(config.data.name, data_dir=config.data.data_dir)
  num_classes = resolve_num_classes(config, spec)
  image_shape = pipeline.image_shape(spec, config.data.image_size)
  train_input, stream_steps = build_streams(config, num_classes=num_classes,
                                            image_shape=image_shape, artifacts=artifacts)
  main = train_input.streams["train"]
  total_steps = streams_lib.num_steps(config.num_steps, config.num_epochs, main)
  modules = build_modules(config, num_classes=num_classes, image_shape=image_shape,
                          total_steps=total_steps,
                          steps_per_epoch=streams_lib.steps_per_epoch(main))
  constants = load_constants(config, artifacts)
  updates = build_updates(config, modules, stream_steps, constants, artifacts)
  loss_stats = sorted({k for u in updates for k in u.stats_keys})
  abstract = state_lib.abstract_state(modules, loss_stats)
  for name, m in modules.items():
    where = ("config.model.trainable" if name == CLASSIFIER
             else f"config.modules.{name}.model.trainable")
    trainable_paths(abstract.modules[name].params, m.trainable, where)
  state_shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding_rules)
  batch_sharding = sharding_lib.data_sharding(mesh, config.data_axes)
  replicated = sharding_lib.replicated(mesh)
  evaluators = evaluators_lib.build_evaluators(
      config, modules, num_classes=num_classes, image_shape=image_shape,
      batch_sharding=batch_sharding, save_dir=os.path.join(workdir, "artifacts"),
      artifacts=artifacts)
  meta = _meta(config, modules, abstract)

  ckpt_dir = os.path.join(workdir, "checkpoints")
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints,
                                       asynchronous=config.async_checkpointing)
  state, start_step = _initial_state(config, modules, abstract, state_shardings, checkpointer,
                                     meta, train_input, artifacts)
  step_fn = step_lib.make_train_step(
      step_lib.StepSpec(modules=modules, streams=stream_steps, updates=updates,
                        num_classes=num_classes),
      axis_name="batch" if config.parallelism == "pmap" else None)
  const = {k: jnp.asarray(v) for k, v in constants.items()}
  if config.parallelism == "pmap":
    devices = jax.local_devices()
    compiled_step = step_lib.pmap_train_step(step_fn)
    state = step_lib.replicate_for_pmap(state, devices)
    put_batch = lambda b: pipeline.to_pmap(b, len(devices))
    host_state = step_lib.unreplicate
  else:
    compiled_step = step_lib.jit_train_step(step_fn, state_shardings, batch_sharding, replicated)
    const = jax.device_put(const, replicated)
    put_batch = lambda b: pipeline.to_global(b, batch_sharding)
    host_state = lambda s: s

  writer = metric_writers.create_writer(workdir, resume_step=start_step or None)
  if start_step == 0 and is_main:
    writer.write_hparams(config_lib.flat_hparams(config))

  def save(step: int) -> None:
    checkpointer.save(step, host_state(state), data=train_input.checkpoint_args(), meta=meta)

  last_saved = start_step if start_step else None
  pending: tuple[int, Any] | None = None
  window: list[dict[str, float]] = []
  # A copy: the state's own buffer is donated to the step.
  root_rng = np.asarray(jax.device_get(host_state(state).rng))
  bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
             disable=not (config.progress_bar and is_main), desc="train")
  t_train = time.time()
  preemption = _Preemption()
  try:
    for step in range(start_step, total_steps):
      host_batch = next(train_input)
      if step == 0 and config.plots and is_main:
        _plot_stream_samples(config, stream_steps, host_batch, root_rng,
                             os.path.join(workdir, "plots"))
      batch = put_batch(host_batch)
      state, metrics = compiled_step(state, batch, root_rng, const)
      # Reading the previous step's metrics keeps at most two steps in flight:
      # NaN is caught one step late at most, the host never runs far ahead,
      # and XLA:CPU with forced host devices (jax 0.10.2) deadlocks in its
      # all-reduce rendezvous when dozens of collective programs are queued.
      if pending is not None:
        window.append(_check_finite(*pending, last_saved, ckpt_dir))
      pending = (step + 1, metrics)
      done = step + 1
      eval_due = any(e.every_steps > 0 and done % e.every_steps == 0
                     for e in evaluators.values())
      boundary = (done % config.log_every_steps == 0 or done == total_steps
                  or done % config.checkpoint_every_steps == 0 or eval_due)
      if boundary:
        window.append(_check_finite(*pending, last_saved, ckpt_dir))
        pending = None
      if window and (done % config.log_every_steps == 0 or done == total_steps):
        avg = {f"train/{k}" if not k.startswith("train/") else k:
               float(np.mean([w[k] for w in window])) for k in window[-1]}
        avg["train/steps_per_second"] = (done - start_step) / max(time.time() - t_train, 1e-9)
        writer.write_scalars(done, avg)
        loss_key = "train/loss" if "train/loss" in avg else next(
            (k for k in avg if k.endswith("/loss")), None)
        if loss_key:
          bar.set_postfix(loss=f"{avg[loss_key]:.4f}")
        window = []
      if done % config.checkpoint_every_steps == 0 and done != total_steps:
        save(done)
        last_saved = done
      if eval_due and done != total_steps:
        writer.write_scalars(done, evaluators_lib.run(evaluators, host_state(state), step=done))
      bar.update(1)
      if done != total_steps and preemption.due(done):
        if pending is not None:
          window.append(_check_finite(*pending, last_saved, ckpt_dir))
        if last_saved != done:
          save(done)  # finished by the close() below, before the error leaves
        writer.flush()
        log.warning("preempted (SIGTERM) at step %d: checkpoint saved", done)
        raise PreemptedError(done, ckpt_dir)
  except BaseException:
    checkpointer.close()  # finish the asynchronous saves already started (the last good one)
    raise
  finally:
    preemption.close()
    bar.close()
  train_seconds = time.time() - t_train
  if start_step < total_steps:
    save(total_steps)
  results = evaluators_lib.run(evaluators, host_state(state), final=True,
                               plots_dir=os.path.join(workdir, "plots") if config.plots else None)
  checkpointer.close()
  results.update({"train/steps": float(total_steps), "train/seconds": train_seconds,
                  "train/examples_per_second":
                      (total_steps - start_step) * main.global_batch_size
                      / max(train_seconds, 1e-9),
                  "wall_seconds": time.time() - t_start})
  writer.write_scalars(total_steps, results)
  writer.flush()
  writer.close()
  if is_main:
    write_json(os.path.join(workdir, "results.json"), results)
  return results
