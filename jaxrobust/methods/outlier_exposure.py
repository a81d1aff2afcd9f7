"""Outlier Exposure (Hendrycks, Mazeika, Dietterich, ICLR 2019) and the
confidence loss of Lee, Lee, Lee, Shin (ICLR 2018): one term, two names.

Both push the classifier's predictive distribution on auxiliary outliers
towards the uniform distribution U over the K classes:

* OE (``hendrycks/outlier-exposure`` ``CIFAR/oe_tune.py``; also
  ``wetliu/energy_ood`` ``--score OE``): ``λ · mean_x [logsumexp f(x) −
  mean_k f_k(x)]`` over the outlier batch, λ = 0.5. The bracket is the
  cross-entropy from U to p(y|x): ``−(1/K) Σ_k log p_k``.
* Lee et al.'s confidence loss: ``β · KL(U ‖ p(y|x_out))``. The reference
  (``alinlab/Confident_classifier``) computes it as ``F.kl_div(log_softmax,
  uniform) * num_classes``: old PyTorch's ``kl_div`` averaged over B × K
  elements, so the factor K gives the per-example sum, averaged over the batch.

Since ``KL(U ‖ p) = CE(U, p) − log K``, the two differ by the constant
``log K``: identical gradients. :func:`outlier_exposure_loss` is the one
implementation; :func:`confidence_loss` subtracts ``log K`` (tested).

Registered loss terms (``config.losses``):

* ``outlier_exposure(stream='outliers')`` -- OE; give ``weight=0.5`` for the
  paper's λ;
* ``confidence(stream='outliers')`` -- Lee et al.'s KL; give ``weight`` β (1
  for SVHN, 0.1 for CIFAR-10 in the reference).

The outlier stream goes through the same forward pass as the in-distribution
batch (``config.streams.outliers``, ``through_model=True``), so BatchNorm sees
both, as in the OE and energy code (in-distribution batch 128 + outliers 256 in
the papers). Lee et al.'s GAN variant, which generates the outliers, is the
joint confidence loss (a ``confidence_gan`` method, not yet built).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrobust.losses import LOSSES, LossInputs, masked_mean

Array = jax.Array


def outlier_exposure_loss(logits_out: Array, mask: Array | None = None) -> Array:
  """Mean over valid outliers of ``CE(U, softmax(f)) = logsumexp f − mean_k f_k``."""
  logits_out = jnp.asarray(logits_out, jnp.float32)
  per_example = jax.nn.logsumexp(logits_out, -1) - jnp.mean(logits_out, -1)
  return masked_mean(per_example, mask)


def confidence_loss(logits_out: Array, mask: Array | None = None) -> Array:
  """Mean over valid outliers of ``KL(U ‖ softmax(f))`` = OE loss − log K."""
  return outlier_exposure_loss(logits_out, mask) - math.log(jnp.shape(logits_out)[-1])


def _outlier_logits(inputs: LossInputs, stream: str) -> tuple[Array, Array]:
  return inputs.outputs[stream]["logits"], inputs.batch[stream]["mask"]


@LOSSES.register("outlier_exposure")
def outlier_exposure(inputs: LossInputs, *, stream: str = "outliers"):
  """OE term: :func:`outlier_exposure_loss` on the ``stream``'s logits."""
  logits, mask = _outlier_logits(inputs, stream)
  value = outlier_exposure_loss(logits, mask)
  return value, {f"{stream}/msp": masked_mean(jnp.max(jax.nn.softmax(logits), -1), mask)}


@LOSSES.register("confidence")
def confidence(inputs: LossInputs, *, stream: str = "outliers"):
  """Lee et al.'s confidence term: :func:`confidence_loss` on the ``stream``'s logits."""
  logits, mask = _outlier_logits(inputs, stream)
  value = confidence_loss(logits, mask)
  return value, {f"{stream}/msp": masked_mean(jnp.max(jax.nn.softmax(logits), -1), mask)}
