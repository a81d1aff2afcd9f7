"""A tiny run with a second stream through the same forward pass, for the
kill-and-resume test: the `aux` stream (digits, class-balanced sampler, its own
cross-entropy term) has its own iterator position in every checkpoint."""

from configs import default


def get_config(arg=None):
  del arg
  c = default.get_config("smoke")
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.evaluators.ood.sets = {}
  c.streams.aux = {"data": "digits", "split": "validation", "batch_size": 32,
                   "sampler": "class_balanced", "pp": "pad_crop(2)"}
  c.losses.aux = {"name": "cross_entropy", "stream": "aux", "weight": 0.5}
  return c
