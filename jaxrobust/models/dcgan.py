"""DCGAN generator and discriminator for 32x32 images, as in Lee et al. 2018.

Follows ``src/models/gan.py`` of alinlab/Confident_classifier (the GAN of the
joint confidence loss of Lee, Lee, Lee & Shin, ICLR 2018; itself adapted from
``pytorch/examples`` ``dcgan/main.py``), with its defaults ``nz=100``,
``ngf = ndf = 64``:

* generator: noise ``[B, nz]`` -> ConvTranspose 4x4 (stride 1, padding 0) to
  ``ngf*8`` channels at 4x4 -> BN-ReLU -> ConvTranspose 4x4 (stride 2,
  padding 1) to ``ngf*4`` at 8x8 -> BN-ReLU -> to ``ngf*2`` at 16x16 -> BN-ReLU
  -> to ``nc`` at 32x32 -> sigmoid: NHWC images ``[B, 32, 32, nc]`` in [0, 1];
* discriminator: Conv 4x4 (stride 2, padding 1) to ``ndf*2`` -> LeakyReLU(0.2)
  -> Conv to ``ndf*4`` -> BN-LeakyReLU -> Conv to ``ndf*8`` (4x4 map) ->
  BN-LeakyReLU -> Conv 4x4 (stride 1, padding 0) to 1 channel; the reference
  ends with a sigmoid, which is left out here (see
  :class:`DCGANDiscriminator`);
* no bias anywhere; the reference's ``weights_init``: conv and transposed
  conv kernels ``normal(0, 0.02)``, BatchNorm scale ``normal(1, 0.02)`` and
  bias 0; BatchNorm with PyTorch's momentum 0.1 and eps 1e-5.

PyTorch's ``ConvTranspose2d(k, stride, padding=p)`` is here a flax
``nn.ConvTranspose`` with explicit padding ``k - 1 - p`` on each side (the
padding of the equivalent convolution of the stride-dilated input) and a
``[kh, kw, in, out]`` kernel that is the PyTorch ``[in, out, kh, kw]`` weight
transposed and flipped in both spatial axes (:mod:`jaxrobust.convert` does
it; ``tests/test_models_gan.py`` checks both against PyTorch).

These models have no classes (:func:`~jaxrobust.models.registry.get_model`
builds them without ``num_classes``) and return a dict of named outputs, with
the classifiers' call signature ``model.apply(variables, x, train=...,
return_features=False)``.

With the reference's defaults and ``nc=3`` the generator has 3,448,576
parameters and the discriminator 2,637,312 (the PyTorch modules' counts).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust.models.layers import Dtype, batch_norm, check_images
from jaxrobust.models.registry import register_model

# The reference's weights_init: Conv*/ConvTranspose* weights normal(0, 0.02).
dcgan_conv_init = nn.initializers.normal(0.02)
#: The image size both models are built for.
IMAGE_SIZE = 32


def dcgan_bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """The reference's BatchNorm weight init, ``normal(1, 0.02)``."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _upcast(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class _DCGAN(nn.Module):
  """Attributes shared by the generator and the discriminator.

  Attributes:
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters and batch
      statistics stay float32, outputs are returned in float32 (or ``dtype``
      if wider).
    bn_axis_name: axis name of the BatchNorm statistics under pmap /
      shard_map (``None`` under global-view ``jax.jit``).
  """
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  def _bn(self, train: bool, name: str) -> nn.Module:
    return batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name,
                      scale_init=dcgan_bn_scale_init, name=name)


@register_model("dcgan_generator")
class DCGANGenerator(_DCGAN):
  """The reference's ``_netG``: noise ``[B, nz]`` -> images ``[B, 32, 32, nc]``
  in [0, 1] (NHWC), ``{'images': ...}``.

  The noise may also be given as ``[B, 1, 1, nz]`` (NHWC of the reference's
  ``[B, nz, 1, 1]``). ``return_features`` is accepted for the common call
  signature and adds nothing.

  Attributes:
    nz: noise dimension (the reference's 100).
    ngf: generator width; the layers have ``8, 4, 2`` times ``ngf`` channels.
    nc: image channels.
  """
  nz: int = 100
  ngf: int = 64
  nc: int = 3

  @nn.compact
  def __call__(self, z: jax.Array, *, train: bool, return_features: bool = False
               ) -> dict[str, jax.Array]:
    del return_features
    if z.ndim == 4 and z.shape[1:3] == (1, 1):
      z = z.reshape(z.shape[0], -1)
    if z.ndim != 2 or z.shape[-1] != self.nz:
      raise ValueError(f"{type(self).__name__} expects noise of shape [batch, {self.nz}] (or "
                       f"[batch, 1, 1, {self.nz}]); got {tuple(z.shape)}.")
    if not jnp.issubdtype(z.dtype, jnp.floating):
      raise TypeError(f"{type(self).__name__} expects floating-point noise; got {z.dtype}.")
    x = z[:, None, None, :]
    widths = (self.ngf * 8, self.ngf * 4, self.ngf * 2, self.nc)
    for i, features in enumerate(widths, 1):
      k, stride, pad = (4, 1, 0) if i == 1 else (4, 2, 1)
      x = nn.ConvTranspose(features, (k, k), strides=(stride, stride),
                           padding=((k - 1 - pad, k - 1 - pad),) * 2, use_bias=False,
                           dtype=self.dtype, kernel_init=dcgan_conv_init, name=f"deconv{i}")(x)
      if i < len(widths):
        x = nn.relu(self._bn(train, f"bn{i}")(x))
    return {"images": _upcast(nn.sigmoid(x))}


@register_model("dcgan_discriminator")
class DCGANDiscriminator(_DCGAN):
  """The reference's ``_netD`` without its final sigmoid: images
  ``[B, 32, 32, nc]`` -> ``{'score': [B] logits}``.

  ``score`` is the pre-sigmoid **logit** of "real": the reference outputs
  ``sigmoid(score)`` and trains with ``nn.BCELoss``; compute the loss from the
  logit with ``optax.sigmoid_binary_cross_entropy(score, label)``, which is
  that loss computed stably. The two are equal in exact arithmetic and agree
  to float32 rounding for ``|score|`` up to about 10; beyond, PyTorch's
  sigmoid-then-log loses precision as the sigmoid rounds towards 1, and its
  clamp of each log at -100 takes over where the float32 sigmoid reaches 1
  (``score`` above about 17: losses 0 and 100 for labels 1 and 0) or 0
  (``score`` below about -88). ``return_features=True`` adds ``'features'``:
  the flattened ``[B, 4 * 4 * ndf * 8]`` input of the last convolution (NHWC
  order).

  Attributes:
    nc: image channels.
    ndf: discriminator width; the convs have ``2, 4, 8`` times ``ndf``
      channels.
  """
  nc: int = 3
  ndf: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False
               ) -> dict[str, jax.Array]:
    check_images(x, type(self).__name__)
    if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, self.nc):
      raise ValueError(f"{type(self).__name__} expects images of shape [batch, {IMAGE_SIZE}, "
                       f"{IMAGE_SIZE}, {self.nc}]; got {tuple(x.shape)}.")
    for i, features in enumerate((self.ndf * 2, self.ndf * 4, self.ndf * 8), 1):
      x = nn.Conv(features, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                  dtype=self.dtype, kernel_init=dcgan_conv_init, name=f"conv{i}")(x)
      if i > 1:
        x = self._bn(train, f"bn{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    features = x
    score = nn.Conv(1, (4, 4), padding="VALID", use_bias=False, dtype=self.dtype,
                    kernel_init=dcgan_conv_init, name="conv4")(x)
    out = {"score": _upcast(score.reshape(score.shape[0]))}
    if return_features:
      out["features"] = _upcast(features.reshape(features.shape[0], -1))
    return out
