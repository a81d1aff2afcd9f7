"""CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon, ECCV 2018).

A feature map ``F`` ``[B, H, W, C]`` is refined by channel attention, then
spatial attention::

    M_c = σ(MLP(avgpool(F)) + MLP(maxpool(F)))            [B, C]       F' = M_c ⊙ F
    M_s = σ(BN(conv7x7([max_c(F'), mean_c(F')])))          [B, H, W, 1] F'' = M_s ⊙ F'

Reference followed: Jongchan/attention-module ``MODELS/cbam.py``
(``ChannelGate`` with ``pool_types=['avg', 'max']``: a shared MLP
``Linear(C, C/r) - ReLU - Linear(C/r, C)`` with biases, reduction ``r = 16``;
``SpatialGate``: ``ChannelPool`` = concat(max, mean) over channels, a bias-free
7x7 conv to one channel with padding 3 and ``BatchNorm2d(1, eps=1e-5,
momentum=0.01)``, no ReLU, then the sigmoid) and its ``ResNet`` blocks, where
CBAM refines the residual branch before the addition. The hidden width is
``max(C // r, 1)`` (the reference's ``C // r`` is 0 for C < 16).

:class:`CBAM` returns the refined map and the two attention maps *before*
the sigmoid (``channel`` ``[B, C]``, ``spatial`` ``[B, H, W, 1]``): what A-SKD
(Shin et al. 2022, gist-ailab/teaching-where-to-look ``model/backbone.py``,
``attn_out``) distils; the gates are their sigmoids.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust.models.layers import (Dtype, batch_norm, check_rate, conv, torch_linear_bias_init,
                                     torch_linear_init)

REDUCTION = 16
KERNEL = 7
# The spatial BatchNorm's running-average decay: PyTorch's momentum=0.01. Its statistics need about
# 500 steps to settle; a run of a few hundred steps at a high learning rate ends with them far from
# the batch statistics (eval-mode accuracy collapses), so models take ``cbam_momentum``.
MOMENTUM = 0.99


class CBAM(nn.Module):
  """Channel then spatial attention; ``(refined, {'channel', 'spatial'})``."""
  reduction: int = REDUCTION
  kernel: int = KERNEL
  dtype: Dtype = None
  bn_axis_name: str | None = None
  momentum: float = MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_rate(self.momentum, "momentum (config.model.kwargs.cbam_momentum)", "CBAM")
    c = x.shape[-1]
    hidden = max(c // self.reduction, 1)
    fc1 = nn.Dense(hidden, dtype=self.dtype, kernel_init=torch_linear_init,
                   bias_init=torch_linear_bias_init(c), name="channel_fc1")
    fc2 = nn.Dense(c, dtype=self.dtype, kernel_init=torch_linear_init,
                   bias_init=torch_linear_bias_init(hidden), name="channel_fc2")
    mlp = lambda v: fc2(nn.relu(fc1(v)))
    channel = mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2)))  # [B, C]
    x = x * jax.nn.sigmoid(channel)[:, None, None, :].astype(x.dtype)
    pooled = jnp.concatenate([x.max(axis=-1, keepdims=True), x.mean(axis=-1, keepdims=True)], -1)
    spatial = conv(1, self.kernel, dtype=self.dtype, name="spatial_conv")(pooled)
    spatial = batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name,
                         momentum=self.momentum, name="spatial_bn")(spatial)  # [B, H, W, 1]
    x = x * jax.nn.sigmoid(spatial).astype(x.dtype)
    up = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return x, {"channel": up(channel), "spatial": up(spatial)}


def cbam_module(enabled: bool, momentum: float = MOMENTUM):
  """The ``attention`` module class of a residual block: CBAM with the
  spatial BatchNorm's decay ``momentum`` when ``enabled``, else None."""
  return functools.partial(CBAM, momentum=momentum) if enabled else None


def output_key(block: str, kind: str) -> str:
  """The model output name of a block's attention map (``attention/<block>/<kind>``)."""
  return f"attention/{block}/{kind}"


def collect_attention(out, block: str, maps: dict[str, jax.Array]) -> jax.Array:
  """A block's output; when it returns attention maps (``cbam=True``) they go
  into ``maps``, with the block's output as ``activation/<block>`` (for
  attention transfer, Zagoruyko & Komodakis 2017)."""
  if isinstance(out, tuple):
    out, attention = out
    for kind, value in attention.items():
      maps[output_key(block, kind)] = value
    maps[f"activation/{block}"] = out
  return out
