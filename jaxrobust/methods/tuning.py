"""Choosing a score's hyperparameters on validation data (MSP's and energy's
T, ODIN's T and ε, Mahalanobis' ε), as the papers do -- never on the test OOD
sets.

The ``tune_score`` stage task evaluates every point of a grid of a registered
score's options with the OOD evaluator: the task's ``split`` (default
``validation``) against validation OOD sets that resemble none of the test OOD
sets, every OOD example once, metric convention ``preset`` (default
``energy``: ID positive, FPR at 95% TPR), the metric averaged over the sets.
By default (``ood`` unset) the sets are the OE code's ``--validate`` sets made
from the same in-distribution split (:mod:`jaxrobust.data.validation_ood`:
jigsaw, speckle, pixelate, RGB shift, invert, arithmetic and geometric means
of image pairs; :data:`VALIDATION_KINDS`); ``ood`` may name one set
(``'uniform_noise/gray:validation'``) or several (``{name: 'dataset:split'}``).
It picks the best point by ``metric`` (one of the preset's result names,
:data:`jaxrobust.evaluators.ood.METRICS`; FPR95: lowest; AUROC/AUPR: highest;
ties: the first in grid order -- OpenOOD's ``hyperparam_search``: ``preset='openood'``,
``metric='auroc'``), prints the table and writes the JSON artifact
``best`` with the chosen ``spec`` -- which the OOD evaluator reads directly:
``scores={'odin': 'artifact:tune_odin/best:spec'}`` -- and the sets it was
tuned on.

Default grids: ODIN, the energy code's ``run.sh`` (T ∈ {1, 10, 100, 1000} ×
ε ∈ {0, 0.0004, …, 0.0048}); Mahalanobis, its ``--noise`` sweep (ε ∈ {0,
0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01}); MSP and energy, ODIN's
temperatures (T ∈ {1, 10, 100, 1000}; the papers use T = 1 for both); the
post-hoc detectors, :data:`jaxrobust.methods.posthoc.GRIDS` (OpenOOD's sweeps:
ReAct's, ASH's and SCALE's ``percentile``, KNN's ``k``, GEN's ``gamma`` ×
``top_m``, DICE's ``sparsity``); any option of a registered score with ``grid=``.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from jaxrobust.data import validation_ood
from jaxrobust.methods import mahalanobis, odin, posthoc
from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS, StageContext, evaluation_setup

GRIDS: dict[str, dict[str, Sequence[float]]] = {
    "odin": {"temperature": odin.TEMPERATURES, "epsilon": odin.EPSILONS},
    "mahalanobis": {"epsilon": mahalanobis.EPSILONS},
    "msp": {"temperature": odin.TEMPERATURES},
    "energy": {"temperature": odin.TEMPERATURES},
    **posthoc.GRIDS,  # the post-hoc detectors' sweeps (OpenOOD's)
}
#: The validation OOD sets ``tune_score`` uses by default (every kind).
VALIDATION_KINDS: tuple[str, ...] = tuple(validation_ood.KINDS)


def validation_sets(dataset: str, split: str = "validation",
                    kinds: Sequence[str] = VALIDATION_KINDS) -> dict[str, str]:
  """``{kind: 'validation_ood/<kind>/<dataset>:<split>'}``: the default tuning sets."""
  return {k: f"{v}:{split}" for k, v in validation_ood.names(dataset, kinds).items()}


def _ood_sets(ood: Any, where: str) -> dict[str, str]:
  """``ood`` (a 'dataset:split' string or {name: 'dataset:split'}) as a mapping."""
  if isinstance(ood, str):
    return {"validation_ood": ood}
  if hasattr(ood, "items") and ood and all(isinstance(v, str) for v in dict(ood).values()):
    return {str(k): v for k, v in dict(ood).items()}
  raise RegistryError(f"{where}.ood: give one set 'dataset:split' or {{name: 'dataset:split'}}, "
                      f"got {ood!r}.")
LOWER_IS_BETTER = ("fpr95", "fpr95_ood_positive")


def _spec(score: str, options: Mapping[str, Any]) -> str:
  return f"{score}({', '.join(f'{k}={v!r}' for k, v in options.items())})"


@TASKS.register("tune_score")
def tune_score(ctx: StageContext, *, checkpoint: str, score: str = "odin",
               grid: Mapping[str, Sequence[Any]] | None = None, ood: Any = "",
               split: str = "validation", preset: str = "energy", metric: str = "fpr95",
               module: str = "classifier") -> dict[str, float]:
  """Grid search of ``score``'s options on validation data (see the module
  docstring); results: the best point's ``metric`` (mean over the sets) and
  options."""
  from jaxrobust import evaluators as evaluators_lib

  from jaxrobust.evaluators import ood as ood_evaluator

  where = f"config.stages.{ctx.name}"
  if preset not in ood_evaluator.METRICS:
    raise RegistryError(f"{where}.preset={preset!r}; known: {', '.join(ood_evaluator.METRICS)}.")
  if metric not in ood_evaluator.METRICS[preset]:
    raise RegistryError(f"{where}.metric={metric!r}: the {preset} preset's metrics are "
                        f"{', '.join(ood_evaluator.METRICS[preset])}.")
  grid = dict(grid or GRIDS.get(score, {}))
  if not grid:
    raise RegistryError(f"{where}: no grid for score {score!r}; give grid={{option: values}}.")
  config = ctx.config
  ood = ood.to_dict() if hasattr(ood, "to_dict") else ood
  sets = _ood_sets(ood, where) if ood else validation_sets(config.data.name, split)
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  c = ml_collections.ConfigDict(config.to_dict())
  c.evaluators = {"tune": {"type": "ood", "sets": sets, "split": split,
                           "preset": preset, "fraction": 0.0, "draws": 1, "prefix": "tune",
                           "scores": {f"p{i}": _spec(score, p) for i, p in enumerate(points)},
                           "module": module}}
  evaluators, state = evaluation_setup(ctx, c, checkpoint, modules=[module])
  evaluator = evaluators["tune"]
  results = evaluators_lib.run({"tune": evaluator}, state)
  values = [results[f"tune/p{i}/mean/{metric}"] for i in range(len(points))]
  best = int(np.argmin(values) if metric in LOWER_IS_BETTER else np.argmax(values))
  table = [{**p, metric: v} for p, v in zip(points, values)]
  print(f"tune_score {score} on {config.data.name}:{split} vs {', '.join(sets.values())} "
        f"({preset} preset, {metric} averaged over the sets):")
  for row in table:
    print("  " + ", ".join(f"{k}={v:.6g}" for k, v in row.items()))
  print(f"  best: {_spec(score, points[best])} ({metric} = {values[best]:.6g})", flush=True)
  ctx.artifacts.save("best", {"spec": _spec(score, points[best]), "options": points[best],
                              metric: values[best], "table": table, "ood": sets,
                              "split": split, "preset": preset})
  return {metric: float(values[best]), **{k: float(v) for k, v in points[best].items()}}
