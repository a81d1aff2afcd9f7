"""Robust accuracy under input perturbations (adversarial attacks).

For each attack of ``attacks`` (``{name: spec}``, specs of
:mod:`jaxrobust.attacks`, e.g. ``'fgsm(eps=8/255)'``) the module is attacked
in eval mode (BatchNorm running statistics) on the task's ``split``, example by
example with the true labels, and ``robust/<name>/accuracy`` is the fraction
of examples still classified correctly. ``robust/<name>/num_examples`` is the
number of examples. Robust accuracy can only be <= clean accuracy for an
attack that starts from the clean input and never lowers the loss.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxrobust import attacks
from jaxrobust.evaluators import EVALUATORS, EvalContext, Evaluator
from jaxrobust.registry import RegistryError


@EVALUATORS.register("robust")
class Robust(Evaluator):
  """Accuracy under each attack of ``attacks`` on ``split``.

  Args:
    attacks: ``{result name: perturbation spec}``.
    split: a split of ``config.data.name``.
  """

  def __init__(self, ctx: EvalContext, attacks: Mapping[str, Any] | None = None,
               split: str = "test"):
    super().__init__(ctx)
    if not attacks:
      raise RegistryError(f"{ctx.where}.attacks is empty; give {{name: spec}}, e.g. "
                          "{'fgsm': 'fgsm(eps=8/255)'}.")
    self.attacks = {name: (_build(spec, f"{ctx.where}.attacks.{name}"), str(spec))
                    for name, spec in dict(attacks).items()}
    self.split = split
    self.source = ctx.load(ctx.data.name, split, key="split")

  def evaluate(self, state: Any, *, plots_dir: str | None = None, final: bool = False
               ) -> dict[str, float]:
    del plots_dir, final
    results = {}
    for name, (perturb, key) in self.attacks.items():
      out = self.ctx.predict(state, self.source, ("correct",), perturb=perturb, perturb_key=key)
      results[f"robust/{name}/accuracy"] = float(out["correct"].mean())
      results[f"robust/{name}/num_examples"] = float(len(out["correct"]))
    return results


def _build(spec: Any, where: str):
  return attacks.build(spec.to_dict() if hasattr(spec, "to_dict") else spec, where=where)
