"""``chex.assert_max_traces`` around the functions the library builds and jits.

chex counts the traces of a wrapped function per *footprint*: the call stack
where it was wrapped, its source and its name. A function re-created at the
same place -- a jit cache that misses, a step built again for each evaluation
-- therefore shares the count of the first one and fails the assertion,
which is the point. ``name`` is part of the footprint: functions that may each
be traced once (two runs of one test, two prediction requests) get names that
tell them apart.
"""

import contextlib
import functools
from typing import Callable
from unittest import mock

import chex


def at_most(fn: Callable, n: int, name: str) -> Callable:
  """``fn`` wrapped so that tracing it (under ``jit``/``pmap``) more than
  ``n`` times, counted per ``name`` and wrapping place, raises AssertionError."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    return fn(*args, **kwargs)
  traced.__name__ = traced.__qualname__ = name
  return chex.assert_max_traces(traced, n=n)


@contextlib.contextmanager
def each_traced_at_most(target, attribute: str, n: int, name: Callable[..., str]):
  """Patches the factory ``target.<attribute>`` (e.g. ``make_train_step``):
  every function it returns is wrapped by :func:`at_most` under
  ``name(*factory_args, **factory_kwargs)``. Yields a list that receives
  ``[name, number of traces]`` for every function the factory makes."""
  factory = getattr(target, attribute)
  made = []

  def wrapped_factory(*args, **kwargs):
    fn, entry = factory(*args, **kwargs), [name(*args, **kwargs), 0]
    made.append(entry)

    def counted(*a, **k):  # called only while jit/pmap traces
      entry[1] += 1
      return fn(*a, **k)
    return at_most(functools.wraps(fn)(counted), n, entry[0])

  with mock.patch.object(target, attribute, wrapped_factory):
    yield made


def predictor_request(module, fields, perturb, scores, rng) -> str:
  """The name of a ``predict._per_batch`` function: what the Predictor caches
  its compiled functions by (fields, perturbation, scores)."""
  del module, rng
  perturb_id = "" if perturb is None else f"{getattr(perturb, '__name__', 'perturb')}@{id(perturb)}"
  return (f"per_batch[fields={tuple(fields)}, perturb={perturb_id}, "
          f"scores={sorted((n, s.key) for n, s in scores.items())}]")
