"""A small CNN for the embedded 32x32x1 data sets (``digits``, ``glyphs``).

Stages of bias-free 3x3 conv-BN-ReLU layers with a 2x2 max-pool between
stages, then a global average pool and the ``head``. The default
``((32,), (32,), (64, 64))`` has 65,834 parameters for 10 classes and costs
about 12 MFLOP per 32x32 image forward, so it trains to >= 0.97 test accuracy
on ``digits`` in seconds on a laptop CPU. It is a test/example model of this
project, not a model from the reproduced papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxrobust.models.layers import (
    ImageClassifier, check_images, check_rate, classify, conv_and_bn, max_pool_2x2)
from jaxrobust.models.registry import register_model


@register_model("small_cnn")
class SmallCNN(ImageClassifier):
  """conv(32)-pool-conv(32)-pool-conv(64)-conv(64)-global pool-head by default.

  Attributes:
    stage_widths: output channels of the convs of each stage; a 2x2 max-pool
      separates consecutive stages. Features are ``stage_widths[-1][-1]``-d.
    dropout_rate: dropout on the head's input (Noisy Student's model noise
      on the classifier; ``'dropout'`` rng); returned features are before it.
  """
  stage_widths: Sequence[Sequence[int]] = ((32,), (32,), (64, 64))
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    check_images(x, type(self).__name__)
    if not self.stage_widths or not all(self.stage_widths):
      raise ValueError(f"stage_widths needs non-empty stages, got {self.stage_widths!r}.")
    conv, bn = conv_and_bn(self, train)
    for s, widths in enumerate(self.stage_widths):
      if s:
        x = max_pool_2x2(x)
      for c, features in enumerate(widths):
        name = f"stage{s + 1}_conv{c + 1}"
        x = nn.relu(bn(name=name + "_bn")(conv(features, 3, name=name)(x)))
    features = x.mean(axis=(1, 2))
    check_rate(self.dropout_rate, "dropout_rate", type(self).__name__)
    return classify(features, self.num_classes, dtype=self.dtype,
                    dropout_rate=self.dropout_rate, train=train,
                    return_features=return_features)
