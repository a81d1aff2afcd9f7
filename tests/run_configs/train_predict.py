"""A tiny two-stage recipe for the multi-process test: `train` (two streams,
2 steps) then `predict` (validation logits in dataset index order, saved as
an artifact)."""

from tests.run_configs import two_streams


def get_config(arg=None):
  c = two_streams.get_config(arg)
  c.num_steps = 2
  c.checkpoint_every_steps = 1
  c.progress_bar = False
  c.stages = {"train": {"task": "train"},
              "predict": {"task": "predict", "checkpoint": "artifact:train/checkpoint",
                          "split": "validation", "fields": ("logits", "label")}}
  return c
