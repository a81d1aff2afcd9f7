"""Checkpoints: a small facade over orbax's ``CheckpointManager``.

A checkpoint of step ``s`` lives in ``<workdir>/checkpoints/<s>/`` with items

* ``state`` -- the :class:`~jaxrobust.train_state.TrainState` (every array,
  restored straight into the run's shardings, so a run can resume on a
  different mesh),
* ``data_<stream>`` -- each grain input iterator's position (per process),
* ``meta`` -- JSON: dataset, and per module its model name, number of classes
  and parameter shapes.

Saves are asynchronous and atomic: orbax writes into a temporary directory and
renames it when every item is committed, so a run killed at any moment leaves
only complete checkpoints (temporary leftovers are cleaned on restart). Keeping
this module small means moving to orbax's V1 API touches only this file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrobust.sharding import path_str


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model/config that tries to load it."""


def param_shapes(params: Any) -> dict[str, list[int]]:
  """{'conv1/kernel': [3, 3, 1, 16], ...} for the checkpoint metadata."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(p): list(np.shape(x)) for p, x in flat}


def resolve_directory(path: str) -> str:
  """A run's workdir or its ``checkpoints/`` directory -> the latter."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


class Checkpointer:
  """Saves and restores a run's state, input positions and metadata."""

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               asynchronous: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=asynchronous, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data: Mapping[str, Any],
           meta: Mapping[str, Any]) -> None:
    """Starts an (async) save of ``state`` at ``step``; ``data`` holds grain
    ``CheckpointSave`` args keyed ``data_<stream>``."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta)), **dict(data))
    self.manager.save(int(step), args=args, force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def check_compatible(self, step: int, expected: Mapping[str, Any]) -> None:
    """Raises :class:`CheckpointMismatchError` naming what differs."""
    meta = self.read_meta(step)
    problems = []
    got_modules, want_modules = meta.get("modules", {}), expected["modules"]
    if sorted(got_modules) != sorted(want_modules):
      problems.append(f"modules: checkpoint has {sorted(got_modules)}, the config asks for "
                      f"{sorted(want_modules)}")
    for mod in sorted(set(got_modules) & set(want_modules)):
      got, want = got_modules[mod], want_modules[mod]
      for key in ("model", "num_classes"):
        if got.get(key) != want[key]:
          problems.append(f"{mod} {key}: checkpoint has {got.get(key)!r}, the config asks for "
                          f"{want[key]!r}")
      shapes_got, shapes_want = got.get("param_shapes", {}), want["param_shapes"]
      for name in sorted(set(shapes_got) | set(shapes_want)):
        if shapes_got.get(name) != shapes_want.get(name):
          problems.append(f"{mod} param {name}: checkpoint {shapes_got.get(name)}, model "
                          f"{shapes_want.get(name)}")
          if len(problems) > 8:
            problems.append("...")
            break
    if problems:
      raise CheckpointMismatchError(
          f"the checkpoint at {self.directory}/{step} does not match this run:\n  "
          + "\n  ".join(problems)
          + "\nUse a new --workdir, or config.init_from to fine-tune from it.")

  def restore(self, step: int, abstract_state: Any, *, data: Mapping[str, Any]
              ) -> Any:
    """Restores the state (into the shardings of ``abstract_state``, a pytree
    of ``jax.ShapeDtypeStruct``) and the input iterators in ``data`` in place."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), **dict(data))
    return self.manager.restore(int(step), args=args)["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_pretrained(path: str, step: int = -1, *, module: str = "classifier",
                    where: str = "config.init_from") -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads ``(params, batch_stats)`` of ``module`` as host numpy arrays from a
  run's checkpoint (``step=-1``: the latest), for fine-tuning. ``path`` is a
  run's workdir or its ``checkpoints/`` directory."""
  directory = resolve_directory(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{where}.path: no checkpoint directory at {path!r}.")
  with _orbax_quiet():
    return _load_module(directory, step, module, where)


@contextlib.contextmanager
def _orbax_quiet():
  """Hides orbax's warnings about the items a partial read leaves out (the
  data iterators) and about opening a directory read-only."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _load_module(directory: str, step: int, module: str, where: str
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  steps = list(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"{where}.path: no checkpoint in {directory!r}.")
  if step < 0:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f"{where}.step={step}: not in {directory!r} (has {sorted(steps)}).")
  tree = manager.item_metadata(step)["state"].tree
  modules = tree.get("modules", {})
  if module not in modules:
    manager.close()
    raise CheckpointMismatchError(f"{where}: the checkpoint {directory}/{step} has no module "
                                  f"{module!r} (it has {sorted(modules)}).")
  wanted = {"modules": {module: {k: modules[module][k] for k in ("params", "batch_stats")
                                 if k in modules[module]}}}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(wanted, restore_args=restore_args, partial_restore=True)))
  manager.close()
  state = restored["state"]["modules"][module]
  return state["params"], state.get("batch_stats", {})
