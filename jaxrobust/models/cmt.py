"""CMT (Guo et al., CVPR 2022, "CMT: Convolutional Neural Networks Meet Vision Transformers").

Follows the authors' PyTorch code, huawei-noah/Efficient-AI-Backbones
``cmt_pytorch/cmt.py`` (classes ``CMT``, ``Block``, ``Attention``, ``Mlp``,
``PatchEmbed``; presets ``cmt_ti``, ``cmt_xs``, ``cmt_s``, ``cmt_b``):

* stem: 3x3 conv (stride 2, bias) - GELU - BN, then twice 3x3 conv (stride 1)
  - GELU - BN, ``stem_channels`` wide (activation *before* BN, as the code);
* 4 stages, each a patch aggregation (2x2 conv of stride 2 with bias, then
  LayerNorm, eps 1e-5) and ``depths[s]`` CMT blocks of width ``embed_dims[s]``
  with ``heads = (1, 2, 4, 8)`` and key/value reduction ``k = (8, 4, 2, 1)``;
* CMT block: LPU ``x = x + dwconv3x3(x)`` (no stochastic depth on it);
  ``x = x + drop_path(LMHSA(LN(x)))``; ``x = x + drop_path(IRFFN(LN(x)))``
  (LayerNorm eps 1e-6; the two drop-paths draw independently);
* LMHSA: ``q = Linear(x)``; keys and values from ``x`` reduced by a ``k x k``
  depth-wise conv of stride ``k`` (with bias) and BN when ``k > 1``
  (``k = Linear``, ``v = Linear``, all with bias); ``softmax(q k^T /
  sqrt(d) + B) v``, then a Linear projection;
* IRFFN: 1x1 conv to ``int(dim * R)`` - GELU - BN; 3x3 depth-wise conv plus
  its input; GELU - BN; 1x1 conv back to ``dim`` - BN (all convs with bias);
* top: 1x1 conv to 1280 (bias) - BN - swish - global average pool - dropout
  (0.1; 0.3 for CMT-B) - ``head`` Linear. ``features`` are the pooled 1280-d
  vector before the dropout (the same in eval mode).

Variants (``VARIANTS``, checked against the code's presets): Ti dims
46/92/184/368, depths 2/2/10/2, R 3.6, stem 16; XS 52/104/208/416, 3/3/12/3,
R 3.77 (the paper's Table 1 rounds it to 3.8), stem 16; S 64/128/256/512,
3/3/16/3, R 4, stem 32; B 76/152/304/608, 4/4/20/4, R 4, stem 38.

**Relative position bias.** The paper describes ``B`` as a relative position
bias; the code learns a *free* table per stage of shape ``[heads, N, N / k^2]``
(``N`` tokens of the stage, ``N / k^2`` reduced keys), initialised N(0, 1),
**shared by all blocks of the stage** and added to the scaled attention logits
before the softmax. This module follows the code: ``params['relative_pos_a']``
... ``['relative_pos_d']``. The tables' shapes depend on the input size, so a
model is initialised at the resolution it will be used at (the paper's:
``VARIANTS`` ``resolution``, Ti 160, XS 192, S 224, B 256) and an input of
another size raises a ``ValueError`` naming the model, the input size and the
size the tables were built for. Parameters for 1000 classes at those resolutions, equal to the
reference code's (counted with its ``cmt_*`` builders), with the paper's Table
1 in brackets: Ti 9,492,426 (9.49M), XS 15,247,208 (15.24M), S 26,256,160
(25.14M: **the code's CMT-S is 4.4% larger than the paper's figure**; the
preset -- dims, depths, R 4, stem 32 -- is the code's, and no variation of
it we tried gives 25.14M), B 45,715,076 (45.72M).

**32x32 inputs.** The network downsamples by 32 (a 32x32 input ends at 1x1 and
the first stage's keys are one token). ``stem_stride=1`` (registered as
``cmt_ti_32``: CMT-Ti with a stride-1 stem) downsamples by 16: a 32x32 input
gives token grids 16x16, 8x8, 4x4 and 2x2 and 2x2 = 4 reduced keys in every
stage; its parameter shapes differ from CMT-Ti's only in the position tables.
Inputs must be multiples of 32 (16 with ``stem_stride=1``).

Departures from the reference: stochastic depth follows the zoo's rule (block
``i`` of ``N`` over all stages drops with probability ``rate * i / N``,
:func:`~jaxrobust.models.layers.stochastic_depth_rate`; the code uses
``torch.linspace(0, rate, N)``, i.e. ``rate * i / (N - 1)``); its default
rates are the training commands' ``--drop-path`` of the README (Ti 0.1, XS
0.08, S 0.1, B 0.25). Linear and head weights are drawn N(0, 0.02) (timm's
``trunc_normal_(std=.02)`` truncates at +-2, i.e. +-100 std: the same in
practice); convolutions ``normal(0, sqrt(2 / fan_out))`` as the code's
``kaiming_normal_(mode='fan_out')`` (depth-wise included, PyTorch's fan-out
of a ``[C, 1, k, k]`` weight being ``C k^2``). The code's unused options
(``qk_ratio``, attention/projection dropout, ``representation_size``) are left
out; the softmax is computed in float32 under ``dtype=bfloat16``. BatchNorm is
the zoo's PyTorch-convention :class:`~jaxrobust.models.layers.BatchNorm`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust.models.layers import (Dtype, ImageClassifier, StochasticDepth, batch_norm,
                                     check_images, check_rate, classify, stochastic_depth_rate,
                                     torch_conv_init)
from jaxrobust.models.registry import register_model

NUM_HEADS = (1, 2, 4, 8)
SR_RATIOS = (8, 4, 2, 1)
FC_DIM = 1280
STAGES = "abcd"  # the reference's suffixes: patch_embed_a, blocks_a, relative_pos_a, ...

# timm trunc_normal_(std=.02) (truncated at +-2 absolute, +-100 std).
linear_init = nn.initializers.normal(0.02)
relative_pos_init = nn.initializers.normal(1.0)  # torch.randn
gelu = functools.partial(nn.gelu, approximate=False)  # torch nn.GELU()


class Variant(NamedTuple):
  """One preset of the reference (``cmt_ti``, ...) plus its training settings."""
  embed_dims: tuple[int, int, int, int]
  depths: tuple[int, int, int, int]
  mlp_ratio: float
  stem_channels: int
  resolution: int  # the paper's input size
  drop_path: float  # README training command's --drop-path
  dropout: float  # the model's ``dp`` (dropout before the head)
  params_paper: float  # Table 1, millions, 1000 classes, at ``resolution``


VARIANTS: dict[str, Variant] = {
    "ti": Variant((46, 92, 184, 368), (2, 2, 10, 2), 3.6, 16, 160, 0.1, 0.1, 9.49),
    "xs": Variant((52, 104, 208, 416), (3, 3, 12, 3), 3.77, 16, 192, 0.08, 0.1, 15.24),
    "s": Variant((64, 128, 256, 512), (3, 3, 16, 3), 4.0, 32, 224, 0.1, 0.1, 25.14),
    "b": Variant((76, 152, 304, 608), (4, 4, 20, 4), 4.0, 38, 256, 0.25, 0.3, 45.72),
}


def _conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, depthwise: bool = False,
          padding: str | None = None, name: str) -> nn.Conv:
  """A PyTorch-padded conv with bias (zero) and ``kaiming_normal_(fan_out)``."""
  pad = padding or ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, use_bias=True,
                 feature_group_count=features if depthwise else 1, kernel_init=torch_conv_init,
                 dtype=dtype, name=name)


def _bn(module: nn.Module, train: bool):
  return functools.partial(batch_norm, train, dtype=module.dtype, axis_name=module.bn_axis_name)


class Attention(nn.Module):
  """LMHSA (the reference's ``Attention``) on NHWC tokens ``[B, h, w, C]``;
  ``relative_pos``: the stage's ``[heads, h * w, (h // k) * (w // k)]`` table."""
  num_heads: int
  sr_ratio: int
  dtype: Dtype
  bn_axis_name: str | None

  @nn.compact
  def __call__(self, x: jax.Array, relative_pos: jax.Array, train: bool) -> jax.Array:
    b, h, w, c = x.shape
    heads, d = self.num_heads, c // self.num_heads
    dense = functools.partial(nn.Dense, c, dtype=self.dtype, kernel_init=linear_init)
    tokens = x.reshape(b, h * w, c)
    q = dense(name="q")(tokens).reshape(b, h * w, heads, d)
    if self.sr_ratio > 1:
      kv = _conv(c, self.sr_ratio, self.sr_ratio, dtype=self.dtype, depthwise=True,
                 padding="VALID", name="sr")(x)
      kv = _bn(self, train)(name="sr_bn")(kv).reshape(b, -1, c)
    else:
      kv = tokens
    k = dense(name="k")(kv).reshape(b, -1, heads, d)
    v = dense(name="v")(kv).reshape(b, -1, heads, d)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * jnp.asarray(d ** -0.5, q.dtype)
    wide = jnp.promote_types(logits.dtype, jnp.float32)  # softmax in >= float32
    logits = logits.astype(wide) + relative_pos.astype(wide)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, h * w, c)
    return dense(name="proj")(out).reshape(b, h, w, c)


class IRFFN(nn.Module):
  """Inverted residual feed-forward network (the reference's ``Mlp``)."""
  hidden: int
  dtype: Dtype
  bn_axis_name: str | None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = _bn(self, train)
    y = bn(name="conv1_bn")(gelu(conv(self.hidden, 1, name="conv1")(x)))
    y = conv(self.hidden, 3, depthwise=True, name="proj")(y) + y
    y = bn(name="proj_bn")(gelu(y))
    return bn(name="conv2_bn")(conv(x.shape[-1], 1, name="conv2")(y))


class CMTBlock(nn.Module):
  """LPU, LMHSA and IRFFN with residuals (the reference's ``Block``);
  ``drop_rate``: its stochastic-depth rate (both branches, separate draws)."""
  num_heads: int
  sr_ratio: int
  mlp_ratio: float
  drop_rate: float
  dtype: Dtype
  bn_axis_name: str | None

  @nn.compact
  def __call__(self, x: jax.Array, relative_pos: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    x = _conv(c, 3, dtype=self.dtype, depthwise=True, name="lpu")(x) + x
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    y = Attention(self.num_heads, self.sr_ratio, self.dtype, self.bn_axis_name,
                  name="attn")(norm(name="norm1")(x), relative_pos, train)
    if self.drop_rate > 0:
      y = StochasticDepth(self.drop_rate, name="drop_path1")(y, deterministic=not train)
    x = x + y
    y = IRFFN(int(c * self.mlp_ratio), self.dtype, self.bn_axis_name,
              name="mlp")(norm(name="norm2")(x), train)
    if self.drop_rate > 0:
      y = StochasticDepth(self.drop_rate, name="drop_path2")(y, deterministic=not train)
    return x + y


@register_model("cmt")
@register_model("cmt_ti", variant="ti")
@register_model("cmt_xs", variant="xs")
@register_model("cmt_s", variant="s")
@register_model("cmt_b", variant="b")
@register_model("cmt_ti_32", variant="ti", stem_stride=1)
class CMT(ImageClassifier):
  """CMT-Ti/XS/S/B; see the module docstring.

  Attributes:
    variant: ``'ti'``, ``'xs'``, ``'s'`` or ``'b'`` (``VARIANTS``).
    stem_stride: stride of the first stem conv: 2 (the paper; total stride
      32) or 1 (for 32x32 inputs; total stride 16).
    dropout_rate: dropout before the ``head`` (``'dropout'`` rng, train
      mode); ``None``: the reference's (0.1; 0.3 for CMT-B).
    stochastic_depth_rate: in [0, 1); block ``i`` of ``N`` drops each of its
      two residual branches with probability ``rate * i / N`` in train mode
      (``'dropout'`` rng); ``None``: the reference's training rate (Ti 0.1,
      XS 0.08, S 0.1, B 0.25); 0 disables it.
  """
  variant: str = "ti"
  stem_stride: int = 2
  dropout_rate: float | None = None
  stochastic_depth_rate: float | None = None

  def config(self) -> Variant:
    if self.variant not in VARIANTS:
      raise ValueError(f"CMT variant must be one of {sorted(VARIANTS)}, got {self.variant!r}.")
    return VARIANTS[self.variant]

  def label(self) -> str:
    """How errors name the model (its registry name when it has one)."""
    if self.stem_stride == 1 and self.variant == "ti":
      return "cmt_ti_32"
    suffix = "" if self.stem_stride == 2 else f" with stem_stride={self.stem_stride}"
    return f"cmt_{self.variant}{suffix}"

  def _check(self, x: jax.Array) -> None:
    name = type(self).__name__
    cfg = self.config()
    if self.stem_stride not in (1, 2) or isinstance(self.stem_stride, bool):
      raise ValueError(f"{name} stem_stride must be 1 or 2, got {self.stem_stride!r}.")
    check_rate(cfg.dropout if self.dropout_rate is None else self.dropout_rate,
               "dropout_rate", name)
    check_rate(cfg.drop_path if self.stochastic_depth_rate is None
               else self.stochastic_depth_rate, "stochastic_depth_rate", name)
    stride = 16 * self.stem_stride
    _, height, width, _ = x.shape
    if height % stride or width % stride:
      raise ValueError(
          f"{self.label()} needs input height and width that are multiples of {stride} "
          f"(a stride-{self.stem_stride} stem and four 2x2 patch aggregations, and a "
          f"{SR_RATIOS[0]}x{SR_RATIOS[0]} key reduction in the first stage); got a "
          f"{height}x{width} input.")

  def _relative_pos(self, stage: int, h: int, w: int, x_shape: tuple[int, ...]) -> jax.Array:
    """The stage's position table, after checking that it fits this input."""
    name = f"relative_pos_{STAGES[stage]}"
    sr = SR_RATIOS[stage]
    shape = (NUM_HEADS[stage], h * w, (h // sr) * (w // sr))
    if self.has_variable("params", name):
      stored = tuple(self.get_variable("params", name).shape)
      if stored != shape:
        built = stored[1] if stage == 0 else None
        side = math.isqrt(built) if built else 0
        for_size = (f" ({side * 2 * self.stem_stride}x{side * 2 * self.stem_stride} inputs)"
                    if built and side * side == built else "")
        raise ValueError(
            f"{self.label()}: the relative-position table params['{name}'] has shape "
            f"{stored}, built for a model initialised at another input size{for_size}; this "
            f"{x_shape[1]}x{x_shape[2]} input needs {shape}. CMT's position tables depend on "
            f"the input size: initialise the model at the size it is used at (the paper's "
            f"{self.config().resolution}x{self.config().resolution} for "
            f"cmt_{self.variant}) or resize the inputs.")
    return self.param(name, relative_pos_init, shape, jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    check_images(x, type(self).__name__)
    self._check(x)
    cfg = self.config()
    rate = cfg.drop_path if self.stochastic_depth_rate is None else self.stochastic_depth_rate
    dropout = cfg.dropout if self.dropout_rate is None else self.dropout_rate
    bn = _bn(self, train)
    in_shape = tuple(x.shape)
    for i in range(3):
      x = _conv(cfg.stem_channels, 3, self.stem_stride if i == 0 else 1, dtype=self.dtype,
                name=f"stem_conv{i + 1}")(x)
      x = bn(name=f"stem_norm{i + 1}")(gelu(x))
    total = sum(cfg.depths)
    index = 0
    for s, (dim, depth) in enumerate(zip(cfg.embed_dims, cfg.depths)):
      letter = STAGES[s]
      x = _conv(dim, 2, 2, dtype=self.dtype, padding="VALID", name=f"patch_embed_{letter}")(x)
      x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f"patch_embed_{letter}_norm")(x)
      relative_pos = self._relative_pos(s, x.shape[1], x.shape[2], in_shape)
      for j in range(depth):
        x = CMTBlock(NUM_HEADS[s], SR_RATIOS[s], cfg.mlp_ratio,
                     stochastic_depth_rate(rate, index, total), self.dtype, self.bn_axis_name,
                     name=f"blocks_{letter}_{j}")(x, relative_pos, train)
        index += 1
    x = _conv(FC_DIM, 1, dtype=self.dtype, name="fc")(x)
    x = nn.swish(bn(name="fc_bn")(x))
    features = x.mean(axis=(1, 2))
    return classify(features, self.num_classes, dtype=self.dtype,
                    return_features=return_features, kernel_init=linear_init,
                    dropout_rate=dropout, train=train)
