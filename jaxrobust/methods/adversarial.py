"""Adversarial training and adversarial pre-training (Hendrycks, Lee, Mazeika,
ICML 2019, §4.1), as config.

Reference: ``hendrycks/pre-training``, ``robustness/adversarial/``. Training
is Madry et al.'s: every training batch is replaced by its PGD examples (ℓ∞,
ε = 8/255, step 2/255, **10 steps**, uniform random start, clamp to [0, 1];
no clean loss term), the attack run with the model in train mode (BatchNorm
batch statistics; ``jaxrobust.train_step`` discards the attack passes'
statistics updates). Evaluation: PGD with **20 steps** on the test set, the
model in eval mode (:class:`jaxrobust.evaluators.robust.Robust`).
Adversarial pre-training trains the source task that way (Downsampled
ImageNet, WRN-28-10, 100 epochs, lr 0.1); adversarial fine-tuning replaces the
head and trains **all layers for 5 epochs at lr 0.001** (batch 128, cosine to
1e-6) on PGD-10 examples only (``tune.py``). The baseline is adversarial
training from scratch.

This module needs no new hook: the ``pgd`` perturbation of
:mod:`jaxrobust.attacks` on the ``train`` stream, and the ``robust``
evaluator. :func:`adversarial` adds both to a stage's overrides,
:func:`recipe` is :func:`jaxrobust.methods.transfer.recipe` with every stage
adversarial (``configs/recipes/adversarial.py``).

Departures: the embedded variant pre-trains the small CNN on ``glyphs`` and
fine-tunes on ``digits`` at the embedded fine-tuning learning rate of the
uncertainty recipe (``configs/recipes/pretrain_finetune.py``) rather than
0.001 -- the small model and data were not tuned separately for the
adversarial runs; the number of attack steps is an option (docs/methods/robustness.md and
the reproduction say what they used).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections

from jaxrobust.methods import transfer

EPS = 8 / 255
STEP_SIZE = 2 / 255
TRAIN_STEPS = 10
EVAL_STEPS = 20
# robustness/adversarial/tune.py of hendrycks/pre-training.
FINE_TUNE_EPOCHS = 5.0
FINE_TUNE_LR = 0.001


def pgd_spec(*, eps: float = EPS, step_size: float = STEP_SIZE, steps: int = TRAIN_STEPS,
             norm: str = "linf") -> str:
  """A ``pgd(...)`` perturbation spec (:mod:`jaxrobust.attacks`)."""
  return f"pgd(eps={eps!r}, step_size={step_size!r}, steps={int(steps)}, norm={norm!r})"


def adversarial(overrides: Mapping[str, Any], *, eps: float = EPS, step_size: float = STEP_SIZE,
                train_steps: int = TRAIN_STEPS, eval_steps: int = EVAL_STEPS,
                evaluate: bool = True) -> dict[str, Any]:
  """A stage's ``overrides`` made adversarial: the ``train`` stream perturbed
  by PGD-``train_steps`` (training on adversarial examples only), and with
  ``evaluate`` a ``robust`` evaluator reporting
  ``robust/pgd<eval_steps>/accuracy`` on the test split."""
  out = copy.deepcopy(dict(overrides))
  streams = {k: dict(v) for k, v in dict(out.get("streams", {})).items()}
  streams.setdefault("train", {})["perturb"] = pgd_spec(eps=eps, step_size=step_size,
                                                        steps=train_steps)
  out["streams"] = streams
  if evaluate:
    evaluators = {k: dict(v) for k, v in dict(out.get("evaluators", {})).items()}
    evaluators["robust"] = {"type": "robust", "split": "test", "attacks": {
        f"pgd{eval_steps}": pgd_spec(eps=eps, step_size=step_size, steps=eval_steps)}}
    out["evaluators"] = evaluators
  return out


def recipe(config: ml_collections.ConfigDict, *, pretrain: Mapping[str, Any],
           finetune: Mapping[str, Any], scratch: Mapping[str, Any] | None = None,
           mode: str = "full", **attack: Any) -> ml_collections.ConfigDict:
  """:func:`jaxrobust.methods.transfer.recipe` with every stage trained on
  PGD examples (``attack``: options of :func:`adversarial`). The pre-training
  stage is not evaluated for robustness (its classes are the source's)."""
  return transfer.recipe(
      config, pretrain=adversarial(pretrain, evaluate=False, **attack),
      finetune=adversarial(finetune, **attack), scratch=adversarial(scratch or {}, **attack),
      mode=mode)
