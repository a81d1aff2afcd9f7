"""Domain-adaptive transfer (Ngiam et al. 2018) as one recipe.

  --config configs/recipes/domain_adaptive.py                   # glyphs -> digits: adaptive (same) vs uniform, 2,000 images
  --config configs/recipes/domain_adaptive.py:targets=letters   # glyphs -> lower-case letters
  --config configs/recipes/domain_adaptive.py:mode=compare      # + all-source, scratch and weighted-loss arms
  --config configs/recipes/domain_adaptive.py:samplers=same+elastic+uniform,sizes=2000+8000,targets=digits+letters
  --config configs/recipes/domain_adaptive.py:variant=imagenet,targets=pets+cars+food+cifar10+birds,mode=compare

Stages (jaxrobust.stages), run in <workdir>/<stage>:

* ``source`` -- the source model: the small CNN trained on all of ``glyphs``
  (62 classes: 0-9, A-Z, a-z) for ``pretrain_steps`` steps (batch 128, lr
  0.4 cosine, :data:`configs.default.GLYPHS_LR`).
* ``prior_<target>`` -- ``target_prior``: the source model's softmax at T = 2 averaged
  over the target's training images (their labels unused), ``P_s`` from the
  glyph counts, ``w = P_t / P_s``; bar plot of the weights.
* ``sample_<target>_<sampler>_<size>`` -- ``importance_sample``: ``same``
  (same-distribution matching, with replacement), ``elastic`` (without
  replacement) or ``uniform`` (the baseline: a uniform random subset of the
  same size).
* ``pre_<target>_<sampler>_<size>`` -- pre-training from scratch on that index list,
  the same number of steps for every arm (equal pre-training size and steps).
* ``ft_<target>_<sampler>_<size>`` -- fine-tuning on the labelled target: a new head,
  all layers, ``labeled_per_class`` labelled images per class
  (``per_class`` index, seeded), ``finetune_steps`` steps, batch 64, lr 0.1
  (the embedded fine-tuning lr picked on ``digits:validation`` for
  ``pretrain_finetune.py``; not re-tuned here), Hendrycks et al.'s optimiser
  otherwise; evaluated on the target's test split.
* ``mode=compare`` adds ``ft_<target>_all`` (fine-tuned from ``source``:
  pre-training on *all* source images, same steps), ``scratch_<target>`` (the
  labelled target alone, lr 0.3, the same steps) and ``ft_<target>_weighted``
  after ``pre_<target>_weighted`` (all source images, the loss weighted by
  ``w(y)``: importance weighting without resampling).

Targets: ``digits`` (scikit-learn's handwritten digits: another domain than
the rendered glyph digits) and ``letters`` (``glyphs/lower``: 26 lower-case
letters, drawn with their own seed, so the prior concentrates on the source's
a-z classes).

Arguments after ``:`` (lists joined by ``+``): ``targets``, ``mode`` (adaptive:
one sampler, compare), ``samplers``, ``sizes``, ``pretrain_steps``,
``finetune_steps``, ``labeled_per_class``, ``temperature``, ``elastic_mode``
(greedy, the default, or proportional), ``source`` (another source dataset),
``smoke`` (tiny model and data, for tests), ``variant`` (``embedded``,
``imagenet``).

``variant=imagenet`` is the paper's setting at the scale tfds offers (not run
here: the data must be prepared on a machine with internet, see
``docs/datasets.md``): source ``imagenet_resized/64x64`` (1000 classes; or a
user's larger source with ``source=NAME``), ResNet-50 (the paper used
Inception-v3), every image read at 64x64 (``config.data.image_size``),
targets among the paper's that tfds has -- ``pets`` (``oxford_iiit_pet``),
``cars`` (``cars196``), ``food`` (``food101``), ``cifar10``, and ``birds``
(``caltech_birds2011``, standing in for Birdsnap) --, fine-tuning on the
whole labelled target training set (``labeled_per_class=0``). Its defaults:
source model and pre-training 100,000 steps at batch 256, lr 0.1, SGD
Nesterov, cosine; fine-tuning 20,000 steps at batch 64, lr 0.01.
"""

from configs import default
from jaxrobust.config import parse_arg
from jaxrobust.methods import domain_adaptive, transfer

VARIANTS = ("embedded", "imagenet")
TARGETS = {"digits": "digits", "letters": "glyphs/lower"}
IMAGENET_TARGETS = {"pets": "oxford_iiit_pet", "cars": "cars196", "food": "food101",
                    "cifar10": "cifar10", "birds": "caltech_birds2011"}
# The split each target is evaluated on (food101 has no test split).
EVAL_SPLIT = {"food101": "validation"}
MODES = ("adaptive", "compare")
SOURCE = default.embedded_source()
IMAGENET_SOURCE = "imagenet_resized/64x64"
FINETUNE_LR = 0.1  # pretrain_finetune.EMBEDDED_FINETUNE_LR (digits:validation)
SCRATCH_LR = 0.3  # configs/default.py (digits:validation)
NO_OOD = {"ood": {"sets": {}}, "classification": {"splits": ("test",)}}
# ImageNet's channel statistics of [0, 1] pixels (torchvision's).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_config():
  """The target config of ``variant=imagenet``: ResNet-50 at 64x64, ImageNet
  normalisation, flip + 8-pixel pad-crop, SGD Nesterov 0.1 cosine."""
  c = default.get_config("cifar10")  # SGD Nesterov, wd 5e-4, cosine (Hendrycks et al.'s)
  c.data.image_size = 64
  c.data.mean, c.data.std = IMAGENET_MEAN, IMAGENET_STD
  c.streams.train.pp = "pad_crop(8)|flip"
  c.model.name = "resnet50"
  c.model.kwargs = {}
  c.optimizer.schedule_offset = 0
  c.evaluators.ood.sets = {}
  return c


def imagenet_pretrain(source: str, steps: int, **train_stream) -> dict:
  """A pre-training stage of ``variant=imagenet``: the source, batch 256, lr
  0.1, validation accuracy, a checkpoint every 10,000 steps."""
  return {"data": {"name": source}, "num_steps": int(steps),
          "streams": {"train": {"batch_size": 256, **train_stream}},
          "optimizer": {"learning_rate": 0.1},
          "evaluators": {"ood": {"sets": {}}, "classification": {"splits": ("validation",)}},
          "checkpoint_every_steps": min(10_000, max(int(steps) // 2, 1))}


def _list(value, cast):
  return [cast(v) for v in str(value).split("+") if v]


def pretrain(steps: int, *, index: str = "", labels: str = "dataset", source: str = SOURCE,
             imagenet: bool = False) -> dict:
  """A pre-training stage's overrides: the source data (optionally an index
  list or a label source), ``steps`` steps, no target evaluation."""
  if imagenet:
    return imagenet_pretrain(source, steps, index=index, labels=labels)
  return default.pretrain_overrides(source, steps, index=index, labels=labels)


def finetune(source: str, steps: int, labeled: str, *, learning_rate: float = FINETUNE_LR,
             split: str = "test") -> dict:
  """A fine-tuning stage's overrides: a new head on the labelled target subset."""
  no_ood = {"ood": {"sets": {}}, "classification": {"splits": (split,)}}
  out = transfer.fine_tune({"streams": {"train": {"index": labeled}}, "evaluators": no_ood},
                           source=source, learning_rate=learning_rate, batch_size=64,
                           num_steps=steps)
  out["checkpoint_every_steps"] = min(10_000, max(int(steps) // 2, 1))
  return out


def target_stages(target: str, *, samplers, sizes, mode: str, pretrain_steps: int,
                  finetune_steps: int, labeled_per_class: int, temperature: float,
                  elastic_mode: str, source: str, imagenet: bool = False) -> dict:
  """The stages of one target (names end in ``_<target>`` or contain it), after
  the shared ``source`` stage."""
  data = (IMAGENET_TARGETS if imagenet else TARGETS)[target]
  split = EVAL_SPLIT.get(data, "test")
  # seeded by config.seed; 0: the whole labelled training set
  labeled = f"per_class(num_per_class={int(labeled_per_class)})" if labeled_per_class else ""
  ft_lr = 0.01 if imagenet else FINETUNE_LR

  def ft(init: str) -> dict:
    return {"task": "train", "config": {
        **finetune(init, finetune_steps, labeled, learning_rate=ft_lr, split=split),
        "data": {"name": data}}}

  stages = {f"prior_{target}": {
      "task": "target_prior", "checkpoint": "artifact:source/checkpoint", "data": data,
      "split": "train", "temperature": float(temperature), "source_data": source}}
  for size in sizes:
    for sampler in samplers:
      arm = f"{target}_{sampler}_{size}"
      stages[f"sample_{arm}"] = {
          "task": "importance_sample", "prior": f"artifact:prior_{target}/prior", "size": size,
          "sampler": sampler, "mode": elastic_mode, "source_data": source}
      stages[f"pre_{arm}"] = {"task": "train", "config": pretrain(
          pretrain_steps, index=f"artifact:sample_{arm}/indices", source=source,
          imagenet=imagenet)}
      stages[f"ft_{arm}"] = ft(f"artifact:pre_{arm}/checkpoint")
  if mode == "compare":
    stages[f"ft_{target}_all"] = ft("artifact:source/checkpoint")
    stages[f"scratch_{target}"] = {"task": "train", "config": {
        "data": {"name": data}, "streams": {"train": {"index": labeled}},
        "num_steps": int(finetune_steps),
        "optimizer": {"learning_rate": 0.1 if imagenet else SCRATCH_LR},
        "evaluators": {"ood": {"sets": {}}, "classification": {"splits": (split,)}}}}
    stages[f"pre_{target}_weighted"] = {"task": "train", "config": pretrain(
        pretrain_steps, source=source, imagenet=imagenet,
        labels=f"importance_weighted(weights='artifact:prior_{target}/prior:weights')")}
    stages[f"ft_{target}_weighted"] = ft(f"artifact:pre_{target}_weighted/checkpoint")
  return stages


# Per variant: default targets, sizes, pre-training and fine-tuning steps, labelled images per class.
DEFAULTS = {"embedded": ("digits", "2000", 400, 150, 20),
            "imagenet": ("pets", "200000", 100_000, 20_000, 0)}


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", targets="", mode="adaptive",
                   samplers="same+uniform", sizes="", pretrain_steps=-1, finetune_steps=-1,
                   labeled_per_class=-1, temperature=domain_adaptive.TEMPERATURE,
                   elastic_mode="greedy", source="", smoke=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  imagenet = args.variant == "imagenet"
  d_targets, d_sizes, d_pre, d_ft, d_labeled = DEFAULTS[args.variant]
  known = IMAGENET_TARGETS if imagenet else TARGETS
  targets = _list(args.targets or d_targets, str)
  bad = [t for t in targets if t not in known]
  if bad or not targets:
    raise ValueError(f"targets: each must be one of {sorted(known)} for variant "
                     f"{args.variant!r}, got {args.targets!r}.")
  if args.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {args.mode!r}.")
  samplers = _list(args.samplers, str)
  bad = [s for s in samplers if s not in domain_adaptive.SAMPLERS]
  if bad or not samplers:
    raise ValueError(f"samplers: each must be one of {domain_adaptive.SAMPLERS}, got "
                     f"{args.samplers!r}.")
  sizes = _list(args.sizes or d_sizes, int)
  if not sizes or min(sizes) < 1:
    raise ValueError(f"sizes must be positive integers joined by '+', got {args.sizes!r}.")
  pretrain_steps = int(args.pretrain_steps if args.pretrain_steps > 0 else d_pre)
  finetune_steps = int(args.finetune_steps if args.finetune_steps > 0 else d_ft)
  labeled_per_class = int(args.labeled_per_class if args.labeled_per_class >= 0 else d_labeled)
  if imagenet:
    c = imagenet_config()
    c.data.name = IMAGENET_TARGETS[targets[0]]
    source = args.source or IMAGENET_SOURCE
  else:
    c = default.embedded_target(args.smoke)
    c.data.name = TARGETS[targets[0]]
    source = args.source or default.embedded_source(args.smoke)
  stages = {"source": {"task": "train", "config": pretrain(pretrain_steps, source=source,
                                                           imagenet=imagenet)}}
  for target in targets:
    stages.update(target_stages(
        target, samplers=samplers, sizes=sizes, mode=args.mode,
        pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
        labeled_per_class=labeled_per_class, temperature=args.temperature,
        elastic_mode=args.elastic_mode, source=source, imagenet=imagenet))
  c.stages = stages
  return c
