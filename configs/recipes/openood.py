"""The OpenOOD v1.5 evaluation protocol: near- and far-OOD groups, OOD as the
positive class, post-hoc scores tuned on validation sets by AUROC.

  --config configs/recipes/openood.py            # = :embedded (digits)
  --config configs/recipes/openood.py:cifar10    # CIFAR-10, OpenOOD's set lists through tfds
  --config configs/recipes/openood.py:cifar100,tin=DATASET:SPLIT,tin_val=DATASET:SPLIT

Stages:

* ``baseline`` -- the in-distribution classifier trained from scratch
  (``configs/default.py``: the embedded small CNN, or the HPT/OE WRN-40-2 for
  CIFAR); OpenOOD evaluates its own released checkpoints (3 per benchmark) --
  train several seeds for its mean ± std.
* ``tune_<score>`` for every score of :data:`TUNED` -- OpenOOD's
  ``Evaluator.hyperparam_search``: every point of the score's grid
  (:data:`jaxrobust.methods.tuning.GRIDS`, OpenOOD's sweeps) scored on the
  ID validation split against the validation OOD set, the point with the
  highest AUROC kept (averaged over the sets when there are several, as the
  embedded variant's; first in grid order on ties; OpenOOD keeps the first
  strict maximum of its own order).
* ``evaluate`` -- the ``ood`` evaluator with ``preset='openood'`` on the test
  sets: the scores of :data:`UNTUNED` at their defaults and the tuned ones,
  every OOD example once, result keys ``ood/<score>/<set>/<metric>`` with
  metrics ``fpr95_ood_positive`` (FPR at 95% TPR, **OOD positive**: the
  fraction of ID test images flagged at the first threshold flagging ≥ 95% of
  the OOD images), ``auroc``, ``aupr_in`` (ID positive), ``aupr_out`` (OOD
  positive; both trapezoid over the PR curve); the group averages
  ``ood/<score>/near/<metric>`` and ``ood/<score>/far/<metric>`` (the mean of
  the per-set metrics, as OpenOOD's ``nearood`` / ``farood`` rows), the mean
  over every set ``ood/<score>/mean/<metric>``, and ``ood/id_accuracy``.
  Values are fractions (OpenOOD prints percentages).

Sets (OpenOOD ``evaluation_api/datasets.py``; the tfds names, read from
``config.data.data_dir``, prepared beforehand, e.g. ``python -m
jaxrobust.data.prepare mnist``; every image resized (shorter side) and
centre-cropped to 32 × 32 and gray ones repeated into RGB, as OpenOOD's
``Resize(32), CenterCrop(32)`` and ``convert('RGB')``):

* near: the other CIFAR (``cifar100:test`` for ``:cifar10``, ``cifar10:test``
  for ``:cifar100``) and TinyImageNet (``tin=DATASET:SPLIT``), which tfds
  does not have: a dataset the user prepared in the data directory (e.g. a
  tfds ``ImageFolder``/custom builder of TinyImageNet's validation images);
  without ``tin`` the near group is the other CIFAR alone (a message says so);
* far: MNIST (``mnist:train+test``, 70,000), SVHN (``svhn_cropped:test``,
  26,032), Textures (``dtd:train+validation+test``, 5,640), Places365
  (``places365_small:validation``, 36,500).

Departures: OpenOOD's image lists drop the TinyImageNet and Places365 images
whose content overlaps the ID classes (7,793 / 35,195 images for CIFAR-10);
tfds has no such lists, so the whole splits are used. OpenOOD's ID validation
images and its validation OOD set (held-out TinyImageNet images, ``val_tin``)
come from its own image lists: here the baseline trains on ``train[:49000]``
and the ID validation split is ``train[49000:]`` (1,000 held-out images; with
a checkpoint trained on all of ``train`` these were seen in training), and
the validation OOD set is ``tin_val=DATASET:SPLIT`` (TinyImageNet images
disjoint from ``tin``) -- without it, the OE code's ``--validate`` sets made
from the ID validation split (:mod:`jaxrobust.data.validation_ood`; a
departure named in the stage's ``best`` artifact).

Embedded variant: in-distribution ``digits``; near = the lower-case letters
``glyphs/lower:test``; far = the Gaussian, Rademacher, blobs and photo-patch
sets (OpenOOD's two groups; the reproduction reports keep their own three,
``launch.papers.OOD_GROUPS``); validation: ``digits:validation`` against
``validation_ood/<kind>/digits:validation``.

Arguments after ``:``: ``variant`` (embedded, cifar10, cifar100), ``tin``
and ``tin_val`` (CIFAR; ``dataset:split``), ``epochs`` (the baseline's).
"""

import sys

from configs import default
from jaxrobust.config import parse_arg
from jaxrobust.methods.tuning import validation_sets

VARIANTS = ("embedded", "cifar10", "cifar100")
#: Scores tuned on validation (each by a ``tune_<score>`` stage; OpenOOD's
#: postprocessors with a sweep: ODIN, EBO, ReAct, ASH, KNN, GEN).
TUNED = ("odin", "energy", "react", "ash_b", "knn", "gen")
#: Scores without options to tune (OpenOOD's MSP, MLS, MDS, ViM at its default dim).
UNTUNED = ("msp", "max_logit", "mahalanobis", "vim")
#: OpenOOD v1.5's far-OOD sets of the CIFAR benchmarks, as tfds ``dataset:split``.
FAR_CIFAR = {"mnist": "mnist:train+test", "svhn": "svhn_cropped:test",
             "texture": "dtd:train+validation+test",
             "places365": "places365_small:validation"}
#: The other CIFAR: the near-OOD set besides TinyImageNet.
NEAR_CIFAR = {"cifar10": ("cifar100", "cifar100:test"), "cifar100": ("cifar10", "cifar10:test")}
EMBEDDED_NEAR = {"letters": "glyphs/lower:test"}
CIFAR_TRAIN, CIFAR_VALIDATION = "train[:49000]", "train[49000:]"


def _set(arg: str, value: str) -> str:
  name, sep, split = value.rpartition(":")
  if not sep or not name or not split:
    raise ValueError(f"{arg}={value!r}: give dataset:split, e.g. {arg}=tiny_imagenet:validation")
  return value


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", tin="", tin_val="", epochs=-1.0)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  c = default.get_config(args.variant)
  if args.epochs > 0:
    c.num_epochs = float(args.epochs)
  if args.variant == "embedded":
    if args.tin or args.tin_val:
      raise ValueError("tin / tin_val are for the CIFAR variants (TinyImageNet images).")
    far = dict(c.evaluators.ood.sets)
    near = dict(EMBEDDED_NEAR)
    id_val = "validation"
    val_ood = validation_sets(c.data.name, id_val)
  else:
    c.data.image_size = 32  # Textures, Places365 (and TinyImageNet) vary in size
    c.streams.train.split = CIFAR_TRAIN
    id_val = CIFAR_VALIDATION
    key, other = NEAR_CIFAR[args.variant]
    near = {key: other}
    if args.tin:
      near["tin"] = _set("tin", args.tin)
    else:
      print(f"configs/recipes/openood.py:{args.variant}: no tin=DATASET:SPLIT given; the "
            f"near-OOD group is {other} alone (TinyImageNet is not in tfds).", file=sys.stderr)
    far = dict(FAR_CIFAR)
    val_ood = ({"tin": _set("tin_val", args.tin_val)} if args.tin_val
               else validation_sets(c.data.name, id_val))
  ood = c.evaluators.ood
  ood.preset = "openood"
  ood.sets = {**near, **far}
  ood.groups = {"near": tuple(near), "far": tuple(far)}
  ood.gray_to_rgb = args.variant != "embedded"
  ood.scores = ("msp",)
  scores = {s: s for s in UNTUNED}
  scores.update({s: f"artifact:tune_{s}/best:spec" for s in TUNED})
  c.stages = {
      # The baseline reports test accuracy; the OOD sets are scored once, by `evaluate`.
      "baseline": {"task": "train", "config": {
          "evaluators": {"ood": {"sets": {}, "groups": {}}}}},
      **{f"tune_{s}": {"task": "tune_score", "checkpoint": "artifact:baseline/checkpoint",
                       "score": s, "ood": dict(val_ood), "split": id_val,
                       "preset": "openood", "metric": "auroc"} for s in TUNED},
      "evaluate": {"task": "evaluate", "checkpoint": "artifact:baseline/checkpoint",
                   "config": {"evaluators": {"ood": {"scores": scores}}}},
  }
  return c
