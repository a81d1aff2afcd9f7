"""Pre-train -> fine-tune (Hendrycks, Lee, Mazeika, ICML 2019) as a two-stage recipe.

  --config configs/recipes/pretrain_finetune.py                  # = :embedded, glyphs -> digits (~2 min on 2 cores)
  --config configs/recipes/pretrain_finetune.py:mode=last_layer  # only the new head trains, BatchNorm frozen
  --config configs/recipes/pretrain_finetune.py:mode=scratch     # the baseline: no pre-training
  --config configs/recipes/pretrain_finetune.py:mode=compare     # all three, one shared pre-training
  --config configs/recipes/pretrain_finetune.py:cifar10          # WRN-40-2, imagenet_resized/32x32 -> CIFAR-10
  --config configs/recipes/pretrain_finetune.py:cifar100
  --config configs/recipes/pretrain_finetune.py:cifar10,source=/path/to/pretrained_run   # skip pre-training

Stages (jaxrobust.stages), run in <workdir>/<stage>:

* ``pretrain`` -- train on the source data: ``glyphs`` (62 classes; 2 epochs,
  batch 128, lr 0.4 cosine) for the embedded variant; ``imagenet_resized/32x32``
  (the tfds 32x32 ImageNet, 1000 classes) for CIFAR: WRN-40-2 without dropout,
  100 epochs, batch 256, lr 0.1 cosine (HPT ``downsampled_train/baseline.py``).
* ``finetune`` -- a new head on the target, initialised from
  ``artifact:pretrain/checkpoint``. CIFAR: the paper's defaults (10 epochs, lr
  0.001, batch 128, SGD Nesterov 0.9, wd 5e-4, cosine to 1e-6, flip +
  4-pixel pad-crop, dropout 0; HPT ``uncertainty/CIFAR/tune.py``). Embedded:
  10 epochs, batch 64, lr 0.1, chosen by ``digits:validation`` NLL (seed 0;
  see docs/methods/pretrain-finetune.md).
* ``mode=scratch`` -- one stage, ``scratch``: the target's own baseline
  recipe (configs/default.py: 15 epochs, lr 0.3 for digits; 100 epochs, lr
  0.1, dropout 0.3 for CIFAR).
* ``mode=compare`` -- ``pretrain``, then ``finetune`` (all layers),
  ``last_layer`` (head only) and ``scratch``: the three arms of the
  comparison on one pre-trained model (``python -m launch.reproduce
  hendrycks2019`` runs it over seeds).

Arguments after ``:``: ``variant`` (embedded, cifar10, cifar100), ``mode``
(full, last_layer, scratch, compare), ``source`` (a pre-trained run or
checkpoint directory: no pretrain stage), ``pretrain_epochs``, ``pretrain``
(embedded: a pre-training length, ``8`` epochs or ``plateau``, the stopping
rule of configs/default.py PRETRAIN_STOPPING), ``epochs``
(fine-tuning; with ``scratch_epochs`` for the baseline), ``lr``
(fine-tuning; the baseline's lr with mode=scratch).
"""

from configs import default
from jaxrobust.config import parse_arg
from jaxrobust.methods import transfer

VARIANTS = ("embedded", "cifar10", "cifar100")
MODES = transfer.MODES
# Picked on digits:validation (NLL) from {0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0},
# seed 0, for full and last-layer fine-tuning alike (docs/methods/pretrain-finetune.md).
EMBEDDED_FINETUNE_LR = 0.1


def source_pretrain(variant: str, epochs: float = -1.0) -> dict:
  """Overrides of the pre-training stage for ``variant`` (``epochs`` > 0
  replaces its number of epochs): ``glyphs`` for the embedded variant,
  ``imagenet_resized/32x32`` for CIFAR; OOD sets off, validation only."""
  no_ood = {"ood": {"sets": {}}, "classification": {"splits": ("validation",)}}
  if variant == "embedded":
    out = {"data": {"name": "glyphs"}, "streams": {"train": {"batch_size": 128}},
           "num_epochs": 2.0, "optimizer": {"learning_rate": default.GLYPHS_LR},
           "evaluators": no_ood, "checkpoint_every_steps": 200}
  else:
    out = {"data": {"name": "imagenet_resized/32x32"},
           "model": {"kwargs": {"dropout_rate": 0.0}},
           "streams": {"train": {"batch_size": 256}}, "num_epochs": 100.0,
           "optimizer": {"learning_rate": 0.1}, "evaluators": no_ood}
  if epochs > 0:
    out["num_epochs"] = float(epochs)
  return out


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", mode="full", source="", pretrain_epochs=-1.0,
                   epochs=-1.0, scratch_epochs=-1.0, lr=-1.0, pretrain="")
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  if args.mode not in transfer.MODES:
    raise ValueError(f"mode must be one of {transfer.MODES}, got {args.mode!r}.")
  c = default.get_config(args.variant)
  pretrain = source_pretrain(args.variant, args.pretrain_epochs)
  if args.pretrain:  # a pre-training length: epochs of glyphs, or 'plateau'
    if args.variant != "embedded":
      raise ValueError(f"pretrain={args.pretrain!r}: a pre-training length (epochs or "
                       "'plateau') is for the embedded variant; use pretrain_epochs.")
    pretrain = default.with_pretrain_length(pretrain, args.pretrain, source="glyphs")
  ft_lr, ft_batch = (EMBEDDED_FINETUNE_LR, 64) if args.variant == "embedded" else (None, None)
  scratch = {}
  scratch_epochs = args.scratch_epochs if args.scratch_epochs > 0 else (
      args.epochs if args.mode == "scratch" else -1)
  if scratch_epochs > 0:
    scratch["num_epochs"] = float(scratch_epochs)
  if args.mode == "scratch":
    if args.lr > 0:
      scratch["optimizer"] = {"learning_rate": float(args.lr)}
    return transfer.recipe(c, pretrain=pretrain, finetune={}, scratch=scratch, mode="scratch")
  # tune.py fine-tunes without dropout; the scratch baseline keeps the target's.
  ft_overrides = {} if args.variant == "embedded" else {"model": {"kwargs": {"dropout_rate": 0.0}}}
  finetune = transfer.fine_tune(
      ft_overrides, source=args.source or "artifact:pretrain/checkpoint",
      num_epochs=args.epochs if args.epochs > 0 else None,
      learning_rate=args.lr if args.lr > 0 else ft_lr, batch_size=ft_batch)
  c = transfer.recipe(c, pretrain=pretrain, finetune=finetune, scratch=scratch, mode=args.mode)
  if args.source:  # an existing pre-trained run: fine-tuning only
    del c.stages["pretrain"]
  return c
