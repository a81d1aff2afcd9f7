"""EfficientNet-B0/B1/B2 (Tan & Le 2019) as trained by Noisy Student (Xie et al. 2020).

Follows the TensorFlow reference of Noisy Student, google-research/noisystudent
``efficientnet_model.py`` and ``efficientnet_builder.py`` (the same network as
tensorflow/tpu ``models/official/efficientnet``):

* stem: 3x3 conv, stride 2, ``round_filters(32)`` channels, BN, swish;
* 7 stages of MBConv blocks given by the B0 table :data:`B0_BLOCKS`
  (kernel, repeats, stride, expansion, in/out channels, SE ratio 0.25), the
  channels scaled by :func:`round_filters` (width coefficient, multiples of 8)
  and the repeats by :func:`round_repeats` (depth coefficient, rounded up);
* MBConv block: [1x1 expansion conv (x expand ratio), BN, swish] - kxk depthwise
  conv (stride), BN, swish - squeeze-excitation (global mean, 1x1 conv with
  bias to ``max(1, int(in_channels * 0.25))``, swish, 1x1 conv with bias back,
  sigmoid gate) - 1x1 projection conv, BN (no activation) - when stride is 1
  and in == out channels: stochastic depth on the branch, plus the input;
* top: 1x1 conv to ``round_filters(1280)``, BN, swish, global average pool,
  dropout (``dropout_rate``), ``head`` Dense;
* BatchNorm momentum 0.99 (flax and TF share the convention), eps 1e-3, the
  running variance updated with the biased batch variance (the reference's
  ``tf.nn.moments``, not PyTorch's unbiased rule of the other models); TF
  ``'SAME'`` padding (asymmetric for stride 2 on even sizes, unlike the
  PyTorch-style models of the zoo); convs bias-free except the SE ones;
* initialisation: conv kernels ``normal(0, sqrt(2 / fan_out))`` with
  ``fan_out = k * k * out_channels`` (for the depthwise conv, whose TF kernel
  is ``[k, k, in, 1]``, ``fan_out = k * k``); the head kernel
  ``uniform(+-1/sqrt(num_classes))``; biases 0, BN scale 1 / bias 0;
* stochastic depth ("drop connect"): block ``i`` of ``N`` (0-based, over all
  blocks) drops its branch per example with probability
  ``stochastic_depth_rate * i / N`` in train mode and scales kept branches by
  ``1 / (1 - rate)`` (:func:`~jaxrobust.models.layers.stochastic_depth_rate`).
  With the default 0.2 the last of B0's 16 blocks is dropped with probability
  0.1875; blocks without an identity skip (the first of a stage whose stride or
  width changes) are never dropped.

The (width, depth, resolution, dropout) coefficients are :data:`PARAMS`:
B0 (1.0, 1.0, 224, 0.2), B1 (1.0, 1.1, 240, 0.2), B2 (1.1, 1.2, 260, 0.3). The
model accepts any input size; resizing to the resolution is the input
pipeline's job. Parameters for 1000 classes (= the reference's trainable
variables): B0 5,288,548, B1 7,794,184, B2 9,109,994; features are
``round_filters(1280)``-d (1280 for B0/B1, 1408 for B2).

**Small images.** The network downsamples by 32 (stride 2 in the stem and
in stages 2, 3, 4 and 6). A 224x224 input ends at 7x7; a 32x32 or 28x28 input
ends at 1x1 (28 -> stem 14 -> stages 14, 7, 4, 2, 2, 1, 1 with ``'SAME'`` padding),
which works but wastes most of the network. ``small_image_model=True`` is
the reference's own option for 32x32 data (its ``--small_image_model`` flag,
set for SVHN): stages 2 and 3 get stride 1 instead of 2, so the network
downsamples by 8 and a 32x32 (or 28x28) input ends at 4x4. It changes no
parameter shape, so parameter counts are the same.

Departures from the reference: the random draw of stochastic depth is a
float32 Bernoulli (the reference draws a uniform in the compute dtype, bf16 on
TPU); the ``features`` returned with ``return_features=True`` are the pooled
features *before* the head dropout (the reference's ``global_pool`` endpoint
is after it; they agree in eval mode); the reference's fine-tuning options
(``fix_layer_num``, adversarial BN) are not reproduced.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import flax.linen as nn
import jax

from jaxrobust.models.layers import (Dtype, ImageClassifier, StochasticDepth, batch_norm,
                                     check_images, check_rate, classify, stochastic_depth_rate,
                                     torch_conv_init)
from jaxrobust.models.registry import register_model

# The reference's conv_kernel_initializer: normal(0, sqrt(2 / fan_out)) with
# fan_out = kh * kw * out_channels; the same rule as the PyTorch models' convs.
conv_init = torch_conv_init
# Its depthwise kernel is [k, k, C, 1] in TF (fan_out = k * k); flax stores it
# as [k, k, 1, C], where k * k is the fan-in.
depthwise_init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# The reference's dense_kernel_initializer: uniform(+-1/sqrt(out_features)).
dense_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
DEPTH_DIVISOR = 8

#: Name -> (width_coefficient, depth_coefficient, resolution, dropout_rate), as
#: efficientnet_builder.efficientnet_params. Only B0-B2 are registered (and
#: tested); the others can be built with ``efficientnet`` and their coefficients.
PARAMS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
    "efficientnet_l2": (4.3, 5.3, 800, 0.5),
}


class BlockArgs(NamedTuple):
  """One stage of the block table (the reference's ``BlockArgs``)."""
  kernel_size: int
  num_repeat: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int
  se_ratio: float


#: The B0 block table (efficientnet_builder.efficientnet:
#: 'r1_k3_s11_e1_i32_o16_se0.25', ...).
B0_BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(3, 1, 1, 1, 32, 16, 0.25),
    BlockArgs(3, 2, 2, 6, 16, 24, 0.25),
    BlockArgs(5, 2, 2, 6, 24, 40, 0.25),
    BlockArgs(3, 3, 2, 6, 40, 80, 0.25),
    BlockArgs(5, 3, 1, 6, 80, 112, 0.25),
    BlockArgs(5, 4, 2, 6, 112, 192, 0.25),
    BlockArgs(3, 1, 1, 6, 192, 320, 0.25),
)
# Stages whose stride ``small_image_model`` sets to 1 (the reference's
# blocks_args[1] and [2]).
SMALL_IMAGE_STAGES = (1, 2)


def round_filters(filters: int, width_coefficient: float, divisor: int = DEPTH_DIVISOR) -> int:
  """Channels scaled by ``width_coefficient``, rounded to a multiple of
  ``divisor`` (never below it, never more than 10% down), as the reference."""
  scaled = filters * width_coefficient
  new_filters = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new_filters < 0.9 * scaled:
    new_filters += divisor
  return new_filters


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  """Blocks of a stage scaled by ``depth_coefficient``, rounded up."""
  return int(math.ceil(depth_coefficient * repeats))


def block_table(width_coefficient: float, depth_coefficient: float,
                small_image_model: bool = False) -> list[BlockArgs]:
  """Every MBConv block in order (``num_repeat`` 1 each), channels and
  repeats scaled as the reference's ``Model._build``: the first block of a
  stage has its stride and input width, the others stride 1 and in == out."""
  blocks = []
  for s, args in enumerate(B0_BLOCKS):
    stride = 1 if small_image_model and s in SMALL_IMAGE_STAGES else args.stride
    in_f = round_filters(args.input_filters, width_coefficient)
    out_f = round_filters(args.output_filters, width_coefficient)
    for r in range(round_repeats(args.num_repeat, depth_coefficient)):
      blocks.append(args._replace(num_repeat=1, stride=stride if r == 0 else 1,
                                  input_filters=in_f if r == 0 else out_f,
                                  output_filters=out_f))
  return blocks


def _conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, use_bias: bool = False,
          depthwise: bool = False, name: str) -> nn.Conv:
  """A TF-``'SAME'``-padded conv with the reference's initialisation."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 use_bias=use_bias, feature_group_count=features if depthwise else 1,
                 kernel_init=depthwise_init if depthwise else conv_init, dtype=dtype, name=name)


def _bn(module: nn.Module, train: bool):
  return functools.partial(batch_norm, train, dtype=module.dtype, axis_name=module.bn_axis_name,
                           momentum=BN_MOMENTUM, epsilon=BN_EPSILON, running_variance="biased")


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck with squeeze-excitation (the reference's
  ``MBConvBlock``); ``drop_rate``: its stochastic-depth rate."""
  kernel_size: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int
  se_ratio: float
  drop_rate: float
  dtype: Dtype
  bn_axis_name: str | None

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
    if inputs.shape[-1] != self.input_filters:
      raise ValueError(f"MBConvBlock expects {self.input_filters} input channels, "
                       f"got {inputs.shape[-1]}.")
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = _bn(self, train)
    filters = self.input_filters * self.expand_ratio
    x = inputs
    if self.expand_ratio != 1:
      x = nn.swish(bn(name="expand_bn")(conv(filters, 1, name="expand_conv")(x)))
    x = conv(filters, self.kernel_size, self.stride, depthwise=True, name="depthwise_conv")(x)
    x = nn.swish(bn(name="depthwise_bn")(x))
    if 0 < self.se_ratio <= 1:
      reduced = max(1, int(self.input_filters * self.se_ratio))
      s = x.mean(axis=(1, 2), keepdims=True)
      s = nn.swish(conv(reduced, 1, use_bias=True, name="se_reduce")(s))
      s = conv(filters, 1, use_bias=True, name="se_expand")(s)
      x = nn.sigmoid(s) * x
    x = bn(name="project_bn")(conv(self.output_filters, 1, name="project_conv")(x))
    if self.stride == 1 and self.input_filters == self.output_filters:
      if self.drop_rate > 0:
        x = StochasticDepth(self.drop_rate, name="stochastic_depth")(x, deterministic=not train)
      x = x + inputs
    return x


@register_model("efficientnet")
@register_model("efficientnet_b0", width_coefficient=1.0, depth_coefficient=1.0)
@register_model("efficientnet_b1", width_coefficient=1.0, depth_coefficient=1.1)
@register_model("efficientnet_b2", width_coefficient=1.1, depth_coefficient=1.2)
class EfficientNet(ImageClassifier):
  """EfficientNet with the B0 block table scaled by width and depth coefficients.

  Attributes:
    width_coefficient: channel multiplier (B0 1.0, B1 1.0, B2 1.1).
    depth_coefficient: block-count multiplier (B0 1.0, B1 1.1, B2 1.2).
    dropout_rate: dropout before the ``head`` (``'dropout'`` rng, train mode).
      ``None`` (default): the reference's rate for these coefficients in
      :data:`PARAMS` (B0 0.2, B1 0.2, B2 0.3), else 0.2 (the reference
      builder's default).
    stochastic_depth_rate: in [0, 1); block ``i`` of ``N`` drops its residual
      branch with probability ``rate * i / N`` in train mode (``'dropout'``
      rng). 0.2, the reference's default; 0 disables it.
    small_image_model: stride 1 in stages 2 and 3 (total stride 8 instead of
      32), the reference's option for 32x32 images; see the module docstring.
  """
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float | None = None
  stochastic_depth_rate: float = 0.2
  small_image_model: bool = False

  def head_dropout_rate(self) -> float:
    """``dropout_rate``, or the reference's rate for these coefficients."""
    if self.dropout_rate is not None:
      return self.dropout_rate
    for width, depth, _, rate in PARAMS.values():
      if (width, depth) == (self.width_coefficient, self.depth_coefficient):
        return rate
    return 0.2

  def _check(self) -> None:
    name = type(self).__name__
    for attr in ("width_coefficient", "depth_coefficient"):
      v = getattr(self, attr)
      if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
        raise ValueError(f"{name} {attr} must be a positive number, got {v!r}.")
    check_rate(self.head_dropout_rate(), "dropout_rate", name)
    check_rate(self.stochastic_depth_rate, "stochastic_depth_rate", name)
    if not isinstance(self.small_image_model, bool):
      raise ValueError(f"{name} small_image_model must be a bool, got "
                       f"{self.small_image_model!r}.")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    check_images(x, type(self).__name__)
    self._check()
    bn = _bn(self, train)
    x = _conv(round_filters(32, self.width_coefficient), 3, 2, dtype=self.dtype,
              name="stem_conv")(x)
    x = nn.swish(bn(name="stem_bn")(x))
    blocks = block_table(self.width_coefficient, self.depth_coefficient, self.small_image_model)
    for i, args in enumerate(blocks):
      x = MBConvBlock(args.kernel_size, args.stride, args.expand_ratio, args.input_filters,
                      args.output_filters, args.se_ratio,
                      stochastic_depth_rate(self.stochastic_depth_rate, i, len(blocks)),
                      self.dtype, self.bn_axis_name, name=f"blocks_{i}")(x, train)
    x = _conv(round_filters(1280, self.width_coefficient), 1, dtype=self.dtype,
              name="top_conv")(x)
    x = nn.swish(bn(name="top_bn")(x))
    features = x.mean(axis=(1, 2))
    return classify(features, self.num_classes, dtype=self.dtype,
                    return_features=return_features, kernel_init=dense_init,
                    dropout_rate=self.head_dropout_rate(), train=train)
