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
import errno
import logging
import os
import re
import shutil
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrobust.files import WriteError
from jaxrobust.sharding import path_str


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model/config that tries to load it."""


class CheckpointDamagedError(RuntimeError):
  """No checkpoint of a directory can be read."""


DAMAGED = "damaged_checkpoints"  # sibling directory damaged steps are moved to
log = logging.getLogger("jaxrobust")


def _why(e: BaseException) -> str:
  """One line saying what failed (orbax/tensorstore errors span many lines)."""
  first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
  return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


def newest_readable(steps, read: Callable[[int], Any], on_damage: Callable[[int, str], None],
                    message: Callable[[str], str]) -> tuple[Any, int]:
  """``(read(step), step)`` for the newest of ``steps`` that reads back
  whole. Any failure but :class:`CheckpointMismatchError` (a checkpoint of
  another model, not damage) is damage: ``on_damage(step, why)``, then the
  previous step; none readable -> :class:`CheckpointDamagedError` with
  ``message('<step> (<why>); ...')``."""
  damaged = []
  for step in sorted(steps, reverse=True):
    try:
      return read(step), step
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001 -- any failure to read is damage
      why = _why(e)
      damaged.append(f"{step} ({why})")
      on_damage(step, why)
  raise CheckpointDamagedError(message("; ".join(damaged)))


def param_shapes(params: Any) -> dict[str, list[int]]:
  """{'conv1/kernel': [3, 3, 1, 16], ...} for the checkpoint metadata."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(p): list(np.shape(x)) for p, x in flat}


def resolve_directory(path: str) -> str:
  """A run's workdir or its ``checkpoints/`` directory (relative or absolute)
  -> the latter, absolute (orbax needs absolute paths)."""
  path = os.path.abspath(os.path.expanduser(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def resolve_checkpoint(path: str, step: int = -1) -> tuple[str, int]:
  """``(checkpoints directory, step)`` from a workdir, a ``checkpoints/``
  directory or one step's directory (``.../checkpoints/400``, which fixes the
  step), relative or absolute; ``step=-1``: the newest intact one."""
  path = os.path.abspath(os.path.expanduser(path))
  name = os.path.basename(path.rstrip(os.sep))
  if name.isdigit() and os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
    if step >= 0 and step != int(name):
      raise FileNotFoundError(f"{path} is the checkpoint of step {name}, not of step {step}.")
    return os.path.dirname(path), int(name)
  return resolve_directory(path), step


def _write_reason(e: BaseException) -> str:
  """What the operating system said about a failed write (tensorstore reports
  it inside its own message, with the errno)."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  code = re.search(r"os_error_code='(\d+)'", str(e))
  return os.strerror(int(code.group(1))) if code else _why(e)


def _quiet_orbax_thread_errors(args: Any, previous: Callable[[Any], None]) -> None:
  """``threading.excepthook``: an exception in one of orbax's save threads is
  re-raised by ``wait_until_finished`` in the main thread (and reported
  there as one line); everything else goes to the previous hook."""
  tb = args.exc_traceback
  while tb is not None:
    if "/orbax/" in tb.tb_frame.f_code.co_filename:
      log.debug("orbax save thread failed: %s", args.exc_value)
      return
    tb = tb.tb_next
  previous(args)


def space_needed(state: Any) -> int:
  """Bytes a checkpoint of ``state`` needs on this process's disk: its share
  of the arrays' bytes plus 5%, and 256 KiB for the metadata files and the
  file system's blocks."""
  arrays = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(state) if hasattr(x, "shape"))
  return int(arrays / jax.process_count() * 1.05) + (256 << 10)


class _OrbaxThreadErrors(logging.Filter):
  """Drops orbax's log records of exceptions in its save threads: they are
  re-raised by ``wait_until_finished`` and reported there as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and record.levelno >= logging.ERROR
                and "/orbax/" in (record.pathname or ""))


class Checkpointer:
  """Saves and restores a run's state, input positions and metadata.

  A save that fails (a full disk, a read-only directory) raises
  :class:`~jaxrobust.files.WriteError` naming the step and what the
  operating system said -- at :meth:`save` or, for an asynchronous save, at
  the next :meth:`save` or :meth:`close`. The checkpoints written before stay
  intact; orbax's temporary directory of the failed one is removed when the
  run starts again.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               asynchronous: bool = True, read_only: bool = False, keep_protected: bool = False):
    self.directory = os.path.abspath(directory)
    # keep_protected: the steps in `protected` (early stopping's best step) are
    # never pruned; the newest `max_to_keep` others are kept (pruned here, not by orbax).
    self.max_to_keep = max_to_keep
    self.protected: set[int] = set()
    self._prune_here = keep_protected
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if keep_protected else max_to_keep, create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=asynchronous, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving: int | None = None  # the step of a save that may still be in flight
    self._hook = None
    self._filter = _OrbaxThreadErrors()
    if not read_only:
      previous = threading.excepthook
      self._hook = lambda args: _quiet_orbax_thread_errors(args, previous)
      self._previous_hook = previous
      threading.excepthook = self._hook
      logging.getLogger("absl").addFilter(self._filter)

  def _check_room(self, step: int, state: Any) -> None:
    """A save that cannot fit is refused before orbax starts it (a failed
    orbax write leaves its threads printing tracebacks)."""
    need, free = space_needed(state), shutil.disk_usage(self.directory).free
    if free < need:
      raise WriteError(
          f"could not write the checkpoint of step {step} in {self.directory}: "
          f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.2f} MiB free, the checkpoint needs about "
          f"{need / 2**20:.2f} MiB). The checkpoints written before are intact; run the same "
          "command again, once there is room, to resume.")

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many kinds
      step = self._saving if step is None else step
      self._saving = None
      raise WriteError(f"could not write the checkpoint of step {step} in {self.directory}: "
                       f"{_write_reason(e)}. The checkpoints written before are intact; run "
                       "the same command again, once there is room, to resume.") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data: Mapping[str, Any],
           meta: Mapping[str, Any]) -> None:
    """Starts an (async) save of ``state`` at ``step``; ``data`` holds grain
    ``CheckpointSave`` args keyed ``data_<stream>``."""
    # The iterator files are per process: the count says whether they fit a restore.
    meta = {**meta, "process_count": jax.process_count()}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta), **dict(data))
    with self._writing(None):
      self.manager.wait_until_finished()  # the previous save's failure is reported as its own
    if self._prune_here and self.max_to_keep:
      self._prune(self.max_to_keep - 1)  # room for this one
    self._check_room(int(step), state)
    self._saving = int(step)
    with self._writing(int(step)):
      self.manager.save(int(step), args=args, force=True)

  def _prune(self, keep: int) -> None:
    """Deletes all but the newest ``keep`` unprotected steps (and the protected ones)."""
    steps = sorted(self.all_steps())
    free = [s for s in steps if s not in self.protected]
    for s in free[:max(len(free) - max(keep, 0), 0)]:
      self.manager.delete(s)

  def wait(self) -> None:
    """Finishes the save in flight (raising :class:`~jaxrobust.files.WriteError` if it failed)."""
    with self._writing(None):
      self.manager.wait_until_finished()
    self._saving = None

  def delete_after(self, step: int) -> None:
    """Deletes every checkpoint newer than ``step``, so ``step`` is the newest
    (early stopping hands on its best step this way)."""
    with self._writing(None):
      self.manager.wait_until_finished()
    for s in sorted(self.all_steps()):
      if s > step:
        self.manager.delete(s)

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

  def restore(self, step: int, abstract_state: Any, *, data: Mapping[str, Any],
              seek: Callable[[int], None] | None = None) -> Any:
    """Restores the state (into the shardings of ``abstract_state``, a pytree
    of ``jax.ShapeDtypeStruct``) and the input iterators in ``data`` in place.

    A checkpoint saved by another number of processes has no iterator state
    for this process: the state alone is restored and ``seek(step)`` sets the
    iterators (their position is the step for any process count).
    """
    saved_by = self.read_meta(step).get("process_count") if seek is not None else None
    if saved_by is None or saved_by == jax.process_count():
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), **dict(data))
      try:
        return self.manager.restore(int(step), args=args)["state"]
      except Exception as e:  # noqa: BLE001
        # Checkpoints written before "process_count" was recorded: grain names
        # the missing per-process file.
        if saved_by is not None or seek is None or not re.search(r"process_\d+-of-\d+", str(e)):
          raise
    state = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
    seek(int(step))
    log.warning("checkpoint %s/%d was saved by %s processes, this run has %d: input positions "
                "set from the step", self.directory, step, saved_by or "another number of",
                jax.process_count())
    return state

  def restore_latest(self, abstract_state: Any, *, data: Mapping[str, Any],
                     expected_meta: Mapping[str, Any],
                     seek: Callable[[int], None] | None = None
                     ) -> tuple[Any, int] | tuple[None, None]:
    """The newest checkpoint that reads back whole, as ``(state, step)``;
    ``(None, None)`` when there is none.

    A damaged step (missing or truncated array files, unreadable metadata or
    iterator state, an empty directory) is skipped with one log line saying
    which and why, and moved to ``<run>/damaged_checkpoints/<step>`` so the
    run can write that step again; the previous one is tried. A checkpoint
    that reads but belongs to another model is not damage: that raises
    :class:`CheckpointMismatchError`. When every step is damaged,
    :class:`CheckpointDamagedError` names the directory.
    """
    steps = self.all_steps()
    if not steps:
      return None, None

    def read(step: int) -> Any:
      self.check_compatible(step, expected_meta)
      return self.restore(step, abstract_state, data=data, seek=seek)

    def damaged(step: int, why: str) -> None:
      log.warning("checkpoint %s/%d is damaged (%s); skipping it", self.directory, step, why)
      self._set_aside(step)

    return newest_readable(
        steps, read, damaged,
        lambda listed: f"no intact checkpoint in {self.directory}: {listed}. The damaged steps "
        f"were moved to {os.path.join(os.path.dirname(self.directory), DAMAGED)}; start the run "
        "again to train from scratch, or use a new --workdir.")

  def _set_aside(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(src):
      dst = os.path.join(os.path.dirname(self.directory), DAMAGED, str(step))
      suffix = 1
      while os.path.exists(dst):
        dst = os.path.join(os.path.dirname(self.directory), DAMAGED, f"{step}.{suffix}")
        suffix += 1
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.rename(src, dst)
    self.manager.reload()

  def close(self) -> None:
    """Finishes the saves in flight (raising :class:`~jaxrobust.files.WriteError` if one
    failed) and releases the manager."""
    try:
      with self._writing(None):
        self.manager.wait_until_finished()
      self._saving = None
      if self._prune_here and self.max_to_keep:
        self._prune(self.max_to_keep)
    finally:
      self.manager.close()
      if self._hook is not None and threading.excepthook is self._hook:
        threading.excepthook = self._previous_hook
      logging.getLogger("absl").removeFilter(self._filter)


def load_pretrained(path: str, step: int = -1, *, module: str = "classifier",
                    where: str = "config.init_from") -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads ``(params, batch_stats)`` of ``module`` as host numpy arrays from a
  run's checkpoint (``step=-1``: the newest that reads back whole; damaged
  ones are skipped with a log line), for fine-tuning. ``path``: a run's
  workdir, its ``checkpoints/`` directory or one step's directory, relative
  or absolute -- or a PyTorch ``state_dict`` file (``.pt``/``.pth``, read with
  ``torch.load(weights_only=True)``, ``.npz`` or ``.safetensors``) of an
  architecture :mod:`jaxrobust.convert` knows, named by its keys (a released
  WRN-40-2 or torchvision ResNet-50 checkpoint; the caller checks it against
  its model)."""
  from jaxrobust import convert
  if convert.is_state_dict_file(path):
    if step >= 0:
      raise ValueError(f"{where}.step={step}: {path!r} is a state_dict file, which has no "
                       "steps; leave the step at -1.")
    sd = convert.read_state_dict(os.path.abspath(os.path.expanduser(path)), where=f"{where}.path")
    arch = convert.detect_arch(sd, where=f"{where}.path {path!r}")
    try:
      return convert.from_torch(sd, arch=arch)
    except ValueError as e:
      raise CheckpointMismatchError(f"{where}.path {path!r}: {e}") from None
  directory, step = resolve_checkpoint(path, step)
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
  if step >= 0:
    if step not in steps:
      raise FileNotFoundError(f"{where}.step={step}: not in {directory!r} (has {sorted(steps)}).")
    return _read_module(manager, directory, step, module, where)
  try:
    return newest_readable(
        steps, lambda s: _read_module(manager, directory, s, module, where),
        lambda s, why: log.warning("%s: checkpoint %s/%d is damaged (%s); trying the previous "
                                   "one", where, directory, s, why),
        lambda listed: f"{where}: no intact checkpoint in {directory}: {listed}.")[0]
  except CheckpointDamagedError:
    manager.close()
    raise


def _read_module(manager, directory: str, step: int, module: str, where: str
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
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
