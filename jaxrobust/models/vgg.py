"""VGG-13 for 32x32 images, as the classifier of Lee et al. 2018.

Follows ``src/models/vgg.py`` of alinlab/Confident_classifier (the code of
Lee, Lee, Lee & Shin, "Training Confidence-calibrated Classifiers for
Detecting Out-of-Distribution Samples", ICLR 2018), a CIFAR adaptation of
torchvision's VGG:

* configuration "B": 3x3 convolutions (padding 1, **with** bias) of widths
  64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M (M: 2x2
  max-pool, stride 2), each followed by a ReLU; 32x32 inputs end as a 1x1x512
  map, flattened to the 512-d features;
* classifier Linear(512, 512)-ReLU-Dropout(0.5)-Linear(512, 512)-ReLU-
  Dropout(0.5)-Linear(512, K); the last Linear is the ``head``, the two
  hidden ones ``fc1`` and ``fc2``;
* initialisation of the reference's ``_initialize_weights``: convs
  ``normal(0, sqrt(2 / n))`` with ``n = k * k * out_channels``, linear
  weights ``normal(0, 0.01)``, every bias 0 (BatchNorm scale 1, bias 0).

The reference's ``vgg13`` has **no BatchNorm** (its ``make_layers`` takes no
``batch_norm`` option): ``vgg13``. ``vgg13_bn`` (``batch_norm=True``) puts a
BatchNorm between each conv and its ReLU, torchvision's ``vgg13_bn`` layout,
with the classifier above (not torchvision's 4096-wide one).

The features (``return_features=True``) are the 512-d flattened conv output,
the classifier MLP's input -- not the ``head``'s input, which is ``fc2``'s
output: a method that refits only ``head/.*`` on frozen features (DFR,
last-layer fine-tuning) refits the last of the three Linear layers.

``vgg13`` has 9,935,434 parameters for 10 classes (the reference's count),
``vgg13_bn`` 9,941,322.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust.models.layers import (
  ImageClassifier,
  check_images,
  check_rate,
  classify,
  conv_and_bn,
  max_pool_2x2,
  torch_conv_init,
)
from jaxrobust.models.registry import register_model

#: Configuration "B" of VGG (VGG-13), conv widths and ``"M"`` for a 2x2 max-pool.
VGG13 = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
#: Width of the classifier's two hidden Linear layers (the reference's 512).
HIDDEN = 512
# The reference's nn.Linear init: m.weight.data.normal_(0, 0.01), bias 0.
linear_init = nn.initializers.normal(0.01)


@register_model("vgg13", layers=VGG13)
@register_model("vgg13_bn", layers=VGG13, batch_norm=True)
class VGG(ImageClassifier):
  """VGG with the CIFAR classifier of the reference; 512-d features.

  Attributes:
    layers: conv widths and ``"M"`` (2x2 max-pool); :data:`VGG13` for the
      registered names. 32x32 inputs must end as a 1x1 map.
    batch_norm: BatchNorm between each conv and its ReLU (False: the
      reference's ``vgg13``).
    dropout_rate: dropout after each of the two hidden Linear layers, in
      train mode (``'dropout'`` rng); the reference's 0.5.
  """
  layers: Sequence[int | str] = VGG13
  batch_norm: bool = False
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    check_images(x, type(self).__name__)
    check_rate(self.dropout_rate, "dropout_rate", type(self).__name__)
    _, bn = conv_and_bn(self, train)
    i = 0
    for v in self.layers:
      if v == "M":
        x = max_pool_2x2(x)
        continue
      i += 1
      x = nn.Conv(int(v), (3, 3), padding=((1, 1), (1, 1)), use_bias=True, dtype=self.dtype,
                  kernel_init=torch_conv_init, bias_init=nn.initializers.zeros,
                  name=f"conv{i}")(x)
      if self.batch_norm:
        x = bn(name=f"bn{i}")(x)
      x = nn.relu(x)
    if x.shape[1:3] != (1, 1):
      raise ValueError(f"{type(self).__name__} expects 32x32 inputs (the reference's classifier "
                       f"takes the 1x1 map after the pools); the convs end at "
                       f"{x.shape[1]}x{x.shape[2]}.")
    features = x.reshape(x.shape[0], -1)
    h = features
    for j in (1, 2):
      h = nn.Dense(HIDDEN, dtype=self.dtype, kernel_init=linear_init,
                   bias_init=nn.initializers.zeros, name=f"fc{j}")(h)
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(h))
    logits = classify(h, self.num_classes, dtype=self.dtype, return_features=False,
                      kernel_init=linear_init)
    if return_features:
      return logits, features.astype(jnp.promote_types(features.dtype, jnp.float32))
    return logits
