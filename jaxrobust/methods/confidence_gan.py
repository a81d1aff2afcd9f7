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
  (|logit| > 100).
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

import jax
import jax.numpy as jnp
import optax

from jaxrobust.losses import LOSSES, LossInputs, masked_mean
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
