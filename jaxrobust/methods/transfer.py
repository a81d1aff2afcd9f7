"""Pre-training -> fine-tuning (Hendrycks, Lee, Mazeika, ICML 2019).

Hendrycks et al. pre-train a WRN-40-2 on 32×32 Downsampled ImageNet (100
epochs, batch 256, lr 0.1 cosine, no dropout) and fine-tune it on CIFAR: a new
``Linear(128, K)`` head, **all layers trained, 10 epochs, lr 0.001**, batch
128, SGD Nesterov momentum 0.9, weight decay 5e-4, cosine to 1e-6 per step,
flip + 4-pixel pad-crop (``hendrycks/pre-training``,
``uncertainty/CIFAR/tune.py``). The baseline is training from scratch (100
epochs, lr 0.1, dropout 0.3; ``baseline.py``).

This module is the method as config: :func:`fine_tune` applies those defaults
to a config, :func:`last_layer_only` restricts training to the new head with
BatchNorm frozen (the linear-probe variant: the trunk is a fixed feature
extractor, as in DFR), and :func:`recipe` assembles the two-stage recipe run by
:mod:`jaxrobust.stages` (``configs/recipes/pretrain_finetune.py``). It needs
no new hook: ``init_from`` copies the trunk and gives the ``head`` a fresh
initialisation when the number of classes differs (the reference replaces the
final ``Linear``), ``model.trainable`` and ``model.freeze_bn`` select what
trains.

Departures from the reference: the embedded variant pre-trains on ``glyphs``
(62 classes) instead of Downsampled ImageNet and fine-tunes on ``digits``; its
epochs and learning rates are chosen for the small data (see the recipe). The
reference anneals to 1e-6; we do too for the CIFAR variants
(``end_learning_rate``).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections

from jaxrobust.config import merge

# uncertainty/CIFAR/tune.py of hendrycks/pre-training.
FINE_TUNE_DEFAULTS: Mapping[str, Any] = {
    "num_epochs": 10.0, "learning_rate": 0.001, "batch_size": 128, "momentum": 0.9,
    "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine", "end_learning_rate": 1e-6,
}
HEAD = "head/.*"
MODES = ("full", "last_layer", "scratch", "compare")


def fine_tune(overrides: dict[str, Any], *, source: str, num_epochs: float | None = None,
              learning_rate: float | None = None, batch_size: int | None = None,
              num_steps: int | None = None) -> dict[str, Any]:
  """Adds the fine-tuning settings to a stage's config ``overrides``:
  initialise from ``source`` (a checkpoint or ``'artifact:<stage>/checkpoint'``)
  with a fresh head, and Hendrycks et al.'s optimiser defaults unless given.
  ``num_steps`` (which overrides the epochs) fixes the length in steps."""
  d = FINE_TUNE_DEFAULTS
  return merge(overrides, {
      "init_from": {"path": source, "reset_head": "auto"},
      "num_epochs": float(d["num_epochs"] if num_epochs is None else num_epochs),
      **({"num_steps": int(num_steps)} if num_steps is not None else {}),
      "optimizer": {"learning_rate": d["learning_rate"] if learning_rate is None
                    else learning_rate, "momentum": d["momentum"], "nesterov": d["nesterov"],
                    "weight_decay": d["weight_decay"], "schedule": d["schedule"],
                    "end_learning_rate": d["end_learning_rate"]},
      "streams": {"train": {"batch_size": int(batch_size or d["batch_size"])}}})


def last_layer_only(overrides: dict[str, Any]) -> dict[str, Any]:
  """Only the classifier's ``head`` trains; BatchNorm runs in eval mode
  (running statistics of the pre-trained trunk kept, dropout off)."""
  return merge(overrides, {"model": {"trainable": HEAD, "freeze_bn": True}})


def recipe(config: ml_collections.ConfigDict, *, pretrain: Mapping[str, Any],
           finetune: Mapping[str, Any], scratch: Mapping[str, Any] | None = None,
           mode: str = "full") -> ml_collections.ConfigDict:
  """The recipe ``pretrain`` -> ``finetune`` on ``config``.

  Args:
    config: the shared config (the target task's, usually).
    pretrain: overrides of the pre-training stage (source data, epochs, ...).
    finetune: overrides of the fine-tuning stage (after :func:`fine_tune`).
    scratch: overrides of the baseline trained from scratch.
    mode: ``'full'`` (all layers, the paper), ``'last_layer'`` (head only,
      BatchNorm frozen), ``'scratch'`` (the baseline alone: one stage) or
      ``'compare'`` (one pre-training shared by the stages ``finetune`` and
      ``last_layer``, plus ``scratch``: the three arms of the comparison).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  c = copy.deepcopy(config)
  scratch_stage = {"task": "train", "config": dict(scratch or {})}
  if mode == "scratch":
    c.stages = {"scratch": scratch_stage}
    return c
  pre = {"task": "train", "config": dict(pretrain)}
  if mode == "compare":
    c.stages = {"pretrain": pre, "finetune": {"task": "train", "config": dict(finetune)},
                "last_layer": {"task": "train", "config": last_layer_only(dict(finetune))},
                "scratch": scratch_stage}
    return c
  ft = last_layer_only(dict(finetune)) if mode == "last_layer" else dict(finetune)
  c.stages = {"pretrain": pre, "finetune": {"task": "train", "config": ft}}
  return c
