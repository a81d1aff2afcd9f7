"""A tiny config for recipe tests: the `smoke` variant (digits), an 8/16-wide
CNN, a few steps, test-split classification only, no OOD sets."""

from configs import default


def tiny_config(data_dir, steps: int = 3):
  c = default.get_config("smoke")
  c.data.data_dir = str(data_dir)
  c.progress_bar = False
  c.num_steps = steps
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.evaluators.ood.sets = {}
  c.evaluators.classification.splits = ("test",)
  return c
