"""Wide Residual Network (Zagoruyko & Komodakis 2016) as used by Hendrycks et al.

Matches ``CIFAR/models/wrn.py`` of hendrycks/outlier-exposure and
hendrycks/pre-training (also used by the energy-OOD code of Liu et al. 2020):

* 3x3 stem conv to 16 channels;
* 3 groups of ``(depth - 4) / 6`` pre-activation basic blocks of widths
  16k / 32k / 64k with strides 1 / 2 / 2;
* block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus the identity,
  or, when the width changes, a 1x1 conv (stride) of the *pre-activated* input;
* final BN-ReLU, global average pool, linear ``head``;
* PyTorch initialisation (see :mod:`jaxrobust.models.layers`), head bias 0.

``stochastic_depth_rate`` (not in the reference; default 0, which leaves the
model unchanged) adds stochastic depth as Noisy Student trains its students:
block ``i`` of the ``N = 3 (depth - 4) / 6`` blocks (0-based, counted across
the groups) drops its residual branch per example with probability
``stochastic_depth_rate * i / N`` in train mode (see
:func:`~jaxrobust.models.layers.stochastic_depth_rate`); the 1x1 shortcut of a
projection block is kept.

Difference from the reference: it pools with a fixed 8x8 window (32x32 inputs
only); the global average pool here is the same on 32x32 inputs and also
accepts other sizes.

``cbam=True`` (not in the reference; default False leaves the parameter tree
unchanged) adds CBAM (:mod:`jaxrobust.models.cbam`) to every block's residual
branch; with ``return_features=True`` the model then returns ``(logits,
features, maps)``, ``maps`` naming each block's pre-sigmoid attention maps
``attention/<block>/channel`` ``[B, C]`` and ``attention/<block>/spatial``
``[B, H, W, 1]`` (outputs of the module next to ``logits`` and ``features``).
``cbam_momentum`` is the decay of CBAM's spatial BatchNorm statistics (0.99:
the reference's PyTorch momentum 0.01; ``jaxrobust.models.cbam.MOMENTUM``).

WRN-40-2 has 2,243,546 parameters for 10 classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxrobust.models.cbam import MOMENTUM as CBAM_MOMENTUM, cbam_module, collect_attention
from jaxrobust.models.layers import (ImageClassifier, PreActBasicBlock, check_images, check_rate,
                                     classify, conv_and_bn, stochastic_depth_rate)
from jaxrobust.models.registry import register_model


@register_model("wrn")
@register_model("wrn_40_2", depth=40, width=2)
@register_model("wrn_28_10", depth=28, width=10)
class WideResNet(ImageClassifier):
  """WRN-``depth``-``width`` for small images (CIFAR, 32x32 ImageNet).

  Attributes:
    depth: total depth, ``6n + 4`` (40 for WRN-40-2).
    width: widening factor k (2 for WRN-40-2).
    dropout_rate: dropout between the two convs of each block (0.3 in the
      outlier-exposure / energy fine-tuning recipes); uses the ``'dropout'`` rng.
    stochastic_depth_rate: stochastic depth, in [0, 1): block ``i`` of ``N``
      drops its residual branch with probability ``rate * i / N`` in train
      mode (``'dropout'`` rng); 0 (default) disables it.
  """
  depth: int = 40
  width: int = 2
  dropout_rate: float = 0.0
  stochastic_depth_rate: float = 0.0
  cbam: bool = False
  cbam_momentum: float = CBAM_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    check_images(x, type(self).__name__)
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {self.depth}.")
    if self.width < 1 or not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"Invalid WideResNet width={self.width} or "
                       f"dropout_rate={self.dropout_rate}.")
    check_rate(self.stochastic_depth_rate, "stochastic_depth_rate", type(self).__name__)
    conv, bn = conv_and_bn(self, train)
    x = conv(16, 3, name="stem")(x)
    n = (self.depth - 4) // 6
    maps = {}
    for g, (features, stride) in enumerate(
        [(16 * self.width, 1), (32 * self.width, 2), (64 * self.width, 2)]):
      for b in range(n):
        drop = stochastic_depth_rate(self.stochastic_depth_rate, g * n + b, 3 * n)
        name = f"group{g + 1}_block{b + 1}"
        x = PreActBasicBlock(features, stride if b == 0 else 1, self.dropout_rate,
                             self.dtype, self.bn_axis_name, drop,
                             attention=cbam_module(self.cbam, self.cbam_momentum),
                             name=name)(x, train)
        x = collect_attention(x, name, maps)
    x = nn.relu(bn(name="bn")(x))
    features = x.mean(axis=(1, 2))
    out = classify(features, self.num_classes, dtype=self.dtype,
                   return_features=return_features)
    return (*out, maps) if (return_features and self.cbam) else out
