"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import Callable


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
