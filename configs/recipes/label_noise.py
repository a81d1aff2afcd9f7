"""Training under label corruption: no correction, forward correction, GLC --
from scratch or from a pre-trained model (Hendrycks, Lee, Mazeika, ICML 2019,
§4.2; Hendrycks et al. 2018; Patrini et al. 2017).

  --config configs/recipes/label_noise.py                                  # = :embedded, method=compare, uniform 0.5
  --config configs/recipes/label_noise.py:method=glc,gold_fraction=0.1     # one method
  --config configs/recipes/label_noise.py:kind=flip,strength=0.4,pretrained=True
  --config configs/recipes/label_noise.py:kind=hierarchical                # within the digits' stroke groups
  --config configs/recipes/label_noise.py:cifar10,pretrained=True,source=/path/to/pretrained_run

Stages (:func:`jaxrobust.methods.label_noise.recipe`; the arm to read is the
stage named after the method):

* ``ce`` -- cross-entropy on the corrupted labels (gold labels clean when
  ``gold_fraction`` > 0).
* ``forward_phase1`` -> ``forward_matrix`` (Ĉ from anchor points; the 97th
  percentile filter for CIFAR-10) -> ``forward`` (re-initialised, loss
  ``−log (Ĉᵀ p)[ỹ]``).
* ``glc_phase1`` (untrusted data only) -> ``glc_matrix`` (Ĉ from the trusted
  set) -> ``glc`` (re-initialised; trusted rows CE, the rest corrected).
* ``method=compare``: ``ce``, ``forward``, ``glc5`` and ``glc10`` (trusted
  fractions 5% and 10%, stage prefixes ``glc5_`` / ``glc10_``).
* ``pretrained=True``: a ``pretrain`` stage on the source (``glyphs`` for the
  embedded variant; ``imagenet_resized/32x32`` for CIFAR, or ``source``),
  and every training phase fine-tunes from it (the paper: 10 epochs, lr 0.01
  with ``train_glc.py --use_pretrained_model``; embedded: 10 epochs at the
  embedded fine-tuning lr 0.1).

Arguments after ``:``: ``variant``, ``method`` (ce, forward, glc, compare),
``kind`` (uniform, flip, hierarchical), ``strength`` (in [0, 1]),
``gold_fraction`` (glc; default 0.05), ``pretrained``, ``source``,
``pretrain_epochs``, ``epochs`` (every training phase), ``corruption_seed``
(default: ``config.seed``).
"""

from configs import default
from configs.recipes import pretrain_finetune
from jaxrobust.config import parse_arg
from jaxrobust.methods import label_noise

VARIANTS = ("embedded", "cifar10", "cifar100")
METHODS = label_noise.METHODS + ("compare",)
MODES, MODE_KEY = METHODS, "method"  # the argument that picks the arm(s)
EXTRA_ARGS = ("pretrained=True",)  # every phase fine-tuned from a pre-training stage
# compare: (stage prefix, method, trusted fraction) of each arm.
COMPARE = (("", "ce", 0.0), ("", "forward", 0.0), ("glc5_", "glc", 0.05),
           ("glc10_", "glc", 0.10))


def stages(c, *, method: str, kind: str, strength: float, gold_fraction: float, seed: int,
           init, finetune, epochs: float = -1.0, prefix: str = "", overrides=None):
  """The stages of ``method`` (or of the four ``compare`` arms) on ``c``;
  ``overrides`` apply to every phase."""
  overrides = dict(overrides or {})
  if epochs > 0:
    overrides["num_epochs"] = float(epochs)
  if epochs > 0 and finetune is not None:
    finetune = {**finetune, "num_epochs": float(epochs)}
  arms = ([(prefix + p, m, g) for p, m, g in COMPARE] if method == "compare"
          else [(prefix, method, gold_fraction)])
  out = {}
  for pre, m, g in arms:
    out.update(label_noise.recipe(c, method=m, kind=kind, strength=strength, gold_fraction=g,
                                  seed=seed, init=init, prefix=pre, finetune=finetune,
                                  overrides=overrides or None))
  return out


def get_config(arg=None):
  args = parse_arg(arg, variant="embedded", method="compare", kind="uniform", strength=0.5,
                   gold_fraction=0.05, pretrained=False, source="", pretrain_epochs=-1.0,
                   epochs=-1.0, corruption_seed=-1)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {VARIANTS}")
  if args.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {args.method!r}.")
  c = default.get_config(args.variant)
  c.stages = {}
  init, finetune = None, None
  if args.pretrained:
    if args.source:
      init = args.source
    else:
      c.stages = {"pretrain": {"task": "train", "config": pretrain_finetune.source_pretrain(
          args.variant, args.pretrain_epochs)}}
      init = "artifact:pretrain/checkpoint"
    if args.variant == "embedded":
      finetune = {"learning_rate": pretrain_finetune.EMBEDDED_FINETUNE_LR, "batch_size": 64}
  seed = args.corruption_seed if args.corruption_seed >= 0 else c.seed
  # train_glc.py / train_forward.py fine-tune the pre-trained WRN without dropout
  overrides = ({"model": {"kwargs": {"dropout_rate": 0.0}}}
               if args.pretrained and args.variant != "embedded" else None)
  c.stages = {**c.stages.to_dict(), **stages(
      c, method=args.method, kind=args.kind, strength=args.strength,
      gold_fraction=args.gold_fraction, seed=seed, init=init, finetune=finetune,
      epochs=args.epochs, overrides=overrides)}
  return c
