"""Early stopping: stop training when a validation metric stops improving.

``config.early_stopping`` (disabled while ``metric`` is empty)::

    c.early_stopping.metric = 'validation/accuracy'  # a key the evaluators return
    c.early_stopping.mode = 'max'        # 'max' | 'min'
    c.early_stopping.patience = 3        # evaluation rounds without improvement
    c.early_stopping.min_delta = 0.001   # an improvement must exceed this
    c.early_stopping.restore_best = True # the run ends on (and hands on) the best step

The rule is applied at every evaluation round (``config.eval_every_steps`` or
an evaluator's ``every_steps``) and at the end of training: a round improves
when its value beats the best so far by more than ``min_delta``; after
``patience`` rounds in a row without improvement training stops. With
``restore_best`` the checkpoint of every new best step is kept (never pruned
by ``keep_checkpoints``); when training ends the best state is restored, the
checkpoints after it are deleted -- so the newest checkpoint, which
``init_from`` and ``artifact:<stage>/checkpoint`` read, *is* the best step --
and the final evaluation is of that state.

The rule's state is ``<workdir>/early_stopping.json`` (written atomically at
every round): the rounds so far ``[[step, value], ...]`` and, once training
has ended, ``stopped_at``. A run resumed from the checkpoint of step ``s``
keeps the rounds up to ``s`` and recomputes the rest of the state from them,
so an interrupted run stops where an uninterrupted one would; a run that had
already stopped goes straight to its final evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax

from jaxrobust import files

STATE_FILE = "early_stopping.json"
MODES = ("max", "min")


def enabled(config: Any) -> bool:
  return bool(config.early_stopping.metric)


def check_config(config: Any) -> None:
  """Bad values of ``config.early_stopping``, named, before anything is built."""
  es = config.early_stopping
  where = "config.early_stopping"
  if not es.metric:
    return
  if not isinstance(es.metric, str) or "/" not in es.metric:
    raise ValueError(f"{where}.metric must be a result key of the evaluators such as "
                     f"'validation/accuracy', got {es.metric!r}.")
  if es.mode not in MODES:
    raise ValueError(f"{where}.mode must be 'max' or 'min', got {es.mode!r}.")
  if int(es.patience) < 1:
    raise ValueError(f"{where}.patience must be >= 1 (evaluation rounds), got {es.patience}.")
  if es.min_delta < 0:
    raise ValueError(f"{where}.min_delta must be >= 0, got {es.min_delta}.")
  periodic = config.eval_every_steps > 0 or any(
      int(ev.get("every_steps", config.eval_every_steps) or -1) > 0
      for ev in config.evaluators.values())
  if not periodic:
    raise ValueError(f"{where}.metric={es.metric!r}: no evaluator runs during training; set "
                     "config.eval_every_steps (or an evaluator's every_steps) > 0 so the rule "
                     "has rounds to look at.")


@dataclasses.dataclass
class EarlyStopping:
  """The rule and its state (see the module docstring)."""
  metric: str
  mode: str = "max"
  patience: int = 3
  min_delta: float = 0.0
  restore_best: bool = True
  path: str | None = None  # the state file; None: not persisted
  rounds: list[tuple[int, float]] = dataclasses.field(default_factory=list)
  stopped_at: int | None = None

  @classmethod
  def from_config(cls, config: Any, workdir: str) -> EarlyStopping | None:
    if not enabled(config):
      return None
    es = config.early_stopping
    return cls(metric=es.metric, mode=es.mode, patience=int(es.patience),
               min_delta=float(es.min_delta), restore_best=bool(es.restore_best),
               path=os.path.join(workdir, STATE_FILE))

  # --- state -------------------------------------------------------------------

  def _better(self, value: float, best: float) -> bool:
    if not math.isfinite(value):
      return False
    if not math.isfinite(best):
      return True
    return (value > best + self.min_delta if self.mode == "max"
            else value < best - self.min_delta)

  def _scan(self) -> tuple[int | None, float, int]:
    """``(best step, best value, rounds since the best)`` from the rounds."""
    best_step, best, since = None, math.nan, 0
    for step, value in self.rounds:
      if best_step is None or self._better(value, best):
        best_step, best, since = step, value, 0
      else:
        since += 1
    return best_step, best, since

  @property
  def best_step(self) -> int | None:
    return self._scan()[0]

  @property
  def best_value(self) -> float:
    return self._scan()[1]

  @property
  def should_stop(self) -> bool:
    return self._scan()[2] >= self.patience

  def load(self, resumed_step: int) -> None:
    """The state of a run resumed at ``resumed_step`` (0: a fresh start): the
    saved rounds up to that step (all of them, and ``stopped_at``, when the
    run had already stopped)."""
    if self.path is None or not os.path.exists(self.path) or resumed_step == 0:
      return
    with open(self.path, encoding="utf-8") as f:
      saved = json.load(f)
    if saved.get("metric") != self.metric or saved.get("mode") != self.mode:
      raise ValueError(
          f"config.early_stopping: {self.path} was written for metric {saved.get('metric')!r} "
          f"(mode {saved.get('mode')!r}), this run asks for {self.metric!r} ({self.mode!r}); "
          "use a new workdir.")
    rounds = [(int(s), float(v)) for s, v in saved.get("rounds", [])]
    self.stopped_at = saved.get("stopped_at")
    self.rounds = rounds if self.stopped_at is not None else [
        (s, v) for s, v in rounds if s <= resumed_step]

  def save(self) -> None:
    """Writes the state (process 0; every process keeps the same rounds)."""
    if self.path is None or jax.process_index() != 0:
      return
    best_step, best, since = self._scan()
    files.write_json(self.path, {
        "metric": self.metric, "mode": self.mode, "patience": self.patience,
        "min_delta": self.min_delta, "restore_best": self.restore_best,
        "rounds": [list(r) for r in self.rounds], "best_step": best_step,
        "best_value": best, "rounds_without_improvement": since,
        "stopped_at": self.stopped_at}, what="early-stopping state")

  # --- the rule ---------------------------------------------------------------

  def value_of(self, results: Mapping[str, float], step: int) -> float:
    if self.metric not in results:
      known = ", ".join(sorted(results)) or "none"
      raise ValueError(
          f"config.early_stopping.metric={self.metric!r}: the evaluation round at step {step} "
          f"returned no such key; it returned: {known}. Name one of these (an evaluator's "
          "split must be evaluated during training, e.g. "
          "config.evaluators.classification.splits=('validation',)).")
    return float(results[self.metric])

  def update(self, step: int, results: Mapping[str, float]) -> bool:
    """Records the round at ``step``; True when it is the new best."""
    value = self.value_of(results, step)
    self.rounds = [r for r in self.rounds if r[0] < step] + [(int(step), value)]
    self.save()
    return self.best_step == step

  def stop(self, step: int) -> None:
    """Marks training as ended at ``step`` (by the rule or at its last step)."""
    self.stopped_at = int(step)
    self.save()

  def results(self) -> dict[str, float]:
    best_step, best, _ = self._scan()
    out = {"train/best_metric": best}
    if best_step is not None:
      out["train/best_step"] = float(best_step)
    if self.stopped_at is not None:
      out["train/stopped_at_step"] = float(self.stopped_at)
    return out
