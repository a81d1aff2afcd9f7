"""The OOD recipe (configs/recipes/ood.py, mode=compare) on a tiny model with
few steps and small grids, for tests."""

from configs.recipes import ood


def get_config(arg=None):
  c = ood.get_config(arg or "embedded")
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.progress_bar = False
  c.plots = False
  c.num_steps = 4
  c.evaluators.classification.splits = ("test",)
  c.evaluators.ood.sets = {"blobs": "blobs/gray:validation", "letters": "glyphs/lower:validation"}
  c.evaluators.ood.draws = 2
  for name in list(c.stages.keys()):
    stage = c.stages[name]
    if stage.task == "tune_score":
      stage.grid = {"odin": {"temperature": (1.0, 100.0), "epsilon": (0.0, 0.002)},
                    "mahalanobis": {"epsilon": (0.0, 0.002)}}.get(
                        stage.score, {"temperature": (1.0, 100.0)})
    if stage.task == "train":
      stage.config.num_steps = 3
  return c
