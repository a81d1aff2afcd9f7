"""Run a config as N local processes × M CPU devices each, on JAX's
distributed runtime (a localhost coordinator, gloo CPU collectives) -- what a
pod or a multi-node GPU job does, on one machine, for tests and for users
without a cluster.

  python -m launch.local_cluster --processes 2 --devices_per_process 4 -- \\
      --config configs/default.py --workdir /tmp/run

Everything after ``--`` goes to ``python -m launch.train`` of every process
(with ``--multihost`` and the coordinator flags added). The output of process
``i`` is prefixed ``[i]``. SIGTERM and SIGINT are passed on to every
process (a preemption: they save a checkpoint and exit with 143). If one
process fails, the others are stopped after ``--grace_seconds``, so a failure
never hangs in a collective; the exit status is the first non-zero one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_PROCESSES = flags.DEFINE_integer("processes", 2, "Number of processes.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "CPU devices per process.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0: a free one).")
_GRACE = flags.DEFINE_float("grace_seconds", 30.0,
                            "After one process fails, how long the others get before SIGKILL.")
_MODULE = flags.DEFINE_string(
    "module", "launch.train", "The module every process runs (python -m MODULE); it must take "
    "--multihost, --coordinator_address, --num_processes and --process_id.")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def commands(train_args: list[str], processes: int, port: int,
             module: str = "launch.train") -> list[list[str]]:
  """The command line of every process."""
  return [[sys.executable, "-m", module, *train_args, "--multihost",
           f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
           f"--process_id={i}"] for i in range(processes)]


def environment(devices: int) -> dict[str, str]:
  """The environment of every process: ``devices`` CPU devices, CPU only."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


_BREAK = re.compile(rb"(\r\n|\r|\n)(?!$)")


def _pump(i: int, stream) -> None:
  """Copies process ``i``'s output with ``[i] `` before every line, keeping
  carriage returns, so process 0's progress bar stays one live line."""
  prefix = f"[{i}] ".encode()
  at_start = True
  for chunk in iter(lambda: stream.read1(1 << 16), b""):
    text = _BREAK.sub(lambda m: m.group(1) + prefix, chunk)
    sys.stdout.buffer.write((prefix if at_start else b"") + text)
    sys.stdout.flush()
    at_start = chunk.endswith((b"\n", b"\r"))


def run(train_args: list[str], processes: int, devices: int, port: int = 0,
        grace_seconds: float = 30.0, module: str = "launch.train") -> int:
  if processes < 1 or devices < 1:
    raise app.UsageError("--processes and --devices_per_process must be >= 1.")
  port = port or free_port()
  env = environment(devices)
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env) for cmd in commands(train_args, processes, port, module)]
  # A scheduler's SIGTERM (or Ctrl-C) reaches every process, as on a pod.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: [p.send_signal(signum) for p in procs
                                              if p.poll() is None])
  pumps = [threading.Thread(target=_pump, args=(i, p.stdout), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  failed_at = None
  while any(p.poll() is None for p in procs):
    if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
      failed_at = time.time()
    if failed_at is not None and time.time() - failed_at > grace_seconds:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  for t in pumps:
    t.join(timeout=5)
  codes = [p.returncode for p in procs]
  for i, c in enumerate(codes):
    if c:
      how = (f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with {c}")
      sys.stderr.write(f"local_cluster: process {i} {how}\n")
  return next((c if c > 0 else 128 - c for c in codes if c != 0), 0)


def main(argv: list[str]) -> None:
  train_args = argv[1:]
  if train_args and train_args[0] == "--":
    train_args = train_args[1:]
  sys.exit(run(train_args, _PROCESSES.value, _DEVICES.value, _PORT.value, _GRACE.value,
               _MODULE.value))


if __name__ == "__main__":
  app.run(main)
