"""A-SKD (Shin et al., ECCV 2022, "Teaching Where to Look"): a CBAM teacher at
full resolution, then per down-sampling factor a low-resolution student alone
and distilled four ways.

  --config configs/recipes/attention_distill.py                         # glyphs, compare, x2/x4/x8
  --config configs/recipes/attention_distill.py:mode=askd,factors=4     # teacher + askd_4 only
  --config configs/recipes/attention_distill.py:variant=digits          # digits (8x8 originals)
  --config configs/recipes/attention_distill.py:variant=face,data=casia_webface,verify=agedb_30:test

Stages: ``teacher`` (the CBAM model on full-resolution images), then per factor
``f`` of ``factors`` (default 2+4+8) the students, every one the teacher's
architecture from scratch on ``downsample(f)`` images (nearest down and up,
the reference's 5x5 blur; :mod:`jaxrobust.methods.attention_distill`):

* ``student_f`` -- the task loss alone;
* ``kd_f`` -- + logit KD (``logit_kd``, τ = 4);
* ``fd_f`` -- + feature distillation (``feature_distill``, MSE of the
  penultimate features);
* ``at_f`` -- + attention transfer (``attention_transfer``, β = 1000);
* ``askd_f`` -- + A-SKD, λ = 5 (``attention_similarity``: the CBAM channel
  and spatial maps of every block; ``train_student.py --distill_attn_param``).

The distilling students hold the frozen teacher as a second module
(``config.modules.teacher``, ``init_from='artifact:teacher/checkpoint'``, in no
update), which sees the stream's image before the pp chain (full resolution).
Every stage is evaluated by classification accuracy on its own resolution
(``evaluators.classification.pp='downsample(f)'``) and by verification
(:mod:`jaxrobust.evaluators.verification`: 10-fold accuracy, TAR at FAR 1e-3)
on pairs of identities held out of training, at the same resolution.
``mode=askd``: the teacher and the ``askd_f`` students only.

Variants:

* ``embedded`` -- identities: ``glyphs/upper`` (the 26 upper-case letters;
  the index specs select examples, not classes, and a class subset of
  ``glyphs`` would keep a 62-way head, so the upper-case dataset is the
  training identities); verification on ``glyphs/lower:test`` (26 identities
  not seen in training, 2,600 images; 3,000 pairs). WRN-16-2 with CBAM
  (reduction 16, hidden width ``max(C/16, 1)``), 32x32x1, SGD Nesterov lr 0.1
  cosine, wd 5e-4, batch 128, cross-entropy (``loss=arcface``: ArcFace s = 32,
  m = 0.5 as the reference, beside the CE head), no augmentation (the student
  chain must be ``downsample(f)`` alone, and the teacher is trained the same
  way). 32 -> 16, 8, 4 pixels.
* ``digits`` -- ``digits`` (8x8 originals up-sampled to 32x32: a natural
  low-resolution case); verification on ``digits:test`` pairs (closed-set: the
  same 10 classes as training -- there are no held-out digit identities).
* ``face`` (not run here) -- a face-identity dataset of the user's
  (``data=``: a tfds name in ``TFDS_DATA_DIR`` with ``image`` and a
  ``ClassLabel`` identity, e.g. a CASIA-WebFace build) read at 112x112 RGB,
  verification on ``verify=dataset:split`` (held-out identities, e.g. an
  AgeDB-30 / LFW build as identity-labelled images), ArcFace s = 32, m = 0.5
  on WRN-28-4 with CBAM. Departures from the reference there: WRN instead of
  iResNet-50-CBAM, pairs drawn from the split instead of the benchmark's fixed
  lists, no flip test.

Arguments: ``variant``, ``mode`` (compare | askd), ``factors`` ('2+4+8'),
``epochs`` (per stage; ``steps`` > 0 instead), ``depth``/``width`` (of the
WRN), ``cbam_momentum`` (the decay of CBAM's spatial BatchNorm statistics;
default the reference's 0.99, which needs ~500 steps to settle: short runs
take 0.9, the decay of the network's other BatchNorms), ``batch_size`` (128), ``arms`` (a subset of student+kd+fd+at+askd, mode=compare), ``loss`` (ce | arcface), ``lam`` (A-SKD's λ, 5),
``data``/``verify`` (face), ``smoke`` (tiny model, a few steps: tests).
"""

import dataclasses

from configs import default
from jaxrobust.config import base_config, merge, parse_arg
from jaxrobust.methods import attention_distill

VARIANTS = ("embedded", "digits", "face")
MODES = ("compare", "askd")
# The matrix test's stand-in for a face dataset: any tfds dataset with images and a ClassLabel.
REQUIRED_ARGS = {"face": "data=cifar10,verify=cifar10:test"}
ARMS = ("student", "kd", "fd", "at", "askd")
LAMBDA = attention_distill.LAMBDA  # train_student.py --distill_attn_param
KD_TEMPERATURE = 4.0
AT_BETA = 1000.0
ARCFACE = {"s": 32.0, "m": 0.5}  # teaching-where-to-look: ArcFace s = 32, m = 0.5


@dataclasses.dataclass(frozen=True)
class Setting:
  data: str  # training identities
  verify: str  # held-out identities, 'dataset:split'
  num_classes: int
  channels: int
  image_size: int  # 0: as stored
  model: dict  # wrn kwargs (cbam added)
  epochs: float
  loss: str


SETTINGS = {
    "embedded": Setting("glyphs/upper", "glyphs/lower:test", 26, 1, 0,
                        {"depth": 16, "width": 2, "dropout_rate": 0.0}, 15.0, "ce"),
    "digits": Setting("digits", "digits:test", 10, 1, 0,
                      {"depth": 16, "width": 2, "dropout_rate": 0.0}, 30.0, "ce"),
    "face": Setting("", "", 0, 3, 112, {"depth": 28, "width": 4, "dropout_rate": 0.0}, 20.0,
                    "arcface"),
}


def parse_factors(value) -> tuple[int, ...]:
  """``'2+4+8'`` (or an int) -> (2, 4, 8); each a positive integer."""
  parts = str(value).split("+")
  try:
    out = tuple(int(p) for p in parts)
  except ValueError:
    raise ValueError(f"factors must be integers joined by '+', e.g. 2+4+8; got {value!r}.") from None
  if not out or any(f < 2 for f in out) or len(set(out)) != len(out):
    raise ValueError(f"factors must be distinct integers >= 2, got {value!r}.")
  return out


def distill_terms(arm: str, lam: float = LAMBDA) -> dict:
  """The loss term an arm adds to the task loss (``student``: none)."""
  return {
      "student": {},
      "kd": {"logit_kd": {"temperature": KD_TEMPERATURE, "weight": 1.0}},
      "fd": {"feature_distill": {"weight": 1.0}},
      "at": {"attention_transfer": {"beta": AT_BETA, "weight": 1.0}},
      "askd": {"attention_similarity": {"weight": float(lam)}},
  }[arm]


def evaluators(verify: str, factor: int, num_pairs: int) -> dict:
  pp = f"downsample({factor})" if factor > 1 else ""
  return {"classification": {"splits": ("test",), "pp": pp, "save": True},
          "verification": {"type": "verification", "data": verify, "num_pairs": num_pairs,
                           "pp": pp},
          "ood": {"sets": {}}}


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", mode="compare", factors="2+4+8", epochs=-1.0,
                   steps=-1, depth=-1, width=-1, batch_size=128, arms="", loss="", lam=LAMBDA, data="",
                   cbam_momentum=-1.0,
                   verify="", num_pairs=3000, smoke=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  if args.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {args.mode!r}.")
  st = SETTINGS[args.variant]
  factors = parse_factors(args.factors)
  arms = tuple(args.arms.split("+")) if args.arms else (
      ARMS if args.mode == "compare" else ("askd",))
  if any(a not in ARMS for a in arms) or (args.arms and args.mode != "compare"):
    raise ValueError(f"arms must be arms of {ARMS} joined by '+' (mode=compare), got "
                     f"{args.arms!r}.")
  loss = args.loss or st.loss
  if loss not in ("ce", "arcface"):
    raise ValueError(f"loss must be 'ce' or 'arcface', got {args.loss!r}.")
  data, verify = args.data or st.data, args.verify or st.verify
  if args.variant == "face" and not (args.data and args.verify):
    raise ValueError("variant=face needs data=<tfds name of a face-identity dataset with a "
                     "ClassLabel, prepared in TFDS_DATA_DIR> and verify=<dataset:split of "
                     "held-out identities>.")
  if args.variant != "face" and (args.data or args.verify):
    raise ValueError("data= and verify= are for variant=face; the embedded variants fix them.")

  c = base_config()
  default.set_data(c, data, st.channels, pp="")
  c.data.image_size = st.image_size
  c.model.name = "wrn"
  c.model.kwargs = {**st.model, "cbam": True}
  if args.depth > 0:
    c.model.kwargs.depth = int(args.depth)
  if args.width > 0:
    c.model.kwargs.width = int(args.width)
  if args.cbam_momentum >= 0:
    if not 0.0 <= args.cbam_momentum < 1.0:
      raise ValueError(f"cbam_momentum must be in [0, 1) (the decay of CBAM's spatial BatchNorm "
                       f"statistics), got {args.cbam_momentum}.")
    c.model.kwargs.cbam_momentum = float(args.cbam_momentum)
  c.streams.train.batch_size = int(args.batch_size)
  c.num_epochs = float(args.epochs if args.epochs > 0 else st.epochs)
  c.num_steps = int(args.steps)
  c.optimizer.learning_rate = 0.1
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  if loss == "arcface":
    from jaxrobust.data import sources
    k = st.num_classes or None
    if k is None:
      try:
        k = sources.get_spec(data).num_classes
      except Exception as e:  # noqa: BLE001 - the dataset is not prepared: say which
        raise ValueError(f"loss=arcface needs the number of identities of {data!r}: {e}") from None
    c.model.heads = {"arcface": f"arcface(features={int(k)})"}
    c.losses.arcface = dict(ARCFACE)
  num_pairs = int(args.num_pairs)
  if args.smoke:
    c.model.kwargs = {"depth": 10, "width": 1, "dropout_rate": 0.0, "cbam": True}
    c.num_steps = 3
    c.streams.train.batch_size = 16
    c.eval_batch_size = 256
    c.plots = False
    c.progress_bar = False
    num_pairs = min(num_pairs, 200)
  c = merge(c, {"evaluators": evaluators(verify, 1, num_pairs)}, "config")
  model = {"name": c.model.name, "kwargs": dict(c.model.kwargs),
           "heads": dict(c.model.heads)}
  teacher_modules = attention_distill.student_modules("artifact:teacher/checkpoint", model)

  stages = {"teacher": {"task": "train", "config": {}}}
  for f in factors:
    for arm in arms:
      terms = distill_terms(arm, args.lam)
      cfg = {"streams": {"train": {"pp": f"downsample({f})"}},
             "evaluators": evaluators(verify, f, num_pairs)}
      if terms:
        cfg["losses"] = {**c.losses.to_dict(), **terms}
        cfg["modules"] = teacher_modules
      stages[f"{arm}_{f}"] = {"task": "train", "config": cfg}
  c.stages = stages
  return c
