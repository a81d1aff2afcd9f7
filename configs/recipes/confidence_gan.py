"""Lee et al. (ICLR 2018): cross-entropy vs the joint confidence loss with a GAN
(jaxrobust/methods/confidence_gan.py; docs/methods/confidence-gan.md).

  --config configs/recipes/confidence_gan.py                 # = :embedded,mode=compare
  --config configs/recipes/confidence_gan.py:mode=joint      # the joint confidence loss alone
  --config configs/recipes/confidence_gan.py:cifar10         # VGG-13 + DCGAN, beta 0.1, batch 64
  --config configs/recipes/confidence_gan.py:svhn            # VGG-13 + DCGAN, beta 1, batch 128

Stages (``mode=compare``; ``ce`` and ``joint`` are the parts it names):

* ``ce`` -- the classifier trained with cross-entropy alone
  (``src/run_cross_entropy.py``);
* ``confidence`` -- cross-entropy + beta * KL(U || p(y|x_out)) on a real
  outlier set (only with ``outliers=DATASET:SPLIT``, and on the embedded
  benchmark, where the upper-case letters ``glyphs/upper:train`` are used);
* ``joint`` -- the joint confidence loss: discriminator, generator and
  classifier updated in turn every step (``src/run_joint_confidence.py``);
* ``gan`` -- the ``joint`` run's generator judged (``gan_samples``): sample
  grid, the classifier's MSP on generated vs real test images, P-precision /
  P-recall and improved precision / recall against the test split on the
  ``ce`` model's features (a network trained apart from the GAN).

Every arm is evaluated with MSP and the ``lee`` metric preset (TNR at TPR
95%, AUROC, detection accuracy, AUPR-in/out, every OOD example) on OOD sets
none of the arms trained on.

Settings (the reference): Adam lr 2e-4 for the three networks (beta1 0.5 for
G and D, 0.9 for the classifier), no weight decay, lr x 0.1 at 60% of the
epochs (epoch 60 of 100), no augmentation, un-normalised [0, 1] inputs
(``data.mean = 0``, ``data.std = 1``: the reference feeds ``ToTensor()``
images to D and the classifier), DCGAN nz 100. CIFAR-10: beta 0.1, batch 64;
SVHN: beta 1, batch 128; VGG-13 (the reference's, no BatchNorm) and
ngf = ndf = 64. The ``cross_entropy`` arm uses the same classifier, optimizer
and schedule.

Embedded variant (sizes reduced so that it runs in minutes on 2 CPU cores):
``digits`` in-distribution, the embedded ``small_cnn`` classifier, a DCGAN
with ngf = ndf = 32 and one channel, beta 1 (SVHN's, as digits), batch 64,
15 epochs (295 steps), the classifier's Adam lr 3e-3 (picked on
``digits:validation``: the reference's 2e-4 underfits in 295 steps; G and D
keep 2e-4); test OOD sets: the noise sets, blobs, photo patches and the
lower-case letters. CIFAR-10 / SVHN: the other of the two (the reference's
pairing) and the embedded RGB noise sets.

Arguments after ``:``: ``variant``, ``mode``, ``beta`` (default: the
variant's), ``epochs``, ``outliers`` (``dataset:split`` for the
``confidence`` arm), ``samples`` (generated images judged by ``gan``).
"""

from configs import default
from jaxrobust.config import parse_arg

VARIANTS = ("embedded", "cifar10", "svhn")
MODES = ("compare", "ce", "joint")
BETA = {"embedded": 1.0, "cifar10": 0.1, "svhn": 1.0}
BATCH = {"embedded": 64, "cifar10": 64, "svhn": 128}
EPOCHS = {"embedded": 15.0, "cifar10": 100.0, "svhn": 100.0}
DATA = {"cifar10": "cifar10", "svhn": "svhn_cropped"}
NZ = 100
# The embedded classifier's Adam lr, picked on digits:validation (NLL after 15 epochs, seed 0) from
# {2e-4 (the reference's): 1.145, 1e-3: 0.155, 3e-3: 0.043}; 295 steps are too few for 2e-4.
EMBEDDED_LR = 3e-3


def _adam(b1: float, epochs: float) -> dict:
  return {"name": "adam", "learning_rate": 2e-4, "b1": b1, "b2": 0.999, "weight_decay": 0.0,
          "schedule": "step", "step_epochs": (0.6 * epochs,), "step_factor": 0.1,
          "schedule_offset": 0, "end_learning_rate": 0.0, "warmup_epochs": 0.0,
          "grad_clip_norm": 0.0}


def joint_overrides(*, beta: float, batch: int, channels: int, width: int, epochs: float,
                    samples_every: int = 1000) -> dict:
  """A ``train`` stage's overrides for the joint confidence loss: the
  generator and discriminator modules, the generated stream, the three
  updates in the reference's order, and a grid of the generator's samples
  (fixed noise) every ``samples_every`` steps."""
  gan_opt = _adam(0.5, epochs)
  return {
      "modules": {
          "generator": {"model": {"name": "dcgan_generator",
                                  "kwargs": {"nz": NZ, "ngf": width, "nc": channels}},
                        "input_shape": (NZ,), "optimizer": gan_opt},
          "discriminator": {"model": {"name": "dcgan_discriminator",
                                      "kwargs": {"ndf": width, "nc": channels}},
                            "optimizer": gan_opt}},
      "streams": {"fake": {"source": "module:generator", "noise": f"normal({NZ})",
                           "batch_size": batch}},
      "losses": {"cross_entropy": {}, "confidence": {"stream": "fake", "weight": beta},
                 "gan_discriminator": {}, "gan_generator": {},
                 "generated_confidence": {"weight": beta}},
      "updates": {
          "discriminator": {"module": "discriminator", "losses": ("gan_discriminator",),
                            "streams": ("train", "fake")},
          "generator": {"module": "generator", "losses": ("gan_generator", "generated_confidence"),
                        "streams": (), "after": "discriminator"},
          "classifier": {"module": "classifier", "losses": ("cross_entropy", "confidence"),
                         "streams": ("train", "fake"), "fresh_noise": ("fake",),
                         "after": "generator"}},
      "evaluators": {"generated": {"type": "generated_samples", "every_steps": samples_every}},
  }


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", mode="compare", beta=-1.0, epochs=-1.0, outliers="",
                   samples=1000)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  if args.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {args.mode!r}.")
  if args.beta < 0 and args.beta != -1.0:
    raise ValueError(f"beta={args.beta}: the weight of the confidence term must be >= 0.")
  embedded = args.variant == "embedded"
  beta = BETA[args.variant] if args.beta == -1.0 else args.beta
  epochs = args.epochs if args.epochs > 0 else EPOCHS[args.variant]
  batch = BATCH[args.variant]
  c = default.get_config("embedded" if embedded else "cifar10")
  channels = 1 if embedded else 3
  if embedded:
    c.evaluators.ood.sets["letters"] = "glyphs/lower:test"
    outliers = args.outliers or "glyphs/upper:train"
  else:
    default.set_data(c, DATA[args.variant], 3, pp="")
    c.model.name, c.model.kwargs = "vgg13", {}
    # The reference's pairing (SVHN <-> CIFAR-10) beside the embedded RGB noise sets.
    other = "svhn_cropped" if args.variant == "cifar10" else "cifar10"
    c.evaluators.ood.sets[other.split("_")[0]] = f"{other}:test"
    c.evaluators.classification.splits = ("test",)
    outliers = args.outliers
  c.data.mean, c.data.std = (0.0,) * channels, (1.0,) * channels
  c.streams.train.pp = ""
  c.streams.train.batch_size = batch
  c.num_epochs = float(epochs)
  c.optimizer.update(_adam(0.9, epochs))
  if embedded:
    c.optimizer.learning_rate = EMBEDDED_LR
  c.evaluators.ood.preset = "lee"
  c.evaluators.ood.scores = ("msp",)
  joint = {"task": "train", "config": joint_overrides(
      beta=beta, batch=batch, channels=channels, width=32 if embedded else 64, epochs=epochs,
      samples_every=200 if embedded else 1000)}
  stages = {}
  if args.mode in ("compare", "ce"):
    stages["ce"] = {"task": "train", "config": {}}
  if args.mode == "compare" and outliers:
    name, _, split = outliers.rpartition(":")
    stages["confidence"] = {"task": "train", "config": {
        "streams": {"outliers": {"data": name, "split": split, "batch_size": batch}},
        "losses": {"confidence": {"weight": beta}}}}
  if args.mode in ("compare", "joint"):
    stages["joint"] = joint
  if args.mode == "compare":
    stages["gan"] = {"task": "gan_samples", "checkpoint": "artifact:joint/checkpoint",
                     "embedding": "artifact:ce/checkpoint", "num_samples": int(args.samples),
                     "config": joint["config"]}
  c.stages = stages
  return c
