"""A tiny recipe for the multi-process tests: `train` (two streams, 2 steps,
evaluated on the test split and against one OOD set), `predict` (validation
labels and logits in dataset index order, an artifact written by process 0
only) and, unless ``arg`` is ``two_stage``, `relabel` (one step on the
validation split with its labels read from that artifact by every process)."""

from tests.run_configs import two_streams


def get_config(arg=None):
  c = two_streams.get_config()
  c.num_steps = 2
  c.checkpoint_every_steps = 1
  c.progress_bar = False
  c.evaluators.ood.sets = {"blobs": "blobs/gray:test"}
  c.stages = {"train": {"task": "train"},
              "predict": {"task": "predict", "checkpoint": "artifact:train/checkpoint",
                          "split": "validation", "fields": ("logits", "label")}}
  if arg != "two_stage":
    c.stages.relabel = {"task": "train", "config": {
        "num_steps": 1, "evaluators": {"ood": {"sets": {}}},
        "streams": {"train": {"split": "validation",
                              "labels": "artifact(ref='artifact:predict/predictions:label')"}}}}
  return c
