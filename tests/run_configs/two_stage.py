"""A tiny pre-train -> fine-tune recipe (glyphs/small -> digits) for the
kill-and-resume test: the fine-tuning stage checkpoints every 2 steps."""

from configs.recipes import pretrain_finetune


def get_config(arg=None):
  del arg
  c = pretrain_finetune.get_config("embedded")
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.progress_bar = False
  c.plots = False
  c.evaluators.ood.sets = {}
  c.evaluators.classification.splits = ("test",)
  c.stages.pretrain.config.data.name = "glyphs/small"
  c.stages.pretrain.config.num_steps = 6
  c.stages.finetune.config.num_steps = 30
  c.stages.finetune.config.checkpoint_every_steps = 2
  c.stages.finetune.config.log_every_steps = 2
  return c
