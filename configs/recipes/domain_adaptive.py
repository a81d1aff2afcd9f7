"""Domain-adaptive transfer (Ngiam et al. 2018) as one recipe.

  --config configs/recipes/domain_adaptive.py                   # glyphs -> digits: adaptive (same) vs uniform, 2,000 images
  --config configs/recipes/domain_adaptive.py:targets=letters   # glyphs -> lower-case letters
  --config configs/recipes/domain_adaptive.py:mode=compare      # + all-source, scratch and weighted-loss arms
  --config configs/recipes/domain_adaptive.py:samplers=same+elastic+uniform,sizes=2000+8000,targets=digits+letters

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
(greedy, the default, or proportional), ``smoke`` (tiny model and data, for tests).
"""

from configs import default
from jaxrobust.config import parse_arg
from jaxrobust.methods import domain_adaptive, transfer

TARGETS = {"digits": "digits", "letters": "glyphs/lower"}
MODES = ("adaptive", "compare")
SOURCE = default.embedded_source()
FINETUNE_LR = 0.1  # pretrain_finetune.EMBEDDED_FINETUNE_LR (digits:validation)
SCRATCH_LR = 0.3  # configs/default.py (digits:validation)
NO_OOD = {"ood": {"sets": {}}, "classification": {"splits": ("test",)}}


def _list(value, cast):
  return [cast(v) for v in str(value).split("+") if v]


def pretrain(steps: int, *, index: str = "", labels: str = "dataset", source: str = SOURCE,
             ) -> dict:
  """A pre-training stage's overrides: the source data (optionally an index
  list or a label source), ``steps`` steps, no target evaluation."""
  return default.pretrain_overrides(source, steps, index=index, labels=labels)


def finetune(source: str, steps: int, labeled: str) -> dict:
  """A fine-tuning stage's overrides: a new head on the labelled target subset."""
  out = transfer.fine_tune({"streams": {"train": {"index": labeled}}, "evaluators": NO_OOD},
                           source=source, learning_rate=FINETUNE_LR, batch_size=64,
                           num_steps=steps)
  out["checkpoint_every_steps"] = max(int(steps) // 2, 1)
  return out


def target_stages(target: str, *, samplers, sizes, mode: str, pretrain_steps: int,
                  finetune_steps: int, labeled_per_class: int, temperature: float,
                  elastic_mode: str, source: str) -> dict:
  """The stages of one target (names end in ``_<target>`` or contain it), after
  the shared ``source`` stage."""
  data = TARGETS[target]
  labeled = f"per_class(num_per_class={int(labeled_per_class)})"  # seeded by config.seed

  def ft(init: str) -> dict:
    return {"task": "train", "config": {**finetune(init, finetune_steps, labeled),
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
          pretrain_steps, index=f"artifact:sample_{arm}/indices", source=source)}
      stages[f"ft_{arm}"] = ft(f"artifact:pre_{arm}/checkpoint")
  if mode == "compare":
    stages[f"ft_{target}_all"] = ft("artifact:source/checkpoint")
    stages[f"scratch_{target}"] = {"task": "train", "config": {
        "data": {"name": data}, "streams": {"train": {"index": labeled}},
        "num_steps": int(finetune_steps), "optimizer": {"learning_rate": SCRATCH_LR},
        "evaluators": NO_OOD}}
    stages[f"pre_{target}_weighted"] = {"task": "train", "config": pretrain(
        pretrain_steps, source=source,
        labels=f"importance_weighted(weights='artifact:prior_{target}/prior:weights')")}
    stages[f"ft_{target}_weighted"] = ft(f"artifact:pre_{target}_weighted/checkpoint")
  return stages


def get_config(arg=None):
  args = parse_arg(arg, targets="digits", mode="adaptive", samplers="same+uniform",
                   sizes="2000", pretrain_steps=400, finetune_steps=150, labeled_per_class=20,
                   temperature=domain_adaptive.TEMPERATURE, elastic_mode="greedy",
                   smoke=False)
  targets = _list(args.targets, str)
  bad = [t for t in targets if t not in TARGETS]
  if bad or not targets:
    raise ValueError(f"targets: each must be one of {sorted(TARGETS)}, got {args.targets!r}.")
  if args.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {args.mode!r}.")
  samplers = _list(args.samplers, str)
  bad = [s for s in samplers if s not in domain_adaptive.SAMPLERS]
  if bad or not samplers:
    raise ValueError(f"samplers: each must be one of {domain_adaptive.SAMPLERS}, got "
                     f"{args.samplers!r}.")
  sizes = _list(args.sizes, int)
  if not sizes or min(sizes) < 1:
    raise ValueError(f"sizes must be positive integers joined by '+', got {args.sizes!r}.")
  c = default.embedded_target(args.smoke)
  c.data.name = TARGETS[targets[0]]
  source = default.embedded_source(args.smoke)
  stages = {"source": {"task": "train", "config": pretrain(args.pretrain_steps, source=source)}}
  for target in targets:
    stages.update(target_stages(
        target, samplers=samplers, sizes=sizes, mode=args.mode,
        pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
        labeled_per_class=args.labeled_per_class, temperature=args.temperature,
        elastic_mode=args.elastic_mode, source=source))
  c.stages = stages
  return c
