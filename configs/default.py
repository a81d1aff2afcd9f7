"""Default config: the embedded offline dataset, or a paper setting by variant.

  --config configs/default.py              # = :embedded, small CNN on `digits` (< 1 min on 2 CPU cores)
  --config configs/default.py:glyphs       # small CNN on `glyphs` (62 classes): the pre-training source
  --config configs/default.py:cifar10      # WRN-40-2 on CIFAR-10, Hendrycks et al. (2019) baseline recipe
  --config configs/default.py:cifar100
  --config configs/default.py:smoke        # a few steps, for tests and CI
  --config configs/default.py:variant=cifar10,epochs=10

Any field can then be overridden: --config.optimizer.learning_rate=0.05
Pre-train -> fine-tune on the embedded data (Hendrycks et al. 2019 in small):
  python -m launch.train --config configs/default.py:glyphs --workdir runs/glyphs
  python -m launch.train --config configs/default.py --config.init_from.path=runs/glyphs \
      --workdir runs/digits_ft
"""

import math

from jaxrobust.config import base_config, merge, parse_arg

VARIANTS = ("embedded", "glyphs", "smoke", "cifar10", "cifar100")
# Picked on glyphs:validation (accuracy after 2 epochs, batch 128) from {0.05, 0.1, 0.2, 0.4}.
GLYPHS_LR = 0.4
OOD_SETS = ("gaussian_noise", "rademacher_noise", "blobs", "photo_patches")


def set_data(c, name: str, channels: int, *, pp: str) -> None:
  """Dataset, [-1, 1] scaling (mean = std = 0.5, as Hendrycks et al.), the
  training augmentation, and the embedded OOD sets of matching channels."""
  c.data.name = name
  c.data.mean = (0.5,) * channels
  c.data.std = (0.5,) * channels
  c.streams.train.pp = pp
  colour = "gray" if channels == 1 else "rgb"
  c.evaluators.ood.sets = {ood.split("_")[0]: f"{ood}/{colour}:test" for ood in OOD_SETS}


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", epochs=-1.0, model="")
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  c = base_config()

  if args.variant in ("embedded", "glyphs", "smoke"):
    # 32x32x1 characters. No flip: digits and letters are not mirror-symmetric;
    # small random translations (2-pixel pad-crop) instead.
    set_data(c, "glyphs" if args.variant == "glyphs" else "digits", 1, pp="pad_crop(2)")
    c.model.name = "small_cnn"
    c.model.kwargs.stage_widths = ((32,), (32,), (64, 64))
    c.streams.train.batch_size = 64
    c.num_epochs = 15.0
    # Picked on digits:validation (NLL) from {0.01, 0.03, 0.05, 0.1, 0.3, 1.0}, seed 0.
    c.optimizer.learning_rate = 0.3
    c.log_every_steps = 20
    c.checkpoint_every_steps = 100
  if args.variant == "glyphs":
    c.streams.train.batch_size = 128
    c.optimizer.learning_rate = GLYPHS_LR
    c.num_epochs = 8.0
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
  if args.variant == "smoke":
    c.num_steps = 6
    c.log_every_steps = 2
    c.checkpoint_every_steps = 3
    c.plots = False
  if args.variant in ("cifar10", "cifar100"):
    # Hendrycks et al. (2019) / Liu et al. (2020) baseline: WRN-40-2, dropout 0.3,
    # SGD Nesterov 0.9, lr 0.1 cosine to 1e-6, wd 5e-4, batch 128, 100 epochs,
    # flip + 4-pixel pad-crop, inputs scaled to [-1, 1].
    set_data(c, args.variant, 3, pp="pad_crop(4)|flip")
    c.evaluators.classification.splits = ("test",)
    c.model.name = "wrn"
    c.model.kwargs.depth = 40
    c.model.kwargs.width = 2
    c.model.kwargs.dropout_rate = 0.3
    c.num_epochs = 100.0
    c.optimizer.end_learning_rate = 1e-6
    c.optimizer.schedule_offset = 1  # tune.py/baseline.py: scheduler.step() before optimizer.step()
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
  if args.epochs > 0:
    c.num_epochs = float(args.epochs)
  if args.model:
    c.model.name = args.model
    c.model.kwargs = {}
  return c


def embedded_target(smoke: bool = False):
  """The embedded ``digits`` config of recipes that train many small runs:
  test-split classification only, no OOD sets; ``smoke``: an 8/16-wide CNN
  and no plots (tests)."""
  c = get_config("embedded")
  c.evaluators.ood.sets = {}
  c.evaluators.classification.splits = ("test",)
  if smoke:
    c.model.kwargs.stage_widths = ((8,), (16,))
    c.plots = False
  return c


def pretrain_overrides(source: str, steps: int, **train_stream) -> dict:
  """A supervised pre-training stage's overrides on an embedded source:
  ``steps`` steps of batch 128 at the glyphs learning rate, validation accuracy
  only, a checkpoint half-way; ``train_stream`` adds keys to the train stream
  (an index list, a label source)."""
  return {"data": {"name": source}, "num_steps": int(steps),
          "streams": {"train": {"batch_size": 128, **train_stream}},
          "optimizer": {"learning_rate": GLYPHS_LR},
          "evaluators": {"ood": {"sets": {}}, "classification": {"splits": ("validation",)}},
          "checkpoint_every_steps": max(int(steps) // 2, 1)}


def embedded_source(smoke: bool = False) -> str:
  """The pre-training source of the embedded recipes: ``glyphs`` (``glyphs/small`` for tests)."""
  return "glyphs/small" if smoke else "glyphs"


# --- pre-training length ------------------------------------------------------------

# The stopping rule of pre-training "until plateau" on the embedded source
# (docs/reproduce.md, "Pre-training length"). FIXED BEFORE ANY CLAIM WAS
# EXAMINED at any pre-training length, and not to be tuned on the claims: the
# source's own validation split decides, as when the papers pre-train to
# convergence. Evaluated every source epoch on <source>:validation; training
# stops once validation accuracy has not improved by more than 0.1 point for 3
# epochs in a row, at most PRETRAIN_MAX_EPOCHS epochs (the cosine schedule
# spans that maximum); the best epoch's checkpoint is what the stage hands on.
PRETRAIN_STOPPING = {"metric": "validation/accuracy", "mode": "max", "patience": 3,
                     "min_delta": 0.001, "restore_best": True}
PRETRAIN_MAX_EPOCHS = 32
PLATEAU = "plateau"
PRETRAIN_BATCH = 128
# Training-split sizes of the embedded sources (jaxrobust/data/builders/glyphs.py):
# one source epoch in steps, whatever subset of it a stage reads.
SOURCE_TRAIN_SIZES = {"glyphs": 24_800, "glyphs/full": 24_800, "glyphs/small": 1_860}


def parse_pretrain(value) -> float | str:
  """A pre-training length: a positive number of source epochs (``2``,
  ``'8'``, ``'0.5'``) or ``'plateau'`` (:data:`PRETRAIN_STOPPING`)."""
  if isinstance(value, str) and value.strip().lower() == PLATEAU:
    return PLATEAU
  try:
    epochs = float(value)
  except (TypeError, ValueError):
    epochs = -1.0
  if not epochs > 0 or not math.isfinite(epochs):
    raise ValueError(f"pretrain: a pre-training length is a positive number of source epochs "
                     f"or {PLATEAU!r}, got {value!r}.")
  return epochs


def pretrain_label(value) -> str:
  """``'2'``, ``'0.5'``, ``'plateau'``: how a length names its directory (``pretrain_<label>``)."""
  length = parse_pretrain(value)
  return length if isinstance(length, str) else f"{length:g}"


def source_steps_per_epoch(source: str, batch_size: int = PRETRAIN_BATCH) -> int:
  if source not in SOURCE_TRAIN_SIZES:
    raise ValueError(f"pretrain: no training-split size known for the source {source!r} "
                     f"(configs/default.py SOURCE_TRAIN_SIZES: {sorted(SOURCE_TRAIN_SIZES)}).")
  return math.ceil(SOURCE_TRAIN_SIZES[source] / batch_size)


def with_pretrain_length(overrides, length, *, source: str,
                         batch_size: int = PRETRAIN_BATCH) -> dict:
  """A pre-training stage's ``overrides`` (a dict) with its length set -- the
  one place every paper recipe sets it:

  * ``N`` epochs: ``N`` epochs of the source in steps (``N * ceil(size /
    batch)``, also for a stage that reads a subset of it, so arms that
    pre-train on subsets keep equal steps);
  * ``'plateau'``: :data:`PRETRAIN_STOPPING` on ``<source>:validation``,
    evaluated every source epoch, at most :data:`PRETRAIN_MAX_EPOCHS`
    epochs, the best epoch's checkpoint handed on.
  """
  length = parse_pretrain(length)
  spe = source_steps_per_epoch(source, batch_size)
  out = merge(dict(overrides), {})
  out.pop("num_epochs", None)
  if length == PLATEAU:
    out["num_steps"] = PRETRAIN_MAX_EPOCHS * spe
    out["early_stopping"] = dict(PRETRAIN_STOPPING)
    out["checkpoint_every_steps"] = spe
    out = merge(out, {"evaluators": {"classification": {
        "splits": ("validation",), "every_steps": spe}}})
  else:
    out["num_steps"] = max(1, round(length * spe))
    out["checkpoint_every_steps"] = max(out["num_steps"] // 2, 1)
  return out


def _from_stage(config, patterns) -> str | None:
  """The stage (one matching the fnmatch ``patterns``) whose checkpoint a stage
  config initialises from, or None."""
  import fnmatch
  path = (config.get("init_from") or {}).get("path", "") if hasattr(config, "get") else ""
  if not (isinstance(path, str) and path.startswith("artifact:") and path.endswith("/checkpoint")):
    return None
  stage = path[len("artifact:"):].split("/", 1)[0]
  return stage if any(fnmatch.fnmatchcase(stage, p) for p in patterns) else None


def with_finetune_lr(stages: dict, learning_rate: float, pretrain_stages,
                     arms=("*",)) -> dict:
  """A recipe's ``stages`` (a dict) with every stage named by ``arms``
  (fnmatch patterns) that fine-tunes from one of ``pretrain_stages`` (fnmatch
  patterns; its ``init_from.path`` is their ``artifact:<stage>/checkpoint``) at
  ``learning_rate``; the rest unchanged. The fine-tuning rate chosen on the
  target's validation split for a pre-training length
  (``launch.pretrain_study``); ``arms`` keeps it to the stages trained like
  the arm it was chosen on."""
  import fnmatch
  if not learning_rate > 0:
    raise ValueError(f"finetune_lr must be positive, got {learning_rate!r}.")
  out = {}
  for name, stage in stages.items():
    stage = merge(dict(stage), {})
    if (any(fnmatch.fnmatchcase(name, p) for p in arms)
        and _from_stage(stage.get("config") or {}, pretrain_stages) is not None):
      stage["config"] = merge(stage["config"], {"optimizer": {"learning_rate": float(learning_rate)}})
    out[name] = stage
  return out
