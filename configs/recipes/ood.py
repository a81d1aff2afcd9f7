"""OOD detection recipes: MSP baseline, energy / ODIN / Mahalanobis scores,
energy-bounded and Outlier Exposure fine-tuning, confidence-loss training.

  --config configs/recipes/ood.py                   # = :embedded,mode=compare (every arm, ~6 min on 2 cores)
  --config configs/recipes/ood.py:mode=msp          # the baseline alone: train, MSP + energy scores
  --config configs/recipes/ood.py:mode=energy_ft    # baseline -> margins -> energy fine-tuning
  --config configs/recipes/ood.py:mode=oe_ft        # baseline -> Outlier Exposure fine-tuning
  --config configs/recipes/ood.py:mode=confidence   # training with Lee et al.'s confidence loss
  --config configs/recipes/ood.py:cifar10,outliers=DATASET:SPLIT   # WRN-40-2, the papers' settings
  --config configs/recipes/ood.py:cifar10,checkpoint=PATH.pt        # a released checkpoint, every detector

Stages (``mode=compare``; each other mode is the part of it it names):

* ``baseline`` -- the in-distribution model trained from scratch
  (``configs/default.py``; the energy code's "pretrained" CIFAR WRN).
* ``scores`` -- that model scored by MSP and energy at T = 1 (the papers'
  settings), by MSP and energy with T tuned (``msp_tuned``, ``energy_tuned``)
  and by ODIN and Mahalanobis with T / ε tuned: ``tune_msp``,
  ``tune_energy``, ``tune_odin`` and ``tune_mahalanobis`` (``tune_score`` on
  the validation split against the OE code's ``--validate`` sets made from
  it, :data:`VALIDATION_OOD`: jigsaw, speckle, pixelate, RGB shift, invert,
  arithmetic and geometric means of image pairs -- none of which resembles a
  test set; FPR95 averaged over them).
* ``margins`` -- ``energy_margins``: m_in / m_out from the baseline's median
  energies on the training set and on the training outliers (the energy
  maintainers' advice); for CIFAR the paper's values are used instead
  (m_in = −23 / −27, m_out = −5).
* ``energy_ft`` -- fine-tuning with CE + 0.1 · energy hinge on the in-
  distribution batch and an outlier batch of twice its size (128 + 256 in the
  paper), in one forward pass;
* ``oe_ft`` -- fine-tuning with CE + 0.5 · OE loss, same batches;
* ``confidence`` -- training from scratch with CE + β · KL(U ‖ p(outliers)),
  β = 1 (Lee et al.'s setting for an explicit OOD set; the 0.1 of their CIFAR
  GAN runs is for generated samples).

Embedded variant: in-distribution ``digits``; training outliers the upper-case
letters ``glyphs/upper:train``; test OOD sets: the Gaussian, Rademacher, blobs
and photo-patch sets and the lower-case letters ``glyphs/lower:test`` (near
OOD); validation OOD sets for tuning: ``validation_ood/<kind>/digits:validation``
(:mod:`jaxrobust.data.validation_ood`). None of the test sets overlaps the
training outliers or the tuning sets. Fine-tuning:
10 epochs (as the paper) at the lr chosen on validation (docs/methods/ood.md). CIFAR
variants: the energy code's recipe (10 epochs, lr 0.001 cosine, wd 5e-4,
batches 128 + 256) from a baseline WRN-40-2; the outliers must be given
(``outliers=...``; 80 Million Tiny Images is withdrawn, e.g.
``imagenet_resized/32x32:train`` -- say which in any report).

Released checkpoints (``checkpoint=PATH``, instead of a mode): the stages
``import`` (``import_torch``: the PyTorch state_dict file -- ``.pt``/``.pth``
read with ``torch.load(weights_only=True)``, ``.npz`` or ``.safetensors`` -- of
the variant's WRN-40-2 written as a jaxrobust checkpoint) and ``scores``
(``evaluate``: the OOD evaluator with :data:`CHECKPOINT_SCORES`, every
registered score at its defaults -- MSP, max logit, entropy, energy, ODIN,
Mahalanobis and the 16 post-hoc detectors). ``norm`` sets the input
normalisation the checkpoint was trained with: ``cifar`` (default; the
``outlier-exposure`` / ``energy_ood`` models: ``trn.Normalize`` with the
CIFAR mean and std of :data:`CIFAR_MEAN` / :data:`CIFAR_STD`) or ``half``
(``hendrycks/pre-training``: mean = std = 0.5). docs/pretrained-checkpoints.md
lists the checkpoints and the papers' numbers.

``posthoc=True`` (with ``mode=compare``) adds ``posthoc_baseline`` and
``posthoc_energy_ft``: every score of :data:`CHECKPOINT_SCORES` at its
defaults on the baseline and the energy-fine-tuned model, under OpenOOD's
protocol (``preset='openood'``: OOD positive, every OOD example; groups near =
the letters or the other CIFAR, far = every other set) -- the table of
``launch.reproduce liu2020``.

Arguments after ``:``: ``variant`` (embedded, cifar10, cifar100), ``mode``,
``outliers`` (``dataset:split`` of the training outliers), ``lr``
(fine-tuning), ``epochs`` (fine-tuning), ``baseline_epochs``, ``checkpoint``
(a released checkpoint to evaluate), ``norm`` (cifar, half), ``posthoc``.
"""

from configs import default
from jaxrobust.config import parse_arg
from jaxrobust.methods.tuning import VALIDATION_KINDS, validation_sets

VARIANTS = ("embedded", "cifar10", "cifar100")
MODES = ("compare", "msp", "energy_ft", "oe_ft", "confidence")
# What a variant cannot run without (the training outliers of the CIFAR variants).
REQUIRED_ARGS = {v: "outliers=imagenet_resized/32x32:train" for v in ("cifar10", "cifar100")}
EMBEDDED_FINETUNE_LR = 0.1  # picked on validation (docs/methods/ood.md)
# wetliu/energy_ood run.sh energy_ft margins.
PAPER_MARGINS = {"cifar10": (-23.0, -5.0), "cifar100": (-27.0, -5.0)}
# The scores tuned on the validation OOD sets (every registered score of the
# comparison that has options), each by a ``tune_<score>`` stage.
TUNED_SCORES = ("msp", "energy", "odin", "mahalanobis")
# The kinds of validation OOD set the scores are tuned on (jaxrobust.data.validation_ood).
VALIDATION_OOD = VALIDATION_KINDS
# outlier-exposure / energy_ood CIFAR/test.py: trn.Normalize(mean, std) of [0, 1] pixels.
CIFAR_MEAN = tuple(x / 255 for x in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(x / 255 for x in (63.0, 62.1, 66.7))
NORMS = {"cifar": (CIFAR_MEAN, CIFAR_STD), "half": ((0.5,) * 3, (0.5,) * 3)}
# checkpoint=...: the tfds sets among the energy paper's six (Textures, SVHN; its
# Places365, LSUN-C, LSUN-R and iSUN are added with --config.evaluators.ood.sets.<name>=...),
# besides the variant's generated noise sets.
POSTHOC_NEAR = ("letters", "cifar10", "cifar100")  # posthoc=True: OpenOOD's near group
CHECKPOINT_SETS = {"textures": "dtd:test", "svhn": "svhn_cropped:test"}
# checkpoint=...: every registered score at its defaults (jaxrobust.scores.SCORES).
CHECKPOINT_SCORES = ("msp", "max_logit", "entropy", "energy", "odin", "mahalanobis", "react",
                     "ash_p", "ash_b", "ash_s", "scale", "dice", "gradnorm", "gen", "kl_matching",
                     "vim", "residual", "knn", "relative_mahalanobis", "she", "nnguide", "fdbd")


def _finetune(c, *, lr: float, epochs: float, loss: dict, outliers: str, batch: int) -> dict:
  """Overrides of a fine-tuning stage: from the baseline, an outlier stream
  of twice the in-distribution batch, CE plus the method's term."""
  name, _, split = outliers.rpartition(":")
  return {
      "init_from": {"path": "artifact:baseline/checkpoint", "reset_head": "never"},
      "num_epochs": float(epochs),
      "optimizer": {"learning_rate": lr, "schedule": "cosine",
                    "end_learning_rate": min(1e-6, lr)},
      "streams": {"outliers": {"data": name, "split": split, "batch_size": 2 * batch,
                               "pp": c.streams.train.pp}},
      "losses": loss,
  }


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", mode="", outliers="", lr=-1.0, epochs=10.0,
                   baseline_epochs=-1.0, checkpoint="", norm="", posthoc=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  if args.checkpoint:
    return _checkpoint_config(args)
  if args.norm:
    raise ValueError("norm= is the normalisation of a released checkpoint: give checkpoint= too.")
  args.mode = args.mode or "compare"
  if args.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {args.mode!r}.")
  c = default.get_config(args.variant)
  embedded = args.variant == "embedded"
  if embedded:
    c.evaluators.ood.sets["letters"] = "glyphs/lower:test"
    outliers = args.outliers or "glyphs/upper:train"
    lr = args.lr if args.lr > 0 else EMBEDDED_FINETUNE_LR
  else:
    if not args.outliers and args.mode != "msp":
      raise ValueError(f"{args.variant}: give the training outliers, e.g. "
                       f"configs/recipes/ood.py:{args.variant},outliers=imagenet_resized/32x32:train")
    outliers = args.outliers
    lr = args.lr if args.lr > 0 else 0.001
  if args.baseline_epochs > 0:
    c.num_epochs = float(args.baseline_epochs)
  baseline_epochs = c.num_epochs
  batch = c.streams.train.batch_size
  c.evaluators.ood.preset = "energy"  # FPR95 with ID positive, 10 draws (the energy code)
  tuned = {"msp": "msp", "energy": "energy", "msp_tuned": "artifact:tune_msp/best:spec",
           "energy_tuned": "artifact:tune_energy/best:spec",
           "odin": "artifact:tune_odin/best:spec",
           "mahalanobis": "artifact:tune_mahalanobis/best:spec"}
  validation_ood = validation_sets(c.data.name, "validation", VALIDATION_OOD)
  stages = {}
  if args.mode != "confidence":
    stages["baseline"] = {"task": "train", "config": {"num_epochs": baseline_epochs}}
  if args.mode in ("compare",):
    stages.update({
        f"tune_{score}": {"task": "tune_score", "checkpoint": "artifact:baseline/checkpoint",
                          "score": score, "ood": dict(validation_ood)}
        for score in TUNED_SCORES})
    stages.update({
        "scores": {"task": "evaluate", "checkpoint": "artifact:baseline/checkpoint",
                   "config": {"evaluators": {"ood": {"scores": tuned}}}},
    })
  if args.mode in ("compare", "energy_ft"):
    if embedded:
      stages["margins"] = {"task": "energy_margins", "checkpoint": "artifact:baseline/checkpoint",
                           "outliers": outliers}
      m_in, m_out = "artifact:margins/margins:m_in", "artifact:margins/margins:m_out"
    else:
      m_in, m_out = PAPER_MARGINS[args.variant]
    stages["energy_ft"] = {"task": "train", "config": _finetune(
        c, lr=lr, epochs=args.epochs, outliers=outliers, batch=batch,
        loss={"energy_hinge": {"weight": 0.1, "m_in": m_in, "m_out": m_out}})}
  if args.mode in ("compare", "oe_ft"):
    stages["oe_ft"] = {"task": "train", "config": _finetune(
        c, lr=lr, epochs=args.epochs, outliers=outliers, batch=batch,
        loss={"outlier_exposure": {"weight": 0.5}})}
  if args.mode in ("compare", "confidence"):
    name, _, split = outliers.rpartition(":")
    stages["confidence"] = {"task": "train", "config": {
        "num_epochs": baseline_epochs,
        "streams": {"outliers": {"data": name, "split": split, "batch_size": 2 * batch,
                                 "pp": c.streams.train.pp}},
        "losses": {"confidence": {"weight": 1.0}}}}
  if args.posthoc:
    if args.mode != "compare":
      raise ValueError("posthoc=True scores the baseline and energy-fine-tuned models: it needs "
                       f"mode=compare (got mode={args.mode!r}).")
    stages.update(posthoc_stages(c, ("baseline", "energy_ft")))
  c.stages = stages
  return c


def posthoc_groups(sets) -> dict[str, tuple[str, ...]]:
  """OpenOOD's two groups of the recipe's OOD sets: near = the glyph letters
  (and the other CIFAR), far = every other set (noise, photo patches)."""
  near = tuple(s for s in sets if s in POSTHOC_NEAR)
  return {"near": near, "far": tuple(s for s in sets if s not in near)}


def posthoc_stages(c, arms) -> dict:
  """``posthoc_<arm>``: every score of :data:`CHECKPOINT_SCORES` (the
  post-hoc detectors at their defaults, ODIN and Mahalanobis untuned) on
  ``arm``'s checkpoint under OpenOOD's protocol (``preset='openood'``: OOD
  positive, every OOD example, near/far group averages, ID accuracy)."""
  ood = {"scores": CHECKPOINT_SCORES, "preset": "openood",
         "groups": posthoc_groups(tuple(c.evaluators.ood.sets))}
  return {f"posthoc_{arm}": {"task": "evaluate", "checkpoint": f"artifact:{arm}/checkpoint",
                             "config": {"evaluators": {"ood": ood}}} for arm in arms}


def _checkpoint_config(args) -> dict:
  """``checkpoint=PATH``: import a released PyTorch checkpoint, then score it
  with every detector."""
  if args.mode:
    raise ValueError(f"checkpoint={args.checkpoint!r} evaluates a released checkpoint; it takes "
                     f"no mode (got mode={args.mode!r}).")
  norm = args.norm or "cifar"
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {tuple(NORMS)}, got {args.norm!r}.")
  if args.variant == "embedded":
    raise ValueError("checkpoint=: the released checkpoints are CIFAR models; use "
                     "variant=cifar10 or cifar100.")
  c = default.get_config(args.variant)
  c.data.mean, c.data.std = NORMS[norm]
  c.evaluators.ood.preset = "energy"  # FPR95 with ID positive, 10 draws (the energy code)
  c.evaluators.ood.scores = CHECKPOINT_SCORES
  c.evaluators.ood.sets.update(CHECKPOINT_SETS)
  c.data.image_size = 32  # OE/energy test.py: trn.Resize(32), trn.CenterCrop(32); CIFAR as it is
  c.stages = {"import": {"task": "import_torch", "path": args.checkpoint},
              "scores": {"task": "evaluate", "checkpoint": "artifact:import/checkpoint"}}
  return c
