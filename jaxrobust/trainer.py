"""The one trainer: the loop over a built run.

:func:`train` takes a :class:`~jaxrobust.build.Run` -- everything derived from
the config and checked before anything is compiled (:mod:`jaxrobust.build`)
-- resumes from ``<workdir>/checkpoints`` when a checkpoint exists (else
initialises, from ``init_from`` where given), runs the compiled step, logs,
checkpoints, evaluates, and writes

* ``<workdir>/config.json`` -- the resolved config,
* ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard/`` -- training curves,
* ``<workdir>/results.json`` -- flat final metrics such as ``test/accuracy``,
* ``<workdir>/plots/`` -- the evaluators' figures.

:func:`train_and_evaluate` is both steps from a config. Methods extend the
run only through the registries the builder reads; the trainer imports no
method. Multi-stage recipes run it once per ``train`` stage
(:mod:`jaxrobust.stages`); the ``train`` stage task is registered here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import config as config_lib
from jaxrobust import early_stopping as es_lib
from jaxrobust import evaluators as evaluators_lib
from jaxrobust import files
from jaxrobust import metric_writers
from jaxrobust import preemption
from jaxrobust import pretrained
from jaxrobust import tasks
from jaxrobust import train_state as state_lib
from jaxrobust import train_step as step_lib
from jaxrobust.build import Run, build_run, where_of
from jaxrobust.data import pipeline
from jaxrobust.preemption import PreemptedError

log = logging.getLogger("jaxrobust")


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN or inf."""


class _Preemption:
  """Whether to stop after this step: SIGTERM seen by this process
  (:mod:`jaxrobust.preemption`) or, on several processes, JAX's preemption
  sync point (every process stops at the same step, so none waits forever in
  a collective)."""

  def __init__(self):
    self._synced = preemption.jax_sync()
    self._watch = contextlib.ExitStack()
    self._watch.enter_context(preemption.watching())

  def due(self, step: int) -> bool:
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return preemption.requested()

  def close(self) -> None:
    self._watch.close()


# --- state -----------------------------------------------------------------------

def _init_from(run: Run, name: str, state: state_lib.TrainState) -> state_lib.TrainState:
  """Copies pre-trained parameters into module ``name`` as its init_from says."""
  spec = run.init_from[name]
  if not spec["path"]:
    return state
  where = where_of(name, "init_from")
  path = spec["path"]
  path = (run.artifacts.path(path, f"{where}.path") if artifacts_lib.is_ref(path)
          else os.path.abspath(path))
  src_params, src_stats = ckpt_lib.load_pretrained(path, spec["step"], where=where)
  ms = state.modules[name]
  params, stats, reset = pretrained.merge_pretrained(
      ms.params, ms.batch_stats, src_params, src_stats, reset_head=spec["reset_head"],
      load_batch_stats=spec["load_batch_stats"], skip=spec.get("skip", ""))
  modules = dict(state.modules)
  shardings = run.state_shardings.modules[name]
  modules[name] = ms.replace(params=jax.device_put(params, shardings.params),
                             batch_stats=jax.device_put(stats, shardings.batch_stats))
  total = len(jax.tree.leaves(ms.params))
  log.warning("init_from: module %s loaded %d of %d parameter arrays from %s; re-initialised: %s",
              name, total - len(reset), total,
              path, ", ".join(reset) if reset else "none")
  return state.replace(modules=modules)


def _abstract_state(run: Run) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      run.abstract, run.state_shardings)


def initial_state(run: Run, checkpointer: ckpt_lib.Checkpointer
                  ) -> tuple[state_lib.TrainState, int]:
  """Resume from the workdir's latest checkpoint (state and input positions),
  else initialise (pre-trained parameters where ``init_from`` says); returns
  the state, sharded as the run's state shardings, and its step."""
  target = _abstract_state(run)
  state, step = checkpointer.restore_latest(target, data=run.train_input.restore_args(),
                                            expected_meta=run.meta, seek=run.train_input.seek)
  if state is not None:
    log.warning("resumed from step %d (%s/%d)", step, checkpointer.directory, step)
    return state, step
  loss_stats = sorted(run.abstract.loss_stats)
  state = jax.jit(lambda r: state_lib.create_state(run.modules, r, loss_stats),
                  out_shardings=run.state_shardings,
                  compiler_options=state_lib.init_compiler_options(run.mesh)
                  )(jax.random.PRNGKey(run.config.seed))
  for name in run.modules:
    state = _init_from(run, name, state)
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
  """Builds the run ``config`` describes (:func:`jaxrobust.build.build_run`),
  trains and evaluates it; returns the final results.

  ``artifacts`` resolves ``artifact:`` references when this run is a stage
  of a recipe (:func:`jaxrobust.stages.run`).
  """
  return train(build_run(config, workdir, artifacts=artifacts))


def train(run: Run) -> dict[str, float]:
  """The loop over a built run; returns the final results."""
  config, workdir = run.config, run.workdir
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    files.write_json(os.path.join(workdir, "config.json"),
                     json.loads(config.to_json_best_effort()), what="config")
  evaluators = run.evaluators
  ckpt_dir = run.checkpoint_dir
  stopper = es_lib.EarlyStopping.from_config(config, workdir)
  keep_best = stopper is not None and stopper.restore_best
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints,
                                       asynchronous=config.async_checkpointing,
                                       keep_protected=keep_best)
  state, start_step = initial_state(run, checkpointer)
  if stopper is not None:
    stopper.load(start_step)
    if keep_best and stopper.best_step is not None:
      checkpointer.protected = {stopper.best_step}
    if stopper.stopped_at is not None:
      log.warning("early stopping: training had ended at step %d; finishing the run",
                  stopper.stopped_at)
  total_steps = run.total_steps
  step_fn = step_lib.make_train_step(
      run.step_spec, axis_name="batch" if config.parallelism == "pmap" else None)
  const = {k: jnp.asarray(v) for k, v in run.constants.items()}
  if config.parallelism == "pmap":
    devices = jax.local_devices()
    compiled_step = step_lib.pmap_train_step(step_fn)
    state = step_lib.replicate_for_pmap(state, devices)
    put_batch = lambda b: pipeline.to_pmap(b, len(devices))
    host_state = step_lib.unreplicate
    to_devices = lambda s: step_lib.replicate_for_pmap(s, devices)
  else:
    compiled_step = step_lib.jit_train_step(step_fn, run.state_shardings, run.batch_sharding,
                                            run.replicated)
    const = jax.device_put(const, run.replicated)
    put_batch = lambda b: pipeline.to_global(b, run.batch_sharding)
    host_state = lambda s: s
    to_devices = lambda s: s

  writer = metric_writers.create_writer(workdir, resume_step=start_step or None)
  if start_step == 0 and is_main:
    writer.write_hparams(config_lib.flat_hparams(config))
  train_input = run.train_input

  def save(step: int) -> None:
    checkpointer.save(step, host_state(state), data=train_input.checkpoint_args(), meta=run.meta)

  last_saved = start_step if start_step else None
  pending: tuple[int, Any] | None = None
  window: list[dict[str, float]] = []
  # A copy: the state's own buffer is donated to the step.
  root_rng = np.asarray(jax.device_get(host_state(state).rng))
  bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
             disable=not (config.progress_bar and is_main), desc="train")
  t_train = time.time()
  preemption = _Preemption()
  at_step = start_step  # the step of `state`
  end = start_step if stopper is not None and stopper.stopped_at is not None else total_steps
  try:
    for step in range(start_step, end):
      host_batch = next(train_input)
      if step == 0 and config.plots and is_main:
        _plot_stream_samples(config, run.stream_steps, host_batch, root_rng,
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
      at_step = done
      if eval_due and done != total_steps:
        round_results = evaluators_lib.run(evaluators, host_state(state), step=done)
        writer.write_scalars(done, round_results)
        _write_images(writer, evaluators, done, workdir if config.plots else None, is_main)
        if stopper is not None:
          if stopper.update(done, round_results) and keep_best:
            checkpointer.protected = {done}
            if last_saved != done:
              save(done)
              last_saved = done
          if stopper.should_stop:
            if last_saved != done and not keep_best:
              save(done)  # without restore_best the run ends on (and hands on) this step
              last_saved = done
            checkpointer.wait()
            stopper.stop(done)
            log.warning("early stopping at step %d: %s has not improved by more than %g for "
                        "%d rounds (best %.6g at step %d)", done, stopper.metric,
                        stopper.min_delta, stopper.patience, stopper.best_value,
                        stopper.best_step)
            bar.update(1)
            break
      bar.update(1)
      if done != total_steps and preemption.due(done):
        if pending is not None:
          window.append(_check_finite(*pending, last_saved, ckpt_dir))
        if last_saved != done:
          save(done)  # finished by the close() below, before the error leaves
        writer.flush()
        log.warning("preempted (SIGTERM) at step %d: checkpoint saved", done)
        raise PreemptedError(f"preempted (SIGTERM) at step {done}: checkpoint saved in "
                             f"{ckpt_dir}; run the same command again to resume.", step=done)
    bar.close()
    train_seconds = time.time() - t_train
    stopped = stopper is not None and stopper.stopped_at is not None
    if not stopped and start_step < total_steps:
      save(total_steps)

    def final_results(s: Any) -> dict[str, float]:
      return evaluators_lib.run(evaluators, host_state(s), final=True,
                                plots_dir=os.path.join(workdir, "plots") if config.plots
                                else None)

    results = None
    if stopper is not None and not stopped:  # trained to the end: its evaluation is a round too
      results = final_results(state)
      if stopper.update(total_steps, results) and keep_best:
        checkpointer.protected = {total_steps}
      checkpointer.wait()
      stopper.stop(total_steps)
    if keep_best:
      best = stopper.best_step
      checkpointer.delete_after(best)  # the newest checkpoint, the one handed on, is the best
      if best != at_step:
        log.warning("early stopping: restoring the best step %d (%s %.6g)", best, stopper.metric,
                    stopper.best_value)
        state = to_devices(checkpointer.restore(best, _abstract_state(run),
                                                data=train_input.restore_args(),
                                                seek=train_input.seek))
        at_step, results = best, None
    if results is None:
      results = final_results(state)
  except BaseException:
    try:
      checkpointer.close()  # finish the asynchronous saves already started (the last good one)
    except files.WriteError as e:  # the error on its way out says why the run stopped
      log.warning("%s", e)
    raise
  finally:
    preemption.close()
    bar.close()
  checkpointer.close()
  trained = stopper.stopped_at if stopper is not None else total_steps
  results.update({"train/steps": float(trained), "train/seconds": train_seconds,
                  "train/examples_per_second":
                      max(trained - start_step, 0) * run.global_batch_size
                      / max(train_seconds, 1e-9),
                  "wall_seconds": time.time() - t_start})
  if stopper is not None:
    results.update(stopper.results())
  writer.write_scalars(total_steps, results)
  _write_images(writer, evaluators, total_steps, workdir if config.plots else None, is_main)
  writer.flush()
  writer.close()
  if is_main:
    files.write_json(os.path.join(workdir, "results.json"), results, what="results")
  return results


def _write_images(writer: Any, evaluators: Mapping[str, Any], step: int, workdir: str | None,
                  is_main: bool) -> None:
  """The images the evaluators drew (a generator's samples) to TensorBoard
  and, with plots on, to ``plots/<name>_step<step>.png``."""
  images = evaluators_lib.take_images(evaluators)
  if not images:
    return
  writer.write_images(step, images)
  if workdir is not None and is_main:
    from jaxrobust import plots
    for name, x in images.items():
      slug = name.replace("/", "_")
      plots.sample_grid(x, max_images=len(x), path=os.path.join(
          workdir, "plots", f"{slug}_step{step}.png"), title=f"{name} at step {step}")


@tasks.TASKS.register("train")
def train_task(ctx: tasks.StageContext) -> dict[str, float]:
  """Trains and evaluates (:func:`train`) in the stage's directory; its
  checkpoint is ``artifact:<stage>/checkpoint``."""
  return train(build_run(ctx.config, ctx.workdir, artifacts=ctx.artifacts,
                         validated=True))

