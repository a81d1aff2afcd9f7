"""Choosing a score's hyperparameters on validation data (ODIN's T and ε,
Mahalanobis' ε), as the papers do -- never on the test OOD sets.

The ``tune_score`` stage task evaluates every point of a grid of a registered
score's options with the OOD evaluator: the task's ``split`` (default
``validation``) against a validation OOD set that is none of the test OOD sets
(default ``uniform_noise/<gray|rgb>:validation``, the OE/energy code's
``--validate`` uniform noise), every OOD example once, metric convention
``preset`` (default ``energy``: ID positive, FPR at 95% TPR). It picks the best
point by ``metric`` (FPR95: lowest; AUROC/AUPR: highest; ties: the first in
grid order), prints the table and writes the JSON artifact ``best`` with the
chosen ``spec`` -- which the OOD evaluator reads directly:
``scores={'odin': 'artifact:tune_odin/best:spec'}``.

Default grids: ODIN, the energy code's ``run.sh`` (T ∈ {1, 10, 100, 1000} ×
ε ∈ {0, 0.0004, …, 0.0048}); Mahalanobis, its ``--noise`` sweep (ε ∈ {0,
0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01}); the post-hoc detectors,
:data:`jaxrobust.methods.posthoc.GRIDS` (OpenOOD's sweeps: ReAct's, ASH's and
SCALE's ``percentile``, KNN's ``k``, GEN's ``gamma`` × ``top_m``, DICE's
``sparsity``); any option of a registered score with ``grid=``.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from jaxrobust.methods import mahalanobis, odin, posthoc
from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS, StageContext, evaluation_setup

GRIDS: dict[str, dict[str, Sequence[float]]] = {
    "odin": {"temperature": odin.TEMPERATURES, "epsilon": odin.EPSILONS},
    "mahalanobis": {"epsilon": mahalanobis.EPSILONS},
    **posthoc.GRIDS,  # the post-hoc detectors' sweeps (OpenOOD's)
}
LOWER_IS_BETTER = ("fpr95",)


def _spec(score: str, options: Mapping[str, Any]) -> str:
  return f"{score}({', '.join(f'{k}={v!r}' for k, v in options.items())})"


@TASKS.register("tune_score")
def tune_score(ctx: StageContext, *, checkpoint: str, score: str = "odin",
               grid: Mapping[str, Sequence[Any]] | None = None, ood: str = "",
               split: str = "validation", preset: str = "energy", metric: str = "fpr95",
               module: str = "classifier") -> dict[str, float]:
  """Grid search of ``score``'s options on validation data (see the module
  docstring); results: the best point's ``metric`` and options."""
  from jaxrobust import evaluators as evaluators_lib
  from jaxrobust.data import pipeline, sources

  where = f"config.stages.{ctx.name}"
  grid = dict(grid or GRIDS.get(score, {}))
  if not grid:
    raise RegistryError(f"{where}: no grid for score {score!r}; give grid={{option: values}}.")
  config = ctx.config
  if not ood:
    spec = sources.get_spec(config.data.name, data_dir=config.data.data_dir)
    channels = pipeline.image_shape(spec, config.data.image_size)[-1]
    ood = f"uniform_noise/{'gray' if channels == 1 else 'rgb'}:validation"
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  c = ml_collections.ConfigDict(config.to_dict())
  c.evaluators = {"tune": {"type": "ood", "sets": {"validation_ood": ood}, "split": split,
                           "preset": preset, "fraction": 0.0, "draws": 1, "prefix": "tune",
                           "scores": {f"p{i}": _spec(score, p) for i, p in enumerate(points)},
                           "module": module}}
  evaluators, state = evaluation_setup(ctx, c, checkpoint, modules=[module])
  evaluator = evaluators["tune"]
  results = evaluators_lib.run({"tune": evaluator}, state)
  values = [results[f"tune/p{i}/validation_ood/{metric}"] for i in range(len(points))]
  best = int(np.argmin(values) if metric in LOWER_IS_BETTER else np.argmax(values))
  table = [{**p, metric: v} for p, v in zip(points, values)]
  print(f"tune_score {score} on {config.data.name}:{split} vs {ood} ({preset} preset):")
  for row in table:
    print("  " + ", ".join(f"{k}={v:.6g}" for k, v in row.items()))
  print(f"  best: {_spec(score, points[best])} ({metric} = {values[best]:.6g})", flush=True)
  ctx.artifacts.save("best", {"spec": _spec(score, points[best]), "options": points[best],
                              metric: values[best], "table": table, "ood": ood,
                              "split": split, "preset": preset})
  return {metric: float(values[best]), **{k: float(v) for k, v in points[best].items()}}
