"""Train and evaluate from a config file.

  python -m launch.train --workdir /tmp/run                       # configs/default.py (digits)
  python -m launch.train --config configs/default.py:cifar10 --workdir gs://bucket/run
  python -m launch.train --config configs/default.py --config.num_epochs=5 --workdir /tmp/run
  python -m launch.train --config configs/default.py \
      --config.evaluators.ood.sets.letters=glyphs/lower:test --workdir /tmp/run   # a new OOD set

A mistyped key or a bad value ends with one line naming it (``--traceback``
shows the Python traceback); entries of free-form sub-dicts (evaluators,
streams, losses, model.heads, ...) can be added from the command line.

The config may be a recipe (config.stages): its stages run in order in
<workdir>/<stage>. Restarting with the same --workdir skips finished stages and
resumes the interrupted one from its latest checkpoint. On
multi-host TPU/GPU, pass --multihost to call jax.distributed.initialize(); the
processes check that they run the same config, and an error on one ends all
of them (docs/multihost.md: "Multi-host runs and faults"; launch/tpu_pod.sh,
launch/slurm.sbatch, launch/gpu_multinode.sh, launch/local_cluster.py).
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from jaxrobust.xla_flags import CPU_CONV_XLA_FLAG, with_cpu_conv_tuning

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "default.py")
_CONFIG: "flags.FlagHolder | None" = None  # defined by _parse_flags, from the loaded config file
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.",
                               required=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (TPU pods, Slurm and Open MPI "
    "are detected; elsewhere pass the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "CPU only: split the host into this many XLA devices (0 = leave as is).")
_COORDINATOR_TIMEOUT = flags.DEFINE_float(
    "coordinator_timeout_seconds", 300.0,
    "--multihost: how long every process may take to join before the run stops with an error.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100,
    "--multihost: a process silent this long (killed, host lost) ends the run on every process.")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the Python traceback of a configuration error instead of one line.")
_CPU_CONV_FLAG = flags.DEFINE_bool(
    "cpu_conv_tuning", True,
    f"Add {CPU_CONV_XLA_FLAG} to XLA_FLAGS: about 2x faster convnet training on XLA:CPU "
    "(benchmarks/README.md); it only affects the CPU backend.")


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/tfds chatter; --verbosity=0 shows it
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if _HOST_DEVICES.value:
    xla_flags += f" --xla_force_host_platform_device_count={_HOST_DEVICES.value}"
  if _CPU_CONV_FLAG.value:
    xla_flags = with_cpu_conv_tuning(xla_flags)
  os.environ["XLA_FLAGS"] = xla_flags.strip()
  import jax  # after XLA_FLAGS
  config = _CONFIG.value
  _apply_free_form(config)
  watch = None
  if _MULTIHOST.value:
    from jaxrobust import distributed
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not _has_accelerator():
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             timeout_seconds=_COORDINATOR_TIMEOUT.value,
                             heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    except ValueError as e:
      _fail(str(e))
    watch = distributed.ErrorWatch()
  from jaxrobust import stages
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  from jaxrobust.preemption import PreemptedError
  try:
    if watch is not None:
      distributed.check_same_config({"config": config.to_dict(),
                                     "workdir": _WORKDIR.value}, _COORDINATOR_TIMEOUT.value)
    results = stages.run(config, _WORKDIR.value)
  except PreemptedError as e:  # at a step every process shares, or between stages
    if watch is not None:
      watch.close()
    sys.stderr.write(f"{e}\n")
    sys.exit(143)  # 128 + SIGTERM: schedulers see a preempted job, not a finished one
  except USER_ERRORS as e:
    if _TRACEBACK.value:
      if watch is None:
        raise
      traceback.print_exc()
    if watch is None:
      _fail(str(e))
    watch.fail(" ".join(str(e).split()), 2)
  except BaseException as e:
    if watch is None or isinstance(e, SystemExit):
      raise
    text = " ".join(str(e).split())[:500]
    if isinstance(e, jax.errors.JaxRuntimeError):  # a collective failed: a peer is gone
      watch.fail(f"{text} (a collective failed: another process has probably stopped; see its "
                 "log)", 1)
    traceback.print_exc()  # a bug: the whole story on this process
    watch.fail(f"{type(e).__name__}: {text}", 1)
  if watch is not None:
    watch.close()
  if jax.process_index() == 0:
    width = max(map(len, results))
    print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in sorted(results.items())))


def _has_accelerator() -> bool:
  import importlib.util
  return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin",
                                                                  "libtpu", "jax_rocm60_plugin"))


def _user_errors() -> tuple[type[BaseException], ...]:
  """What a bad config, path or checkpoint raises (not a bug in jaxrobust)."""
  from jaxrobust.artifacts import ArtifactError
  from jaxrobust.checkpoint import CheckpointDamagedError, CheckpointMismatchError
  from jaxrobust.distributed import DistributedError
  from jaxrobust.files import WriteError
  from jaxrobust.registry import RegistryError
  return (ValueError, RegistryError, ArtifactError, FileNotFoundError, CheckpointMismatchError,
          CheckpointDamagedError, DistributedError, WriteError)


USER_ERRORS: tuple[type[BaseException], ...] = ()


def _fail(message: str) -> None:
  sys.stderr.write(f"error: {message.strip()}\n")
  sys.exit(2)


_FREE_FORM_OVERRIDES: list[tuple[str, str, str]] = []  # (flag, path, raw value)


def _split_free_form(argv: list[str]) -> list[str]:
  """Takes out the ``--config.<path>=<value>`` overrides inside free-form
  sub-dicts (``evaluators``, ``streams``, ``losses``, ``model.heads``, ...):
  they may add entries (a new OOD set, stream or loss term), which absl's
  config flags cannot; :func:`_apply_free_form` sets them after parsing."""
  from jaxrobust.config import FREE_FORM
  kept = []
  for a in argv:
    flag, eq, raw = a.partition("=")
    path = flag[len("--config."):] if flag.startswith("--config.") else ""
    if eq and any(path.startswith(f + ".") for f in FREE_FORM):
      _FREE_FORM_OVERRIDES.append((flag, path, raw))
    else:
      kept.append(a)
  return kept


def _apply_free_form(config) -> None:
  import ast

  import ml_collections
  for flag, path, raw in _FREE_FORM_OVERRIDES:
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
      if not isinstance(node, ml_collections.ConfigDict):
        _fail(f"{flag}: {p!r} is a value, not a sub-dict.")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if leaf in node and isinstance(node[leaf], str):
      value = raw
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      _fail(f"{flag}: {' '.join(str(e).split())}")


def _config_spec(argv: list[str]) -> tuple[str, list[str]]:
  """The ``--config FILE[:ARG]`` of the command line (default
  ``configs/default.py``) and the arguments without it."""
  spec, kept, i = _DEFAULT_CONFIG, [], 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" and i + 1 < len(argv):
      spec, i = argv[i + 1], i + 2
      continue
    if a.startswith("--config="):
      spec = a[len("--config="):]
    else:
      kept.append(a)
    i += 1
  return spec, kept


def load_config_file(spec: str):
  """``get_config(arg)`` of the config file ``FILE[:ARG]``."""
  from jaxrobust import config as config_lib
  try:
    return config_lib.load_file(spec)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f"--config {spec}: {e}") from None


def _check_override_paths(config, argv: list[str]) -> None:
  """Every ``--config.<path>`` names an existing key (free-form entries were
  taken out before): one line naming the flag and the nearest key."""
  import ml_collections

  from jaxrobust.registry import suggest
  for a in argv:
    if not a.startswith("--config."):
      continue
    flag = a.partition("=")[0]
    node = config
    for key in flag[len("--config."):].split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        _fail(f"{flag}: the config's value before {key!r} is not a sub-dict.")
      if key not in node:
        close = suggest(key, node.keys(), n=1)
        hint = f"; did you mean {close[len(' (did you mean '):-2]}?" if close else "."
        _fail(f"{flag}: the config has no key {key!r}{hint}")
      node = node[key]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with the config file loaded here (once) and its
  ``--config.<path>`` overrides checked first, so that a bad file, an unknown
  key or a value of the wrong type is one line naming the flag -- also for
  the default config."""
  global _CONFIG
  traceback_asked = "--traceback" in argv
  spec, kept = _config_spec(_split_free_form(argv))
  try:
    config = load_config_file(spec)
  except Exception as e:  # noqa: BLE001 -- a config file's error, not jaxrobust's
    if traceback_asked:
      raise
    _fail(f"--config {spec}: {' '.join(str(e).split())}")
  _check_override_paths(config, kept)
  sys.argv[:] = kept  # config_flags also reads its overrides from sys.argv
  try:
    _CONFIG = config_flags.DEFINE_config_dict("config", config, "The run's config (from --config "
                                              "FILE[:ARG], default configs/default.py).",
                                              lock_config=False)
    return flags.FLAGS(kept)
  except flags.Error as e:
    _fail(str(e))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    if traceback_asked:
      raise
    overrides = [a.partition("=")[0] for a in kept if a.startswith("--config.")]
    culprit = overrides[0] if len(overrides) == 1 else "--config"
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    _fail(f"{culprit}: {' '.join(text.split())}")
  return []


if __name__ == "__main__":
  USER_ERRORS = _user_errors()
  app.run(main, flags_parser=_parse_flags)
