"""Self-training vs pre-training (Zoph et al. 2020) and Noisy Student rounds
(Xie et al. 2020) on the embedded data, as one recipe.

  --config configs/recipes/self_training.py                        # Noisy Student: teacher + 3 rounds, S4
  --config configs/recipes/self_training.py:aug=s1,rounds=1        # one round under flip/crop-strength aug
  --config configs/recipes/self_training.py:mode=compare           # Zoph et al.'s arms (below), S1 and S4
  --config configs/recipes/self_training.py:normalize=False        # Noisy Student's L_h + α L_p
  --config configs/recipes/self_training.py:student=wide           # a student twice as wide
  --config configs/recipes/self_training.py:init=simclr            # teacher and students from SimCLR
  --config configs/recipes/self_training.py:cifar10                # 4,000 CIFAR-10 labels, WRN-28-2

Target: ``digits`` with ``labeled_per_class`` labelled images per class (20:
200 images, a seeded subset); unlabelled: the other 1,057 ``digits:train``
images, labels dropped (disjoint pools, as Noisy Student); test:
``digits:test``. Augmentation strengths for 32×32
characters (no flips: characters are not mirror-symmetric):

* ``s1`` -- ``pad_crop(2)`` (the digits default; Zoph's Augment-S1 is
  flip + crop);
* ``s4`` -- ``randaugment(2, 10)|scale_jitter(0.5, 2.0)|pad_crop(2)``
  (Augment-S4: RandAugment N = 2, M = 10 with large scale jittering).

``mode=noisy_student`` stages: ``teacher`` (small CNN on the labelled
subset), then per round k ``labels_k`` (``pseudo_label``: threshold 0.3, 105
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

``variant=cifar10`` (not run here: CIFAR-10 and ``imagenet_resized/32x32``
must be prepared, see ``docs/datasets.md``) is the usual semi-supervised
protocol: 4,000 CIFAR-10 labels (400 per class, seeded), the other 46,000
training images unlabelled (``unlabeled=imagenet`` takes
``imagenet_resized/32x32`` instead), WRN-28-2 as that literature uses (SGD
Nesterov lr 0.03, wd 5e-4, cosine, batch 64 labelled), flips and 4-pixel
crops for ``s1`` and RandAugment(2, 10) with scale jitter for ``s4``; the
students add Noisy Student's model noise (stochastic depth 0.2 -- WRN's
dropout sits inside the blocks, so it stays 0 -- and ``s4``). Pre-training
(``init=``, ``mode=compare``) is on ``imagenet_resized/32x32``. Its
defaults: 50,000 steps per stage, 4,600 pseudo-labelled images per class.
"""

import dataclasses

from configs import default
from configs.recipes import pretrain_finetune
from jaxrobust.config import parse_arg
from jaxrobust.methods import self_training, simclr, transfer

VARIANTS = ("embedded", "cifar10")
MODES = ("noisy_student", "compare")
SIMCLR_LR = 0.3  # SimCLR: 0.3 x batch / 256 (LARS)
# Initialisations besides random: (pre-training stage, init_from.skip).
INITS = {"supervised": ("pretrain_sup", ""), "simclr": ("pretrain_simclr", simclr.fine_tune_skip())}


@dataclasses.dataclass(frozen=True)
class Setting:
  """What differs between the embedded benchmark and CIFAR-10."""
  target: str  # the labelled task (its train split also the default unlabelled pool)
  aug: dict  # s1 / s4 chains
  labeled_per_class: int
  unlabeled_per_class: int  # pseudo-labelled images per class
  steps: int
  pretrain_steps: int
  random_lr: float  # teachers and supervised arms from random init
  finetune_lr: float  # from a pre-training
  source: str  # pre-training source
  source_classes: int
  simclr_pp: str
  students: dict  # student size -> trunk widths (model kwargs)
  student_noise: dict  # model kwargs of the students (Noisy Student's model noise)


EMBEDDED = Setting(
    target="digits",
    aug={"s1": "pad_crop(2)", "s4": "randaugment(2, 10)|scale_jitter(0.5, 2.0)|pad_crop(2)"},
    labeled_per_class=20,
    unlabeled_per_class=105,  # ~ the 1,057 unlabelled digits:train images (1,257 - 200) over 10
    steps=400, pretrain_steps=400,
    random_lr=0.3,  # configs/default.py (digits:validation)
    finetune_lr=0.1,  # pretrain_finetune.EMBEDDED_FINETUNE_LR (digits:validation)
    source=default.embedded_source(), source_classes=62, simclr_pp="simclr_gray",
    # the student's trunk: as large as the teacher, or twice as wide (student >= teacher)
    students={"same": {}, "wide": {"stage_widths": ((64,), (64,), (128, 128))}},
    student_noise={"dropout_rate": 0.2})
CIFAR10 = Setting(
    target="cifar10",
    aug={"s1": "pad_crop(4)|flip", "s4": "randaugment(2, 10)|scale_jitter(0.5, 2.0)|pad_crop(4)|flip"},
    labeled_per_class=400, unlabeled_per_class=4600, steps=50_000, pretrain_steps=50_000,
    random_lr=0.03, finetune_lr=0.01, source="imagenet_resized/32x32", source_classes=1000,
    simclr_pp="simclr",
    students={"same": {}, "wide": {"width": 4}},
    student_noise={"stochastic_depth_rate": 0.2})
SETTINGS = {"embedded": EMBEDDED, "cifar10": CIFAR10}
UNLABELED = {"": None, "imagenet": "imagenet_resized/32x32"}


def labeled(per_class: int) -> str:
  return f"per_class(num_per_class={int(per_class)})"  # seeded by config.seed


def no_ood(target: str) -> dict:
  return {"ood": {"sets": {}}, "classification": {"splits": ("test",)}}


def supervised(st: Setting, aug: str, steps: int, per_class: int, **extra) -> dict:
  """A supervised run on the labelled subset with augmentation ``aug``."""
  out = {"streams": {"train": {"index": labeled(per_class), "pp": st.aug[aug], "batch_size": 64}},
         "num_steps": int(steps), "evaluators": no_ood(st.target),
         "checkpoint_every_steps": min(10_000, max(int(steps) // 2, 1)),
         "optimizer": {"learning_rate": st.random_lr}}
  out.update(extra)
  return out


def student_stage(st: Setting, labels_stage: str, aug: str, steps: int, per_class: int, *,
                  unlabel_ratio: float, normalize: bool, init: str = "", size: str = "same",
                  unlabeled: str = "") -> dict:
  base = supervised(st, aug, steps, per_class,
                    model={"kwargs": {**st.student_noise, **st.students[size]}})
  if init:
    base = _from_pretrained(st, base, init, steps)
  data, split = (unlabeled, "train") if unlabeled else (st.target, "train")
  return {"task": "train", "config": self_training.student(
      base, labels_stage=labels_stage, data=data, split=split, batch_size=64,
      unlabel_ratio=unlabel_ratio, pp=st.aug[aug], normalize=normalize)}


def _from_pretrained(st: Setting, overrides: dict, init: str, steps: int) -> dict:
  """Fine-tuning from a pre-training stage of :data:`INITS` (its checkpoint,
  a new head, SimCLR's projection head dropped), ``steps`` steps."""
  stage, skip = INITS[init]
  out = transfer.fine_tune(overrides, source=f"artifact:{stage}/checkpoint",
                           learning_rate=st.finetune_lr, batch_size=64, num_steps=steps)
  out["init_from"]["skip"] = skip
  return out


def pretrain_stages(st: Setting, steps: int, variant: str) -> dict:
  """Supervised pre-training on the source and SimCLR on its images."""
  if variant == "embedded":
    sup = default.pretrain_overrides(st.source, steps)
  else:
    sup = {**pretrain_finetune.source_pretrain(variant), "num_steps": int(steps),
           "checkpoint_every_steps": min(10_000, max(int(steps) // 2, 1))}
  return {
      "pretrain_sup": {"task": "train", "config": sup},
      "pretrain_simclr": {"task": "train", "config": simclr.pretrain(
          {**sup, "optimizer": {"name": "lars", "learning_rate": SIMCLR_LR * 128 / 256,
                                "weight_decay": 1e-6, "weight_decay_on": "kernels",
                                "nesterov": False},
           "evaluators": {"ood": {"sets": {}}, "classification": {"splits": ()}}},
          pp_chain=st.simclr_pp)},
  }


def pseudo_label_options(st: Setting, threshold: float = 0.3, per_class: int = 20,
                         unlabeled: str = "") -> dict:
  """The teacher labels the unlabelled pool: the target's training images
  without the labelled ones (the ``train`` stream's ``per_class`` subset;
  disjoint pools, as Noisy Student), or another dataset's."""
  if unlabeled:
    return {"data": unlabeled, "split": "train", "threshold": float(threshold),
            "num_per_class": st.unlabeled_per_class, "hard": True}
  return {"data": st.target, "split": "train", "threshold": float(threshold),
          "num_per_class": st.unlabeled_per_class, "hard": True, "exclude": labeled(per_class)}


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", mode="noisy_student", aug="s4", rounds=3, steps=-1,
                   pretrain_steps=-1, labeled_per_class=-1, unlabel_ratio=1.0, normalize=True,
                   threshold=0.3, student="same", init="random", unlabeled="", smoke=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  st = SETTINGS[args.variant]
  if args.init not in ("random", *INITS):
    raise ValueError(f"init must be random or one of {sorted(INITS)}, got {args.init!r}.")
  if args.student not in st.students:
    raise ValueError(f"student must be one of {sorted(st.students)}, got {args.student!r}.")
  if args.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {args.mode!r}.")
  if args.aug not in st.aug:
    raise ValueError(f"aug must be one of {sorted(st.aug)}, got {args.aug!r}.")
  if args.unlabeled not in UNLABELED or (args.unlabeled and args.variant == "embedded"):
    raise ValueError(f"unlabeled must be '' (the target's own training images) or, for "
                     f"cifar10, 'imagenet'; got {args.unlabeled!r}.")
  unlabeled = UNLABELED[args.unlabeled] or ""
  if args.variant == "embedded":
    c = default.embedded_target(args.smoke)
  else:
    c = default.get_config(args.variant)
    c.model.kwargs.depth, c.model.kwargs.width, c.model.kwargs.dropout_rate = 28, 2, 0.0
    c.optimizer.schedule_offset = 0
    c.evaluators.ood.sets = {}
  steps = int(args.steps if args.steps > 0 else st.steps)
  pretrain_steps = int(args.pretrain_steps if args.pretrain_steps > 0 else st.pretrain_steps)
  per_class = int(args.labeled_per_class if args.labeled_per_class > 0
                  else st.labeled_per_class)
  size = "same" if args.smoke else args.student
  student_of = lambda aug, **kw: (lambda pl: student_stage(
      st, pl, aug, steps, per_class, unlabel_ratio=args.unlabel_ratio, size=size,
      unlabeled=unlabeled, **kw)["config"])
  pl_options = pseudo_label_options(st, args.threshold, per_class, unlabeled)
  stages = {}
  augs = [args.aug] if args.mode == "noisy_student" else ["s1", "s4"]
  init = "" if args.mode == "compare" or args.init == "random" else args.init
  if args.mode == "compare" or init:
    pre = pretrain_stages(st, pretrain_steps, args.variant)
    stages.update(pre if args.mode == "compare" else {INITS[init][0]: pre[INITS[init][0]]})
  for aug in augs:
    teacher = "teacher" if args.mode == "noisy_student" else f"rand_{aug}"
    base = supervised(st, aug, steps, per_class)
    stages[teacher] = {"task": "train",
                       "config": _from_pretrained(st, base, init, steps) if init else base}
    if args.mode == "noisy_student":
      stages.update(self_training.rounds(
          teacher, int(args.rounds),
          student_config=student_of(aug, normalize=args.normalize, init=init),
          pseudo_label=pl_options, labels_stage=lambda k: f"labels_{k}",
          student_stage=lambda k: f"student_{k}"))
    else:  # round 1 is st_<aug>; more rounds (s4 only): st_s4_r2, st_s4_r3, ...
      stages.update(self_training.rounds(
          teacher, int(args.rounds) if aug == "s4" else 1,
          student_config=student_of(aug, normalize=args.normalize),
          pseudo_label=pl_options,
          labels_stage=lambda k, a=aug: f"labels_{a}" + (f"_r{k}" if k > 1 else ""),
          student_stage=lambda k, a=aug: f"st_{a}" + (f"_r{k}" if k > 1 else "")))
  if args.mode == "compare":
    for aug in augs:
      for name, which in (("sup", "supervised"), ("simclr", "simclr")):
        stages[f"{name}_{aug}"] = {"task": "train", "config": _from_pretrained(
            st, supervised(st, aug, steps, per_class), which, steps)}
    stages["st_nonorm_s4"] = {"task": "train",
                              "config": student_of("s4", normalize=False)("labels_s4")}
    stages.update(self_training.rounds(
        "sup_s4", 1, student_config=student_of("s4", normalize=args.normalize,
                                               init="supervised"),
        pseudo_label=pl_options, labels_stage=lambda k: "labels_sup_s4",
        student_stage=lambda k: "sup_st_s4"))
    stages["joint_s4"] = {"task": "train", "config": self_training.joint_training(
        supervised(st, "s4", steps, per_class),
        source_data=default.embedded_source(args.smoke) if args.variant == "embedded"
        else st.source, source_classes=st.source_classes, batch_size=64)}
  c.stages = stages
  return c
