"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_time(fn: Callable[[], object], rounds: int) -> float:
  """Median wall time of ``fn()`` over ``rounds`` calls, after one call to
  compile and warm up (``fn`` must block until its result is ready)."""
  fn()
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  """``(median seconds, result)`` of ``fn()`` over ``repeats`` calls after a
  warm-up call; ``fn`` returns jax arrays, waited for with
  ``jax.block_until_ready``."""
  import jax
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), out
