"""Self-training as Zoph et al. (NeurIPS 2020), "Rethinking Pre-training and
Self-training", on top of Noisy Student (Xie et al. 2020): the student's loss,
loss normalisation, joint training, and the teacher -> student rounds.

**Self-training** (Zoph et al. §3.3, Noisy Student): a teacher trained on the
labelled data labels the unlabelled data (``pseudo_label`` stage of
:mod:`jaxrobust.methods.noisy_student`); a student -- equal or larger, with
noise: strong augmentation (RandAugment, ``pp='s4'``), dropout, stochastic
depth -- is trained from scratch on both, each step a labelled batch and an
unlabelled batch ``unlabel_ratio`` times larger (Noisy Student: 1 for B0, 3
for B1-B7, 5 for SVHN). Rounds: the student becomes the next teacher
(:func:`rounds`).

**Loss normalisation** (Zoph et al. §3.3). With ``L_h`` the loss on human
labels and ``L_p`` on pseudo-labels (moving averages ``L̄_h``, ``L̄_p``), the
student minimises

    L = (1/α) · (L_h + α · (L̄_h / L̄_p) · L_p),

so the pseudo loss keeps its direction but takes the human loss's magnitude
whatever augmentation strength makes it large or small, and α weighs the two.
That is ``weight = 1/α`` on the human term and ``normalize_by`` (with
``normalize_momentum``, the moving averages, kept in the train state) on the
pseudo term (:func:`student_losses`); without normalisation the loss is Noisy
Student's ``L_h + unlabel_ratio · L_p`` (``main.py``: ``(lab_loss·B_l +
unl_loss·B_u) / B_l`` with ``B_u = unlabel_ratio · B_l``; ``α`` scales it,
1 by default). The formula
is written from the paper as we understand it (it was not re-checked
against the PDF offline); the moving-average momentum is ours (0.99; the
paper does not give one here).

**Joint training** (Zoph et al. §4.4): the source task (ImageNet there,
``glyphs`` here) trained with the target at the same time: one trunk, the
target's classifier ``head`` and an extra head ``source`` (``config.model.
heads``), two streams, ``L = L_target + w · L_source`` (:func:`joint_training`;
the source stream keeps its own labels with the ``own`` label source).

Hard pseudo-labels are trained with label smoothing 0.1 (Noisy Student's
default); soft ones with plain cross-entropy. The student's labelled term has
label smoothing 0.1 too (Noisy Student's ``lab_loss``); the teachers and the
supervised arms of the recipe train with plain cross-entropy, as the
recipe's other supervised baselines. The unlabelled pool excludes the
labelled images (``pseudo_label(exclude=...)``): Noisy Student's unlabelled
data is disjoint from its labelled data.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxrobust.data.streams import LABELS, LabelFn, StreamData
from jaxrobust.registry import RegistryError

MOMENTUM = 0.99
HARD_LABEL_SMOOTHING = 0.1  # Noisy Student, hard pseudo-labels
LABELED_LABEL_SMOOTHING = 0.1  # Noisy Student's lab_loss (main.py), the student's labelled term
UNLABELED = "unlabeled"


@LABELS.register("own")
def own_labels(data: StreamData) -> LabelFn:
  """The dataset's labels in its own label space, even when it is not the
  task's (joint training's source stream, read by an extra head)."""
  del data
  return lambda idx, labels: {"label": labels}


def student_losses(*, alpha: float = 1.0, normalize: bool = True, momentum: float = MOMENTUM,
                   hard: bool = True, stream: str = UNLABELED,
                   unlabel_ratio: float = 1.0) -> dict[str, Any]:
  """``config.losses`` of a student: human-label CE on ``train`` (label
  smoothing 0.1, as Noisy Student's ``lab_loss``) and pseudo-label CE on
  ``stream``, combined as in the module docstring; without normalisation
  Noisy Student's ``L_h + unlabel_ratio · L_p`` (``(lab_loss·B_l +
  unl_loss·B_u) / B_l``), scaled by ``alpha``."""
  if not alpha > 0:
    raise RegistryError(f"self-training: alpha must be > 0, got {alpha!r}.")
  if not unlabel_ratio > 0:
    raise RegistryError(f"self-training: unlabel_ratio must be > 0, got {unlabel_ratio!r}.")
  smoothing = HARD_LABEL_SMOOTHING if hard else 0.0
  pseudo = {"name": "cross_entropy", "stream": stream, "label_smoothing": smoothing}
  human = {"label_smoothing": LABELED_LABEL_SMOOTHING}
  if normalize:
    return {"cross_entropy": {**human, "weight": 1.0 / alpha},
            "pseudo": {**pseudo, "weight": 1.0, "normalize_by": "cross_entropy",
                       "normalize_momentum": float(momentum)}}
  return {"cross_entropy": {**human, "weight": 1.0},
          "pseudo": {**pseudo, "weight": float(alpha) * float(unlabel_ratio)}}


def student(overrides: Mapping[str, Any], *, labels_stage: str, data: str, split: str = "train",
            batch_size: int, unlabel_ratio: float = 1.0, pp: str = "s4",
            alpha: float = 1.0, normalize: bool = True, hard: bool = True,
            momentum: float = MOMENTUM) -> dict[str, Any]:
  """A student stage's overrides: an ``unlabeled`` stream of ``data:split``
  reading the ``pseudo_label`` stage ``labels_stage``'s artifacts (batch
  ``unlabel_ratio`` × ``batch_size``, augmentation ``pp``) and the student
  losses. The labelled ``train`` stream and the model noise come from
  ``overrides``."""
  if unlabel_ratio <= 0:
    raise RegistryError(f"self-training: unlabel_ratio must be > 0, got {unlabel_ratio!r}.")
  out = dict(overrides)
  streams = {k: dict(v) for k, v in dict(out.get("streams", {})).items()}
  streams[UNLABELED] = {"data": data, "split": split, "pp": pp,
                        "batch_size": max(int(round(unlabel_ratio * batch_size)), 1),
                        "index": f"artifact:{labels_stage}/indices",
                        "labels": f"artifact:{labels_stage}/labels"}
  out["streams"] = streams
  out["losses"] = student_losses(alpha=alpha, normalize=normalize, momentum=momentum,
                                 hard=hard, unlabel_ratio=unlabel_ratio)
  return out


def rounds(teacher: str, num_rounds: int, *, student_config: Mapping[str, Any],
           pseudo_label: Mapping[str, Any], labels_stage, student_stage) -> dict[str, Any]:
  """Stages of ``num_rounds`` teacher -> student rounds after the stage
  ``teacher``: round k labels with the previous round's model and trains
  student k from scratch. ``labels_stage(k)`` / ``student_stage(k)`` name the
  stages; ``student_config(labels_stage_name)`` gives a student's overrides."""
  if int(num_rounds) != num_rounds or num_rounds < 1:
    raise RegistryError(f"self-training: rounds must be a positive integer, got {num_rounds!r}.")
  stages, previous = {}, teacher
  for k in range(1, int(num_rounds) + 1):
    pl, st = labels_stage(k), student_stage(k)
    stages[pl] = {"task": "pseudo_label", "checkpoint": f"artifact:{previous}/checkpoint",
                  **dict(pseudo_label)}
    stages[st] = {"task": "train", "config": student_config(pl)}
    previous = st
  return stages


def joint_training(overrides: Mapping[str, Any], *, source_data: str, source_classes: int,
                   weight: float = 1.0, batch_size: int = 64, pp: str = "") -> dict[str, Any]:
  """Joint training's overrides: a ``source`` stream of ``source_data`` with
  its own labels, a linear head ``source`` of ``source_classes`` outputs, and
  the source CE (weight ``weight``) next to the target's."""
  if source_classes < 1 or weight < 0:
    raise RegistryError(f"joint training: need source_classes >= 1 and weight >= 0, got "
                        f"{source_classes!r}, {weight!r}.")
  out = dict(overrides)
  streams = {k: dict(v) for k, v in dict(out.get("streams", {})).items()}
  streams["source"] = {"data": source_data, "split": "train", "batch_size": int(batch_size),
                       "labels": "own", "pp": pp}
  out["streams"] = streams
  model = dict(out.get("model", {}))
  model["heads"] = {**dict(model.get("heads", {})), "source": f"linear(features={source_classes})"}
  out["model"] = model
  out["losses"] = {**dict(out.get("losses", {})),
                   "source": {"name": "cross_entropy", "stream": "source", "head": "source",
                              "weight": float(weight)}}
  return out

