"""Adversarial training and adversarial pre-training -> fine-tuning
(Hendrycks, Lee, Mazeika, ICML 2019, §4.1) as a recipe of stages.

  --config configs/recipes/adversarial.py                   # = :embedded, mode=compare
  --config configs/recipes/adversarial.py:mode=scratch      # adversarial training from scratch only
  --config configs/recipes/adversarial.py:mode=full         # adv. pre-training on glyphs -> adv. fine-tuning on digits
  --config configs/recipes/adversarial.py:mode=last_layer   # adv. pre-training, then only the new head (BatchNorm frozen)
  --config configs/recipes/adversarial.py:cifar10           # WRN-28-10 on imagenet_resized/32x32 -> CIFAR-10 (the paper)
  --config configs/recipes/adversarial.py:cifar100

Every training stage trains on PGD examples only (ℓ∞, ε = 8/255, step
2/255, ``train_steps`` steps, random start; BatchNorm in train mode while
attacking), and every stage on the target reports ``robust/pgd20/accuracy``
(PGD-20, eval mode) next to the clean test accuracy
(:mod:`jaxrobust.methods.adversarial`).

* CIFAR: the paper's settings -- pre-training WRN-28-10 on Downsampled
  ImageNet 32x32 for 100 epochs (batch 256, lr 0.1), fine-tuning all layers
  5 epochs at lr 0.001 (batch 128), the scratch baseline 100 epochs, PGD-10.
* Embedded: the small CNN, pre-training on ``glyphs`` 2 epochs, fine-tuning on
  ``digits`` 5 epochs at the embedded fine-tuning lr (0.1), the scratch
  baseline with the digits defaults (15 epochs, lr 0.3). PGD with
  ``train_steps=10`` as the paper by default; ``train_steps`` lowers it (the
  reproduction's quick mode uses 3).

Arguments after ``:``: ``variant``, ``mode`` (full, last_layer, scratch,
compare), ``source`` (an adversarially pre-trained run: no pretrain stage),
``pretrain_epochs``, ``epochs``, ``scratch_epochs``, ``lr``, ``train_steps``,
``eval_steps``, ``eps`` (in 255ths: ``eps=8`` is 8/255; the step is eps/4).
"""

from configs import default
from configs.recipes import pretrain_finetune
from jaxrobust.config import parse_arg
from jaxrobust.methods import adversarial, transfer

VARIANTS = ("embedded", "cifar10", "cifar100")
MODES = transfer.MODES


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", mode="compare", source="", pretrain_epochs=-1.0,
                   epochs=-1.0, scratch_epochs=-1.0, lr=-1.0, train_steps=adversarial.TRAIN_STEPS,
                   eval_steps=adversarial.EVAL_STEPS, eps=8.0)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  if args.mode not in transfer.MODES:
    raise ValueError(f"mode must be one of {transfer.MODES}, got {args.mode!r}.")
  if args.train_steps < 1 or args.eval_steps < 1:
    raise ValueError(f"train_steps and eval_steps must be >= 1, got {args.train_steps} and "
                     f"{args.eval_steps}.")
  if args.eps < 0:
    raise ValueError(f"eps must be >= 0 (in 255ths), got {args.eps}.")
  c = default.get_config(args.variant)
  pretrain = pretrain_finetune.source_pretrain(args.variant, args.pretrain_epochs)
  if args.variant == "embedded":
    ft_lr, ft_batch = pretrain_finetune.EMBEDDED_FINETUNE_LR, 64
  else:  # WRN-28-10, as robustness/adversarial/train_imagenet.py
    pretrain["model"]["kwargs"].update(depth=28, width=10)
    c.model.kwargs.depth, c.model.kwargs.width = 28, 10
    ft_lr, ft_batch = adversarial.FINE_TUNE_LR, None
  # robustness/adversarial trains WRN-28-10 without dropout, from scratch and fine-tuned
  scratch = {} if args.variant == "embedded" else {"model": {"kwargs": {"dropout_rate": 0.0}}}
  if args.scratch_epochs > 0 or (args.mode == "scratch" and args.epochs > 0):
    scratch["num_epochs"] = float(args.scratch_epochs if args.scratch_epochs > 0 else args.epochs)
  if args.mode == "scratch" and args.lr > 0:
    scratch["optimizer"] = {"learning_rate": float(args.lr)}
  ft_overrides = {} if args.variant == "embedded" else {"model": {"kwargs": {"dropout_rate": 0.0}}}
  finetune = transfer.fine_tune(
      ft_overrides, source=args.source or "artifact:pretrain/checkpoint",
      num_epochs=args.epochs if args.epochs > 0 else adversarial.FINE_TUNE_EPOCHS,
      learning_rate=args.lr if args.lr > 0 else ft_lr, batch_size=ft_batch)
  eps = args.eps / 255
  c = adversarial.recipe(c, pretrain=pretrain, finetune=finetune, scratch=scratch,
                         mode=args.mode, eps=eps, step_size=eps / 4,
                         train_steps=int(args.train_steps), eval_steps=int(args.eval_steps))
  if args.source and "pretrain" in c.stages:
    del c.stages["pretrain"]
  return c
