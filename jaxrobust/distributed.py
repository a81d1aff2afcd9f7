"""Multi-process runs on JAX's distributed runtime, made to fail cleanly.

``jax.distributed`` itself ends a process that cannot reach its coordinator
with a C++ check failure, and a process whose peer died waits in a collective
until the heartbeat timeout aborts it. This module adds, on top of the
runtime's own coordination service (its key-value store and barriers, nothing
home-made on the network):

* :func:`initialize` -- ``jax.distributed.initialize`` with a start-up
  deadline that ends the process with one line saying who could not join;
* :func:`check_same_config` -- every process publishes its config at start
  and all of them stop, naming the first keys that differ, when processes were
  started with different command lines (a frequent slip on pods);
* :class:`ErrorWatch` -- an error on one process is written to the key-value
  store; every other process sees it within a second and ends with the same
  message, instead of hanging in a collective.

A process that dies without a word (SIGKILL, a lost host) is still caught by
the runtime's heartbeat (``heartbeat_timeout_seconds``); a collective that
touched it fails at once on CPU (gloo).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, NoReturn

import jax

ERROR_KEY = "jaxrobust/error"
CONFIG_DIR = "jaxrobust/config/"


class DistributedError(RuntimeError):
  """The processes of one run disagree or cannot reach each other."""


def exit_now(message: str, code: int) -> NoReturn:
  """Prints ``message`` and ends the process at once: no atexit hooks, so no
  ``jax.distributed.shutdown`` barrier waiting for processes that are gone."""
  sys.stdout.flush()
  sys.stderr.write(message.rstrip() + "\n")
  sys.stderr.flush()
  os._exit(code)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_seconds: float = 300.0,
               heartbeat_timeout_seconds: int = 100) -> None:
  """``jax.distributed.initialize`` that gives up after ``timeout_seconds``
  with one line (exit status 2) when not every process joins.

  The three addressing arguments may be None where JAX detects the cluster
  (Cloud TPU, Slurm, Open MPI). ``heartbeat_timeout_seconds`` bounds how long
  the others wait for a process that died without reporting an error.
  """
  if timeout_seconds <= 0:
    raise ValueError(f"--coordinator_timeout_seconds must be positive, got {timeout_seconds}.")
  if heartbeat_timeout_seconds <= 0:
    raise ValueError("--heartbeat_timeout_seconds must be positive, "
                     f"got {heartbeat_timeout_seconds}.")
  joined = threading.Event()

  def deadline() -> None:
    if not joined.wait(timeout_seconds):
      who = (f"process {process_id} of {num_processes}" if process_id is not None
             else "this process")
      where = coordinator_address or "the address the cluster detection found"
      exit_now(f"error: the distributed run did not start within {timeout_seconds:g} s "
               f"(--coordinator_timeout_seconds): {who} waited for the coordinator at {where} "
               "and for every other process to register. Start all processes with the same "
               "--coordinator_address (process 0's host:port) and --num_processes.", 2)

  threading.Thread(target=deadline, daemon=True, name="jaxrobust-start-deadline").start()
  # JAX's own deadline comes later: ours prints a sentence, its check failure a stack.
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=int(timeout_seconds) + 60,
                             heartbeat_timeout_seconds=int(heartbeat_timeout_seconds))
  joined.set()


def _client() -> Any:
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:
    raise DistributedError("jax.distributed.initialize() has not been called.")
  return client


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """``(key, value in a, value in b)`` for every leaf that differs (missing = None)."""
  fa, fb = _flatten(a), _flatten(b)
  return [(k, fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
          if fa.get(k) != fb.get(k)]


def check_same_config(run: dict[str, Any], timeout_seconds: float = 300.0) -> None:
  """Raises :class:`DistributedError` on every process when any process was
  started with another ``run`` (the config and the workdir, as JSON-able
  dicts) than process 0; names the first keys that differ."""
  if jax.process_count() == 1:
    return
  client = _client()
  me = jax.process_index()
  text = json.dumps(run, sort_keys=True, default=str)
  client.key_value_set(f"{CONFIG_DIR}{me}", text)
  client.wait_at_barrier("jaxrobust/config", int(timeout_seconds * 1000))
  published = {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(CONFIG_DIR)}
  reference = json.loads(published[0])
  for other in sorted(published):
    if published[other] == published[0]:
      continue
    diffs = config_differences(json.loads(published[other]), reference)
    shown = "; ".join(f"{k} = {mine!r} on process {other}, {ref!r} on process 0"
                      for k, mine, ref in diffs[:3])
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise DistributedError(
        f"the processes were started with different configs: {shown}{more}. Start every "
        "process with the same command line.")


class ErrorWatch:
  """Ends this process when another process of the run reports an error.

  A background thread waits on the coordination service's key ``ERROR_KEY``;
  :meth:`fail` writes it (the first error wins) and ends this process with
  ``error: process i: <message>``; the others print ``error: stopped because
  process i failed: <message>`` and exit with 1.
  """

  def __init__(self, poll_seconds: float = 1.0):
    self._client = _client()
    self._index = jax.process_index()
    self._poll_ms = max(1, int(poll_seconds * 1000))
    self._stop = threading.Event()
    self._failing = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="jaxrobust-errors")
    self._thread.start()

  def _watch(self) -> None:
    while not self._stop.is_set():
      try:
        value = self._client.blocking_key_value_get(ERROR_KEY, self._poll_ms)
      except Exception as e:  # noqa: BLE001 -- the runtime raises one type for every status
        if "DEADLINE_EXCEEDED" in str(e) or self._stop.is_set():
          continue
        exit_now(f"error: process {self._index} lost the coordination service "
                 f"(process 0): {' '.join(str(e).split())[:300]}", 1)
      origin, _, message = value.partition("\n")
      # Often every process meets the same bad input at once: give this
      # process's own error a moment to be the one it reports.
      if int(origin) != self._index and not self._failing.wait(1.0):
        exit_now(f"error: stopped because process {origin} failed: {message}", 1)
      return

  def fail(self, message: str, code: int) -> NoReturn:
    """Reports ``message`` to every process and ends this one with ``code``."""
    self._failing.set()
    self._stop.set()
    try:
      self._client.key_value_set(ERROR_KEY, f"{self._index}\n{message.strip()}")
    except Exception:  # noqa: BLE001 -- another process reported first
      pass
    if self._index == 0:
      time.sleep(2.0)  # the coordination service lives here: let the others read the error
    exit_now(f"error: process {self._index}: {message.strip()}", code)

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=2 * self._poll_ms / 1000 + 1)
