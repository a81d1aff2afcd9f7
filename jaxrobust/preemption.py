"""SIGTERM as a request to stop at the next safe point.

A scheduler (Cloud TPU maintenance, Slurm, Kubernetes) sends SIGTERM and
kills the job after a grace period. While :func:`watching` is active -- the
trainer's loop, and a whole recipe in :func:`jaxrobust.stages.run` -- SIGTERM
only sets a process-wide flag, and the work stops where nothing is lost:

* the training loop after the step it is in (a checkpoint of that step is
  saved), raising :class:`PreemptedError`;
* a recipe after the stage it is in (its record is written, so the same command
  skips it), also when the signal came during a stage's final evaluation or a
  task that is not a training run.

Several processes with JAX's preemption service keep JAX's own notifier
(:func:`jax_sync`): every process must stop at the same step, which only the
service's sync point guarantees, so :func:`watching` installs no handler then.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import jax

_state = {"requested": False, "depth": 0, "previous": None}


class PreemptedError(RuntimeError):
  """SIGTERM arrived and the work stopped at a safe point; the same command
  resumes it. ``step``: the training step it stopped after, if in a loop."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


def jax_sync() -> bool:
  """Whether JAX's preemption service owns SIGTERM (several processes)."""
  return (jax.process_count() > 1 and jax.distributed.is_initialized()
          and bool(jax.config.jax_enable_preemption_service))


def _handle(signum, frame) -> None:
  del signum, frame
  _state["requested"] = True


@contextlib.contextmanager
def watching() -> Iterator[None]:
  """SIGTERM sets :func:`requested` instead of ending the process, for the
  duration (re-entrant: a training loop inside a recipe shares the recipe's
  flag). Only the main thread can install a handler; elsewhere, and under
  :func:`jax_sync`, this does nothing."""
  install = (_state["depth"] == 0 and threading.current_thread() is threading.main_thread()
             and not jax_sync())
  if install:
    _state["previous"] = signal.signal(signal.SIGTERM, _handle)
    _state["requested"] = False
  _state["depth"] += 1
  try:
    yield
  finally:
    _state["depth"] -= 1
    if _state["depth"] == 0:
      if _state["previous"] is not None:
        signal.signal(signal.SIGTERM, _state["previous"])
      _state["previous"] = None
      _state["requested"] = False


def requested() -> bool:
  """Whether SIGTERM arrived while :func:`watching` was active."""
  return bool(_state["requested"])
