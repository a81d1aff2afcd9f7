"""Self-training vs pre-training (Zoph et al. 2020) and Noisy Student rounds
(Xie et al. 2020) on the embedded data, as one recipe.

  --config configs/recipes/self_training.py                        # Noisy Student: teacher + 3 rounds, S4
  --config configs/recipes/self_training.py:aug=s1,rounds=1        # one round under flip/crop-strength aug
  --config configs/recipes/self_training.py:mode=compare           # Zoph et al.'s arms (below), S1 and S4
  --config configs/recipes/self_training.py:normalize=False        # Noisy Student's L_h + α L_p
  --config configs/recipes/self_training.py:student=wide           # a student twice as wide
  --config configs/recipes/self_training.py:init=simclr            # teacher and students from SimCLR

Target: ``digits`` with ``labeled_per_class`` labelled images per class (20:
200 images, a seeded subset); unlabelled: all 1,257 ``digits:train`` images,
labels dropped; test: ``digits:test``. Augmentation strengths for 32×32
characters (no flips: characters are not mirror-symmetric):

* ``s1`` -- ``pad_crop(2)`` (the digits default; Zoph's Augment-S1 is
  flip + crop);
* ``s4`` -- ``randaugment(2, 10)|scale_jitter(0.5, 2.0)|pad_crop(2)``
  (Augment-S4: RandAugment N = 2, M = 10 with large scale jittering).

``mode=noisy_student`` stages: ``teacher`` (small CNN on the labelled
subset), then per round k ``labels_k`` (``pseudo_label``: threshold 0.3, 125
images per class, hard labels) and ``student_k`` (from scratch: labelled
batch 64 + pseudo-labelled batch 64 × ``unlabel_ratio``, the same
augmentation on both, dropout 0.2 before the head, loss-normalised); the
student is as large as the teacher (``student=wide``: twice as wide). The
small CNN has no residual blocks, so no stochastic depth here (``wrn``,
``preact_resnet18``, ``resnet50`` and EfficientNet have ``stochastic_depth_rate``).

``init=supervised|simclr`` (default ``random``) adds that pre-training stage
(``pretrain_sup``: supervised on ``glyphs``; ``pretrain_simclr``: SimCLR on
``glyphs`` images) and fine-tunes the teacher and every student from it
(self-training on top of pre-training).

``mode=compare`` adds Zoph et al.'s comparison, each at S1 and S4 (suffix):
``rand_*`` (random init: the teachers), ``sup_*`` (fine-tuned from
``pretrain_sup``, supervised on ``glyphs``), ``simclr_*`` (fine-tuned from
``pretrain_simclr``: SimCLR on ``glyphs`` images, projection head dropped),
``st_*`` (self-training from random init; at S4 ``rounds`` rounds:
``st_s4``, ``st_s4_r2``, ...), ``st_nonorm_s4``
(without loss normalisation), ``sup_st_s4`` (self-training on top of
pre-training: teacher ``sup_s4``, student initialised from ``pretrain_sup``)
and ``joint_s4`` (joint training: digits + glyphs, two heads).
"""

from configs import default
from jaxrobust.config import parse_arg
from jaxrobust.methods import self_training, simclr, transfer

MODES = ("noisy_student", "compare")
AUG = {"s1": "pad_crop(2)", "s4": "randaugment(2, 10)|scale_jitter(0.5, 2.0)|pad_crop(2)"}
TARGET = "digits"
UNLABELED_PER_CLASS = 105  # ~ the 1,057 unlabelled digits:train images (1,257 - 200) over 10 classes
FINETUNE_LR = 0.1  # pretrain_finetune.EMBEDDED_FINETUNE_LR (digits:validation)
SIMCLR_LR = 0.3  # SimCLR: 0.3 x batch / 256 (LARS)
NO_OOD = {"ood": {"sets": {}}, "classification": {"splits": ("test",)}}
# The student's trunk: as large as the teacher, or twice as wide (Noisy Student: student >= teacher).
STUDENTS = {"same": None, "wide": ((64,), (64,), (128, 128))}
# Initialisations besides random: (pre-training stage, init_from.skip).
INITS = {"supervised": ("pretrain_sup", ""), "simclr": ("pretrain_simclr", simclr.fine_tune_skip())}


def labeled(per_class: int) -> str:
  return f"per_class(num_per_class={int(per_class)})"  # seeded by config.seed


def supervised(aug: str, steps: int, per_class: int, **extra) -> dict:
  """A supervised run on the labelled subset with augmentation ``aug``."""
  out = {"streams": {"train": {"index": labeled(per_class), "pp": AUG[aug], "batch_size": 64}},
         "num_steps": int(steps), "evaluators": NO_OOD,
         "checkpoint_every_steps": max(int(steps) // 2, 1)}
  out.update(extra)
  return out


def student_stage(labels_stage: str, aug: str, steps: int, per_class: int, *,
                  unlabel_ratio: float, normalize: bool, init: str = "",
                  dropout: float = 0.2, widths=None) -> dict:
  kwargs = {"dropout_rate": dropout, **({"stage_widths": widths} if widths else {})}
  base = supervised(aug, steps, per_class, model={"kwargs": kwargs})
  if init:
    base = _from_pretrained(base, init, steps)
  return {"task": "train", "config": self_training.student(
      base, labels_stage=labels_stage, data=TARGET, batch_size=64,
      unlabel_ratio=unlabel_ratio, pp=AUG[aug], normalize=normalize)}


def _from_pretrained(overrides: dict, init: str, steps: int) -> dict:
  """Fine-tuning from a pre-training stage of :data:`INITS` (its checkpoint,
  a new head, SimCLR's projection head dropped), ``steps`` steps."""
  stage, skip = INITS[init]
  out = transfer.fine_tune(overrides, source=f"artifact:{stage}/checkpoint",
                           learning_rate=FINETUNE_LR, batch_size=64, num_steps=steps)
  out["init_from"]["skip"] = skip
  return out


def pretrain_stages(source: str, steps: int) -> dict:
  """Supervised pre-training on ``source`` and SimCLR on its images."""
  supervised = default.pretrain_overrides(source, steps)
  return {
      "pretrain_sup": {"task": "train", "config": supervised},
      "pretrain_simclr": {"task": "train", "config": simclr.pretrain(
          {**supervised, "optimizer": {"name": "lars", "learning_rate": SIMCLR_LR * 128 / 256,
                                   "weight_decay": 1e-6, "weight_decay_on": "kernels",
                                   "nesterov": False},
           "evaluators": {"ood": {"sets": {}}, "classification": {"splits": ()}}},
          pp_chain="simclr_gray")},
  }


def pseudo_label_options(threshold: float = 0.3, per_class: int = 20) -> dict:
  """The teacher labels ``digits:train`` without the labelled images (the
  ``train`` stream's ``per_class`` subset): disjoint pools, as Noisy Student."""
  return {"data": TARGET, "split": "train", "threshold": float(threshold),
          "num_per_class": UNLABELED_PER_CLASS, "hard": True, "exclude": labeled(per_class)}


def get_config(arg=None):
  args = parse_arg(arg, mode="noisy_student", aug="s4", rounds=3, steps=400,
                   pretrain_steps=400, labeled_per_class=20, unlabel_ratio=1.0, normalize=True,
                   threshold=0.3, student="same", init="random", smoke=False)
  if args.init not in ("random", *INITS):
    raise ValueError(f"init must be random or one of {sorted(INITS)}, got {args.init!r}.")
  if args.student not in STUDENTS:
    raise ValueError(f"student must be one of {sorted(STUDENTS)}, got {args.student!r}.")
  if args.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {args.mode!r}.")
  if args.aug not in AUG:
    raise ValueError(f"aug must be one of {sorted(AUG)}, got {args.aug!r}.")
  c = default.embedded_target(args.smoke)
  source = default.embedded_source(args.smoke)
  steps, per_class = int(args.steps), int(args.labeled_per_class)
  student_of = lambda aug, **kw: (lambda pl: student_stage(
      pl, aug, steps, per_class, unlabel_ratio=args.unlabel_ratio,
      widths=None if args.smoke else STUDENTS[args.student], **kw)["config"])
  stages = {}
  augs = [args.aug] if args.mode == "noisy_student" else ["s1", "s4"]
  init = "" if args.mode == "compare" or args.init == "random" else args.init
  if args.mode == "compare" or init:
    pre = pretrain_stages(source, int(args.pretrain_steps))
    stages.update(pre if args.mode == "compare" else {INITS[init][0]: pre[INITS[init][0]]})
  for aug in augs:
    teacher = "teacher" if args.mode == "noisy_student" else f"rand_{aug}"
    base = supervised(aug, steps, per_class)
    stages[teacher] = {"task": "train",
                       "config": _from_pretrained(base, init, steps) if init else base}
    if args.mode == "noisy_student":
      stages.update(self_training.rounds(
          teacher, int(args.rounds),
          student_config=student_of(aug, normalize=args.normalize, init=init),
          pseudo_label=pseudo_label_options(args.threshold, per_class),
          labels_stage=lambda k: f"labels_{k}",
          student_stage=lambda k: f"student_{k}"))
    else:  # round 1 is st_<aug>; more rounds (s4 only): st_s4_r2, st_s4_r3, ...
      stages.update(self_training.rounds(
          teacher, int(args.rounds) if aug == "s4" else 1,
          student_config=student_of(aug, normalize=args.normalize),
          pseudo_label=pseudo_label_options(args.threshold, per_class),
          labels_stage=lambda k, a=aug: f"labels_{a}" + (f"_r{k}" if k > 1 else ""),
          student_stage=lambda k, a=aug: f"st_{a}" + (f"_r{k}" if k > 1 else "")))
  if args.mode == "compare":
    for aug in augs:
      for name, which in (("sup", "supervised"), ("simclr", "simclr")):
        stages[f"{name}_{aug}"] = {"task": "train", "config": _from_pretrained(
            supervised(aug, steps, per_class), which, steps)}
    stages["st_nonorm_s4"] = {"task": "train",
                              "config": student_of("s4", normalize=False)("labels_s4")}
    stages.update(self_training.rounds(
        "sup_s4", 1, student_config=student_of("s4", normalize=args.normalize,
                                               init="supervised"),
        pseudo_label=pseudo_label_options(args.threshold, per_class),
        labels_stage=lambda k: "labels_sup_s4",
        student_stage=lambda k: "sup_st_s4"))
    stages["joint_s4"] = {"task": "train", "config": self_training.joint_training(
        supervised("s4", steps, per_class), source_data=source, source_classes=62,
        batch_size=64)}
  c.stages = stages
  return c
