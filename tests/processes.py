"""Simulating two processes in one: the global eval batches two processes
would assemble (process 0's slice, then process 1's), for tests of
predict-based code on several processes."""

import contextlib
from unittest import mock

import numpy as np

from jaxrobust.data import pipeline


def two_process_batches(eval_batches=pipeline.eval_batches):
  """``fn(source, global_batch_size)`` yielding what 2 processes read as one
  global batch: rows arrive interleaved, not in index order."""
  def batches(source, global_batch_size):
    per = []
    for p in range(2):
      with mock.patch.object(pipeline, "process_shard", return_value=(p, 2)):
        per.append(list(eval_batches(source, global_batch_size)))
    for b0, b1 in zip(*per):
      yield {k: np.concatenate([b0[k], b1[k]]) for k in b0}
  return batches


@contextlib.contextmanager
def two_processes():
  """Within it, ``pipeline.eval_batches`` gives the 2-process global batches."""
  with mock.patch.object(pipeline, "eval_batches", side_effect=two_process_batches()):
    yield
