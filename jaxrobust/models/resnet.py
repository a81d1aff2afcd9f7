"""ResNets: pre-activation ResNet-18 (CIFAR) and ImageNet ResNet-50 (torchvision v1.5).

``preact_resnet18`` follows He et al. 2016, "Identity Mappings in Deep Residual
Networks", CIFAR variant as in kuangliu/pytorch-cifar ``PreActResNet18``: 3x3
stem conv to 64 channels (no max-pool), stages of [2, 2, 2, 2] pre-activation
basic blocks of widths 64/128/256/512 with strides 1/2/2/2, a 1x1 projection
of the pre-activated input when the shape changes. The paper adds a final
BN-ReLU after the last addition (``final_norm=True``, the default, 11,172,170
parameters for 10 classes); pytorch-cifar omits it (``final_norm=False``,
11,171,146 parameters).

``resnet50`` is torchvision's ``resnet50`` (the "v1.5" layout, stride on the
3x3 conv of the bottleneck): 7x7/2 stem conv, BN-ReLU, 3x3/2 max-pool, stages
of [3, 4, 6, 3] bottlenecks (1x1, 3x3, 1x1 with expansion 4), a 1x1 conv + BN
projection shortcut, global average pool to 2048-d features and the ``head``.
25,557,032 parameters for 1000 classes. ``zero_init_residual`` sets the last
BN scale of every bottleneck to 0, torchvision's option of the same name.

Initialisation follows torchvision: convs ``normal(0, sqrt(2 / fan_out))``, BN
scale 1 / bias 0, linear weight and bias ``uniform(+-1/sqrt(fan_in))``.

Both take ``stochastic_depth_rate`` (default 0: the models above, unchanged):
in train mode block ``i`` of the ``N`` blocks (0-based, counted across the
stages; N = 8 and 16) drops its residual branch per example with probability
``stochastic_depth_rate * i / N``, the rule of Noisy Student / EfficientNet
(:func:`~jaxrobust.models.layers.stochastic_depth_rate`); projection shortcuts
are kept. For the bottleneck the branch is dropped after its last BN, before
the addition and the final ReLU, as timm's ResNet ``drop_path``.

Both take ``cbam`` (default False: the parameter tree above, unchanged): CBAM
(:mod:`jaxrobust.models.cbam`) on every block's residual branch before the
addition (after the bottleneck's last BN, as Jongchan/attention-module's
``ResNet``), and ``return_features=True`` returns ``(logits, features, maps)``
with the pre-sigmoid maps ``attention/<block>/channel`` and
``attention/<block>/spatial``. ``cbam_momentum`` is the decay of CBAM's spatial
BatchNorm statistics (0.99: the reference's PyTorch momentum 0.01).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxrobust.models.cbam import MOMENTUM as CBAM_MOMENTUM, cbam_module, collect_attention
from jaxrobust.models.layers import (Dtype, ImageClassifier, PreActBasicBlock, StochasticDepth,
                                     check_images, check_rate, classify, conv_and_bn,
                                     stochastic_depth_rate, torch_linear_bias_init)
from jaxrobust.models.registry import register_model


@register_model("preact_resnet18")
class PreActResNet18(ImageClassifier):
  """Pre-activation ResNet-18 for 32x32 inputs; 512-d features.

  Attributes:
    final_norm: BN-ReLU after the last block, as in He et al. 2016 (True) or
      not, as in pytorch-cifar (False).
    stochastic_depth_rate: in [0, 1); block ``i`` of 8 drops its residual
      branch with probability ``rate * i / 8`` in train mode (``'dropout'``
      rng); 0 (default) disables it.
  """
  final_norm: bool = True
  stochastic_depth_rate: float = 0.0
  cbam: bool = False
  cbam_momentum: float = CBAM_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    check_images(x, type(self).__name__)
    check_rate(self.stochastic_depth_rate, "stochastic_depth_rate", type(self).__name__)
    conv, bn = conv_and_bn(self, train)
    x = conv(64, 3, name="stem")(x)
    maps = {}
    for s, (features, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
      for b in range(2):
        drop = stochastic_depth_rate(self.stochastic_depth_rate, 2 * s + b, 8)
        name = f"stage{s + 1}_block{b + 1}"
        x = PreActBasicBlock(features, stride if b == 0 else 1, 0.0, self.dtype,
                             self.bn_axis_name, drop,
                             attention=cbam_module(self.cbam, self.cbam_momentum),
                             name=name)(x, train)
        x = collect_attention(x, name, maps)
    if self.final_norm:
      x = nn.relu(bn(name="bn")(x))
    features = x.mean(axis=(1, 2))
    out = classify(features, self.num_classes, dtype=self.dtype,
                   return_features=return_features,
                   bias_init=torch_linear_bias_init(features.shape[-1]))
    return (*out, maps) if (return_features and self.cbam) else out


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: 1x1, 3x3(stride), 1x1 (x4), each conv-BN;
  ``drop_rate > 0``: :class:`~jaxrobust.models.layers.StochasticDepth` on the branch in train mode."""
  width: int
  stride: int
  zero_init_residual: bool
  dtype: Dtype
  bn_axis_name: str | None
  drop_rate: float = 0.0
  attention: Any = None  # as PreActBasicBlock's: a CBAM class (cbam_module) or None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    conv, bn = conv_and_bn(self, train)
    out_features = 4 * self.width
    y = nn.relu(bn(name="bn1")(conv(self.width, 1, name="conv1")(x)))
    y = nn.relu(bn(name="bn2")(conv(self.width, 3, self.stride, name="conv2")(y)))
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = bn(name="bn3", scale_init=last_scale)(conv(out_features, 1, name="conv3")(y))
    maps = None
    if self.attention is not None:
      y, maps = self.attention(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                               name="cbam")(y, train)
    if self.drop_rate > 0:
      y = StochasticDepth(self.drop_rate, name="stochastic_depth")(y, deterministic=not train)
    if x.shape[-1] != out_features or self.stride != 1:
      x = bn(name="downsample_bn")(conv(out_features, 1, self.stride, name="downsample_conv")(x))
    out = nn.relu(x + y)
    return out if maps is None else (out, maps)


@register_model("resnet50")
class ResNet50(ImageClassifier):
  """ImageNet ResNet-50 (torchvision layout); 2048-d features.

  Attributes:
    zero_init_residual: initialise the last BN scale of each bottleneck to 0.
    stochastic_depth_rate: in [0, 1); block ``i`` of the ``n = sum(layers)``
      (16 for ResNet-50) drops its residual branch with probability
      ``rate * i / n`` in train mode (``'dropout'`` rng); 0 (default)
      disables it.
    layers: bottleneck blocks per stage, torchvision's ``ResNet(Bottleneck,
      layers)``: ``(3, 4, 6, 3)`` is ResNet-50 (the default), ``(3, 4, 23,
      3)`` ResNet-101; fewer blocks keep every code path (the tests' mock-data
      runs use ``(1, 1, 1, 1)``).
  """
  zero_init_residual: bool = False
  stochastic_depth_rate: float = 0.0
  layers: tuple[int, ...] = (3, 4, 6, 3)
  cbam: bool = False
  cbam_momentum: float = CBAM_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    check_images(x, type(self).__name__)
    check_rate(self.stochastic_depth_rate, "stochastic_depth_rate", type(self).__name__)
    conv, bn = conv_and_bn(self, train)
    x = nn.relu(bn(name="bn1")(conv(64, 7, 2, name="conv1")(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    layers = tuple(self.layers)
    if len(layers) != 4 or any(int(n) != n or n < 1 for n in layers):
      raise ValueError(f"{type(self).__name__}: layers must be four block counts >= 1, e.g. "
                       f"(3, 4, 6, 3) (config.model.kwargs.layers), got {self.layers!r}.")
    stages = [(64, layers[0], 1), (128, layers[1], 2), (256, layers[2], 2), (512, layers[3], 2)]
    num_blocks, index, maps = sum(blocks for _, blocks, _ in stages), 0, {}
    for s, (width, blocks, stride) in enumerate(stages):
      for b in range(blocks):
        drop = stochastic_depth_rate(self.stochastic_depth_rate, index, num_blocks)
        name = f"layer{s + 1}_block{b + 1}"
        x = Bottleneck(width, stride if b == 0 else 1, self.zero_init_residual, self.dtype,
                       self.bn_axis_name, drop,
                       attention=cbam_module(self.cbam, self.cbam_momentum), name=name)(x, train)
        x = collect_attention(x, name, maps)
        index += 1
    features = x.mean(axis=(1, 2))
    out = classify(features, self.num_classes, dtype=self.dtype,
                   return_features=return_features,
                   bias_init=torch_linear_bias_init(features.shape[-1]))
    return (*out, maps) if (return_features and self.cbam) else out
