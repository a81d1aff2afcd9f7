"""Lee, Lee, Lee, Shin (ICLR 2018): the joint confidence loss, a classifier trained with a GAN.

"Training Confidence-calibrated Classifiers for Detecting Out-of-Distribution
Samples". A GAN whose generator is pushed towards the boundary of the
in-distribution supplies the outliers of the confidence loss
KL(U ‖ p(y|x_out)). Reference code: ``alinlab/Confident_classifier``
``src/run_joint_confidence.py`` (``src/models/gan.py``, ``src/models/vgg.py``).

Per batch, three updates, in this order (``config.updates``, each ``after``
the previous one):

1. **discriminator** -- ``BCE(D(x) → 1) + BCE(D(G(z)) → 0)``
   (:func:`gan_discriminator`; ``x`` and ``G(z)`` in two passes of D, as the
   reference's ``netD(data)`` and ``netD(fake.detach())``);
2. **generator** -- ``BCE(D(G(z)) → 1) + β · KL(U ‖ p(y|G(z)))``
   (:func:`gan_generator` + :func:`generated_confidence`), the same ``z`` as
   the discriminator's update; D and the classifier are run in train mode
   (their BatchNorm statistics updated, as in the reference) but not updated;
3. **classifier** -- ``NLL(x, y) + β · KL(U ‖ p(y|G(z')))`` on fresh noise
   ``z'`` (``cross_entropy`` + ``confidence`` on the generated stream,
   ``fresh_noise=('fake',)``), ``x`` and ``G(z')`` in two passes.

Conventions:

* D returns a logit (``{'score': [B]}``); the BCE is
  ``optax.sigmoid_binary_cross_entropy``, which equals the reference's
  ``nn.Sigmoid`` + ``nn.BCELoss`` except where BCELoss clamps ``log`` at -100
  (logits beyond ±100).
* KL(U ‖ p) per example, averaged over the batch
  (:func:`~jaxrobust.methods.outlier_exposure.confidence_loss`): the
  reference's ``F.kl_div(log_softmax, uniform) * num_classes``.
* Images are in ``[0, 1]`` everywhere: the generator ends in a sigmoid and the
  reference feeds un-normalised ``ToTensor()`` images to D and the classifier
  (the CIFAR/SVHN configs set ``data.mean = 0``, ``data.std = 1``).
* The OOD score is MSP (``test_detection.py``), reported with the ``lee``
  metric preset.

Defaults (the reference): Adam lr 2e-4 for the three networks, β1 = 0.5 for
G and D (0.9 for the classifier), no weight decay, 100 epochs, lr × 0.1 after
epoch 60; β = 1 and batch 128 (SVHN), β = 0.1 and batch 64 (CIFAR-10); DCGAN
with nz = 100, ngf = ndf = 64; classifier VGG-13.

Departures: none in the step. The generator's BatchNorm statistics are
updated once per noise draw (the reference runs ``netG(noise)`` once per
draw; our generator update re-runs it on the same ``z`` to differentiate and
discards that pass's statistics -- :mod:`jaxrobust.generated`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import generated, plots, saliency
from jaxrobust.data import pp
from jaxrobust.evaluators import EVALUATORS, Evaluator
from jaxrobust.losses import LOSSES, LossInputs, masked_mean
from jaxrobust.metrics import generative
from jaxrobust.modules import CLASSIFIER
from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS, StageContext, predict_outputs
from jaxrobust.methods.outlier_exposure import confidence_loss

Array = jax.Array


def bce_with_logits(logits: Array, target: float, mask: Array | None = None) -> Array:
  """Mean over valid rows of ``BCE(sigmoid(logits), target)`` (a logit per row)."""
  logits = jnp.reshape(jnp.asarray(logits, jnp.float32), (-1,))
  return masked_mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)),
                     mask)


def _score(outputs, module: str) -> Array:
  if "score" not in outputs:
    raise KeyError(f"module {module!r} returns no 'score' (it returns {sorted(outputs)}): the GAN "
                   "terms need a discriminator, e.g. model name 'dcgan_discriminator'.")
  return jnp.reshape(outputs["score"], (-1,))


@LOSSES.register("gan_discriminator")
def gan_discriminator(inputs: LossInputs, *, real: str = "train", fake: str = "fake"):
  """D's loss: ``BCE(D(real) → 1) + BCE(D(fake) → 0)`` on the update's own
  passes over the two streams (the update trains the discriminator)."""
  s_real = _score(inputs.outputs[real], inputs.module)
  s_fake = _score(inputs.outputs[fake], inputs.module)
  m_real, m_fake = inputs.batch[real]["mask"], inputs.batch[fake]["mask"]
  loss = bce_with_logits(s_real, 1.0, m_real) + bce_with_logits(s_fake, 0.0, m_fake)
  return loss, {"d_real": masked_mean(jax.nn.sigmoid(s_real), m_real),
                "d_fake": masked_mean(jax.nn.sigmoid(s_fake), m_fake)}


@LOSSES.register("gan_generator")
def gan_generator(inputs: LossInputs, *, fake: str = "fake",
                  discriminator: str = "discriminator"):
  """G's GAN loss ``BCE(D(G(z)) → 1)``: the discriminator run in train mode on
  the generated images, which carry the generator's gradient."""
  score = _score(inputs.call(discriminator, inputs.images[fake], train=True), discriminator)
  mask = inputs.batch[fake]["mask"]
  return bce_with_logits(score, 1.0, mask), {"d_fake": masked_mean(jax.nn.sigmoid(score), mask)}


@LOSSES.register("generated_confidence")
def generated_confidence(inputs: LossInputs, *, fake: str = "fake",
                         classifier: str = "classifier"):
  """``KL(U ‖ p(y|G(z)))`` of the (not updated) classifier run in train mode on
  the generated images: pushes the generator to where the classifier is
  unsure (the boundary of the in-distribution)."""
  logits = inputs.call(classifier, inputs.images[fake], train=True)["logits"]
  mask = inputs.batch[fake]["mask"]
  return confidence_loss(logits, mask), {
      f"{fake}/msp": masked_mean(jnp.max(jax.nn.softmax(logits), -1), mask)}


# --- judging the generator ----------------------------------------------------------

def _generate(ctx, variables, generator: str, n: int, seed: int, batch: int) -> np.ndarray:
  """``n`` samples of the checkpoint's generator, in train mode (batch
  statistics, as during training and in the reference's sample grids), in
  batches of ``batch`` rows, statistics not updated."""
  g = ctx.modules[generator]
  noise = generated.Noise("normal", int(g.input_shape[0]))
  run = jax.jit(lambda v, z: g.apply_outputs(v, z, train=True, update_stats=False)[0])
  out = []
  for i in range(0, n, batch):
    z = noise.sample(jax.random.fold_in(jax.random.PRNGKey(seed), i), batch)
    out.append(np.asarray(generated.output_images(run(variables, z), generator)))
  return np.concatenate(out)[:n]


@functools.cache
def _eval_outputs(module):
  """One compiled eval-mode pass per module (its variables are an argument),
  shared by every call of :func:`_apply_batches`."""
  return jax.jit(lambda v, x: module.apply_outputs(v, x, train=False)[0])


def _apply_batches(module, variables, images: np.ndarray, batch: int, field: str) -> np.ndarray:
  run = _eval_outputs(module)
  return np.concatenate([np.asarray(run(variables, images[i:i + batch])[field])
                         for i in range(0, len(images), batch)])


def _first_ood_set(ctx: StageContext) -> str:
  sets = dict(ctx.config.evaluators.get("ood", {}).get("sets", {}) or {})
  return str(next(iter(sets.values()))) if sets else ""


def _saliency_figure(ctx: StageContext, classifier, variables_by_model, split: str, ood: str,
                     path: str, n: int = 4) -> None:
  ood = ood or _first_ood_set(ctx)
  sources = [(split, ctx.data.load(ctx.config.data.name, split))]
  if ood:
    name, _, ood_split = ood.rpartition(":")
    sources.append((ood, ctx.data.load(name, ood_split)))
  images = np.concatenate([np.stack([pp.to_unit_range(np.asarray(src[i]["image"]))
                                     for i in range(n)]) for _, src in sources])
  rows = [label for label, _ in sources for _ in range(n)]
  maps = {}
  for model, variables in variables_by_model.items():
    def logits(x, variables=variables):
      return classifier.apply_outputs(variables, x, train=False)[0]["logits"]
    target = jnp.argmax(logits(jnp.asarray(images)), -1)
    maps[model] = np.asarray(saliency.guided_backprop(logits, jnp.asarray(images), target))
  plots.saliency_grid(images, maps, row_labels=rows, path=path,
                      title="Guided backprop (predicted class): "
                            + " vs ".join(variables_by_model))


@TASKS.register("gan_samples")
def gan_samples(ctx: StageContext, *, checkpoint: str, embedding: str, num_samples: int = 1000,
                split: str = "test", generator: str = "generator", seed: int = 0,
                batch_size: int = 64, ood: str = "") -> dict[str, float]:
  """Judges a joint-confidence run's generator (Lee et al. 2018, §3-4).

  Writes ``samples.png`` (a grid of ``G(z)``), ``msp.png`` (the run's
  classifier's MSP on real ``split`` images, generated images and up to
  ``num_samples`` images of ``ood``) and returns:

  * ``msp_generated``, ``msp_real`` -- mean MSP of the run's
    classifier (higher = more confident) on ``num_samples`` generated images
    and on the ``split`` images: the paper's claim is that the generator's
    samples get low confidence;
  * ``p_precision``, ``p_recall`` (Park & Kim 2023) and
    ``precision``, ``recall`` (Kynkäänniemi et al. 2019, k = 3) of the
    generated images against the ``split`` images, on the penultimate
    features of ``embedding`` -- a classifier trained apart from the GAN (the
    cross-entropy baseline), never the one the generator was trained
    against (:mod:`jaxrobust.metrics.generative`).

  ``saliency.png``: guided back-propagation maps
  (:func:`jaxrobust.saliency.guided_backprop`, predicted class) of the
  cross-entropy and the joint classifier on four ``split`` images and four
  images of ``ood`` (``dataset:split``; default the first of
  ``config.evaluators.ood.sets``) -- the paper's interpretability figure.

  Generation runs the generator in train mode (batch statistics of
  ``batch_size`` rows, as in training).
  """
  if num_samples < 10:
    raise RegistryError(f"{ctx.where}.num_samples must be >= 10, got {num_samples}.")
  path = ctx.checkpoint_path(checkpoint)
  embed_path = ctx.checkpoint_path(embedding, "embedding")
  if os.path.realpath(embed_path) == os.path.realpath(path):
    raise RegistryError(f"{ctx.where}.embedding: the embedding network must be trained apart "
                        "from the GAN (e.g. 'artifact:ce/checkpoint'), not the classifier the "
                        "generator was trained against.")
  if generator not in ctx.modules:
    raise RegistryError(f"{ctx.where}.generator={generator!r}: no such module "
                        f"({sorted(ctx.modules)}).")
  g_vars = dict(zip(("params", "batch_stats"), ckpt_lib.load_pretrained(
      path, module=generator, where=f"{ctx.where}.checkpoint")))
  fake = _generate(ctx, g_vars, generator, num_samples, seed, batch_size)
  classifier = ctx.modules[CLASSIFIER]
  c_vars = dict(zip(("params", "batch_stats"), ckpt_lib.load_pretrained(
      path, where=f"{ctx.where}.checkpoint")))
  real = predict_outputs(ctx, checkpoint=checkpoint, split=split, fields=("logits",))["logits"]
  msp_real = np.max(np.asarray(jax.nn.softmax(real)), -1)
  msp_fake = np.max(np.asarray(jax.nn.softmax(_apply_batches(
      classifier, c_vars, fake, batch_size, "logits"))), -1)
  e_vars = dict(zip(("params", "batch_stats"), ckpt_lib.load_pretrained(
      embed_path, where=f"{ctx.where}.embedding")))
  real_features = predict_outputs(ctx, checkpoint=embedding, split=split,
                                  fields=("features",))["features"]
  fake_features = _apply_batches(classifier, e_vars, fake, batch_size, "features")
  p_prec, p_rec = generative.probabilistic_precision_recall(real_features, fake_features)
  prec, rec = generative.improved_precision_recall(real_features, fake_features)
  _saliency_figure(ctx, classifier, {"cross-entropy": e_vars, "joint confidence": c_vars},
                   split, ood, os.path.join(ctx.workdir, "saliency.png"))
  plots.sample_grid(fake, path=os.path.join(ctx.workdir, "samples.png"), max_images=64,
                    title=f"Generated samples G(z) ({generator}, {num_samples} drawn)")
  msp = {f"real ({split})": msp_real, "generated": msp_fake}
  ood = ood or _first_ood_set(ctx)
  if ood:
    name, _, ood_split = ood.rpartition(":")
    source = ctx.data.load(name, ood_split)
    x = np.stack([pp.to_unit_range(np.asarray(source[i]["image"]))
                  for i in range(min(len(source), num_samples))])
    msp[f"OOD ({ood})"] = np.max(np.asarray(jax.nn.softmax(_apply_batches(
        classifier, c_vars, x, batch_size, "logits"))), -1)
  plots.histograms(msp, xlabel="MSP of the joint classifier (higher = in-dist.)",
                   path=os.path.join(ctx.workdir, "msp.png"),
                   title="MSP on real, generated and OOD images")
  return {"msp_generated": float(msp_fake.mean()), "msp_real": float(msp_real.mean()),
          "p_precision": float(p_prec), "p_recall": float(p_rec),
          "precision": float(prec), "recall": float(rec)}


@EVALUATORS.register("generated_samples")
class GeneratedSamples(Evaluator):
  """Samples of the generator during training (the reference saves
  ``netG(fixed_noise)`` every 100 batches): ``num_images`` images from fixed
  noise (``seed``), the generator in train mode as in the reference, drawn to
  TensorBoard and ``plots/<key>_step<N>.png`` by the trainer, every
  ``every_steps`` steps and at the end. Returns ``<key>/msp_generated``: the
  evaluated classifier's mean MSP (higher = more confident) on them.

  Args:
    generator: the generator module.
    num_images: images drawn (also the batch of the generator's pass).
    seed: of the fixed noise.
  """

  def __init__(self, ctx, generator: str = "generator", num_images: int = 64, seed: int = 0,
               key: str = "generated"):
    super().__init__(ctx)
    if generator not in ctx.modules:
      raise RegistryError(f"{ctx.where}.generator={generator!r}: no such module "
                          f"({sorted(ctx.modules)}).")
    if num_images < 1:
      raise RegistryError(f"{ctx.where}.num_images must be >= 1, got {num_images}.")
    self.generator, self.key = generator, key
    g = ctx.modules[generator]
    self.noise = generated.Noise("normal", int(g.input_shape[0])).sample(
        jax.random.PRNGKey(seed), int(num_images))
    c = ctx.modules[ctx.module]
    self._run = jax.jit(lambda gv, cv, z: _samples_and_msp(g, c, gv, cv, z, generator))
    self.images: dict[str, np.ndarray] = {}

  def evaluate(self, state, *, plots_dir: str | None = None, final: bool = False
               ) -> dict[str, float]:
    del plots_dir, final
    images, msp = self._run(state.modules[self.generator].variables,
                            state.modules[self.ctx.module].variables, self.noise)
    self.images = {f"{self.key}/samples": np.asarray(images)}
    return {f"{self.key}/msp_generated": float(msp)}


def _samples_and_msp(g, c, g_vars, c_vars, z, generator: str):
  images = generated.output_images(g.apply_outputs(g_vars, z, train=True, update_stats=False)[0],
                                   generator)
  logits = c.apply_outputs(c_vars, images, train=False)[0]["logits"]
  return images, jnp.mean(jnp.max(jax.nn.softmax(logits), -1))
