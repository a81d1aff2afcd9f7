"""What each process of a multi-process run reads: every training stream of a
config (samplers, index rules, label sources) built as the trainer builds it,
iterated for a number of steps; each process writes the dataset indices and
label fields of its slices to ``<out>/process_<i>.npz``. Run it as the trainer
is run, under ``launch.local_cluster --module tests.input_probe``."""

import os


def read_streams(config, steps: int = 0) -> dict:
  """``{'<stream>/<field>': [steps, local batch]}`` of this process."""
  import numpy as np

  from jaxrobust import artifacts as artifacts_lib
  from jaxrobust import methods  # noqa: F401  (registers samplers and label sources)
  from jaxrobust import build
  from jaxrobust.data import sources, streams
  spec = sources.get_spec(config.data.name, data_dir=config.data.data_dir)
  train_input, _ = build.build_streams(config, num_classes=spec.num_classes,
                                       image_shape=spec.image_shape,
                                         artifacts=artifacts_lib.Artifacts())
  n = steps or round(streams.steps_per_epoch(train_input.streams["train"]))
  out: dict = {}
  for _ in range(n):
    for name, batch in next(train_input).items():
      for k, v in batch.items():
        if k != "image":
          out.setdefault(f"{name}/{k}", []).append(v)
  return {k: np.stack(v) for k, v in out.items()}


def main() -> None:
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "Config file (file.py[:arg]).")
  out = flags.DEFINE_string("out", None, "Output directory.", required=True)
  steps = flags.DEFINE_integer("steps", 0, "Steps to read (0: one epoch of the train stream).")
  flags.DEFINE_bool("multihost", True, "Always on (a flag of the launcher).")
  coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
  num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index.")

  def run(argv):
    del argv
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator.value, num_processes.value, process_id.value)
    os.makedirs(out.value, exist_ok=True)
    np.savez(os.path.join(out.value, f"process_{jax.process_index()}.npz"),
             **read_streams(config.value, steps.value))

  app.run(run)


if __name__ == "__main__":
  main()
