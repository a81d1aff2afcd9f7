"""Metric writers: JSON lines + TensorBoard, from process 0 only.

The writers follow the interface of ``clu.metric_writers.MetricWriter``
(``write_scalars``, ``write_images``, ``write_histograms``, ``write_texts``,
``write_hparams``, ``flush``, ``close``). clu 0.0.12's ``metric_writers``
package imports TensorFlow at import time (google/CommonLoopUtils PR #358 is
still open), and TensorFlow is only in the ``tf`` extra, so:

* with TensorFlow installed, TensorBoard summaries go through clu's
  ``SummaryWriter`` (wrapped in clu's ``AsyncMultiWriter``);
* without it, through ``tensorboardX``, which writes the same event files.

``metrics.jsonl`` always gets one line per ``write_scalars`` call:
``{"step": 100, "train/loss": 0.31, ...}``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxrobust import files

log = logging.getLogger("jaxrobust")


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float("nan")


class JsonlWriter:
  """Appends ``{"step": s, **scalars}`` lines to ``path``.

  ``resume_step``: a run resumed from this step first drops the lines of
  later steps (written before the run stopped, about to be written again),
  atomically, so no step appears twice.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    if resume_step is not None and os.path.exists(path):
      _drop_after(path, resume_step)
    with files.writing(path, "metrics"):
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      self._f = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    with files.writing(self.path, "metrics"):
      self._f.write(json.dumps(row) + "\n")
      self._f.flush()

  def write_images(self, step, images) -> None: ...
  def write_histograms(self, step, arrays, num_buckets=None) -> None: ...
  def write_texts(self, step, texts) -> None: ...
  def write_hparams(self, hparams) -> None: ...

  def flush(self) -> None:
    with files.writing(self.path, "metrics"):
      self._f.flush()

  def close(self) -> None:
    with files.writing(self.path, "metrics"):
      self._f.close()


class TensorBoardXWriter:
  """TensorBoard event files through tensorboardX (no TensorFlow needed)."""

  def __init__(self, logdir: str, purge_step: int | None = None):
    from tensorboardX import SummaryWriter
    # purge_step: TensorBoard hides the points at and after it from earlier event files
    self._w = SummaryWriter(logdir=logdir, purge_step=purge_step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for k, v in scalars.items():
      self._w.add_scalar(k, _scalar(v), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for k, v in images.items():
      v = np.asarray(v)
      if v.ndim == 3:
        v = v[None]
      self._w.add_images(k, v, global_step=int(step), dataformats="NHWC")

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    for k, v in arrays.items():
      bins = (num_buckets or {}).get(k, "tensorflow")
      self._w.add_histogram(k, np.asarray(v), global_step=int(step), bins=bins)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      self._w.add_text(k, v, global_step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._w.add_text("hparams", json.dumps(dict(hparams), default=str, indent=1), 0)

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()


class LogWriter:
  """Scalars to the Python log (every process)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    log.info("step %d: %s", step,
             ", ".join(f"{k}={_scalar(v):.5g}" for k, v in sorted(scalars.items())))

  def write_images(self, step, images) -> None: ...
  def write_histograms(self, step, arrays, num_buckets=None) -> None: ...
  def write_texts(self, step, texts) -> None: ...
  def write_hparams(self, hparams) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


class MultiWriter:
  """Fans every call out to several writers."""

  def __init__(self, writers: Sequence[Any]):
    self.writers = list(writers)

  def __getattr__(self, name: str):
    def call(*args, **kwargs):
      for w in self.writers:
        getattr(w, name)(*args, **kwargs)
    return call


def _drop_after(path: str, step: int) -> None:
  """Rewrites a metrics.jsonl without the lines of steps after ``step``
  (an unreadable trailing line, from a kill mid-write, goes too)."""
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue
  files.write_text(path, "".join(kept), what="metrics")


def _tensorboard_writer(logdir: str, resume_step: int | None = None) -> Any:
  try:  # needs tensorflow and tensorboard (the `tf` extra)
    from clu import metric_writers
  except ImportError:
    return TensorBoardXWriter(logdir, purge_step=None if resume_step is None
                              else resume_step + 1)
  return metric_writers.SummaryWriter(logdir)


def create_writer(workdir: str, resume_step: int | None = None) -> MultiWriter:
  """Log + JSONL (``workdir/metrics.jsonl``) + TensorBoard (``workdir/tensorboard``)
  on process 0; only the log on other processes. A run resumed from
  ``resume_step`` drops the JSONL lines and (tensorboardX) the TensorBoard
  points of the steps after it, which it is about to write again."""
  if jax.process_index() > 0:
    return MultiWriter([LogWriter()])
  return MultiWriter([LogWriter(), JsonlWriter(os.path.join(workdir, "metrics.jsonl"),
                                               resume_step),
                      _tensorboard_writer(os.path.join(workdir, "tensorboard"), resume_step)])
