"""A small PyTorch port of one CMT block of the reference code
(huawei-noah/Efficient-AI-Backbones ``cmt_pytorch/cmt.py``: ``Block``,
``Attention``, ``Mlp``), written for the parity test of
:mod:`jaxrobust.models.cmt`, and the copy of a flax ``CMTBlock``'s variables
into it. Tokens are ``[B, N, C]`` in row-major (h, w) order, as the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchMlp(nn.Module):
  """IRFFN: 1x1-GELU-BN, depth-wise 3x3 + residual, GELU-BN, 1x1-BN."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.conv1 = nn.Conv2d(dim, hidden, 1)
    self.conv1_bn = nn.BatchNorm2d(hidden)
    self.proj = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
    self.proj_bn = nn.BatchNorm2d(hidden)
    self.conv2 = nn.Conv2d(hidden, dim, 1)
    self.conv2_bn = nn.BatchNorm2d(dim)

  def forward(self, x, h, w):
    b, n, c = x.shape
    x = x.permute(0, 2, 1).reshape(b, c, h, w)
    x = self.conv1_bn(nn.functional.gelu(self.conv1(x)))
    x = self.proj(x) + x
    x = self.proj_bn(nn.functional.gelu(x))
    x = self.conv2_bn(self.conv2(x))
    return x.flatten(2).permute(0, 2, 1)


class TorchAttention(nn.Module):
  """LMHSA with a k x k depth-wise key/value reduction and an additive bias."""

  def __init__(self, dim: int, heads: int, sr: int):
    super().__init__()
    self.heads, self.sr = heads, sr
    self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
    if sr > 1:
      self.sr_conv = nn.Conv2d(dim, dim, sr, sr, groups=dim)
      self.sr_bn = nn.BatchNorm2d(dim)

  def forward(self, x, h, w, relative_pos):
    b, n, c = x.shape
    d = c // self.heads
    q = self.q(x).reshape(b, n, self.heads, d).permute(0, 2, 1, 3)
    kv = x
    if self.sr > 1:
      kv = self.sr_bn(self.sr_conv(x.permute(0, 2, 1).reshape(b, c, h, w)))
      kv = kv.reshape(b, c, -1).permute(0, 2, 1)
    k = self.k(kv).reshape(b, -1, self.heads, d).permute(0, 2, 1, 3)
    v = self.v(kv).reshape(b, -1, self.heads, d).permute(0, 2, 1, 3)
    attn = (q @ k.transpose(-2, -1)) * d ** -0.5 + relative_pos
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TorchBlock(nn.Module):
  """LPU, then LN-LMHSA and LN-IRFFN with residuals (no drop path)."""

  def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: float):
    super().__init__()
    self.lpu = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = TorchAttention(dim, heads, sr)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = TorchMlp(dim, int(dim * mlp_ratio))

  def forward(self, x, h, w, relative_pos):
    b, n, c = x.shape
    feat = x.permute(0, 2, 1).reshape(b, c, h, w)
    x = (self.lpu(feat) + feat).flatten(2).permute(0, 2, 1)
    x = x + self.attn(self.norm1(x), h, w, relative_pos)
    return x + self.mlp(self.norm2(x), h, w)


def _t(a) -> torch.Tensor:
  return torch.tensor(np.asarray(a, np.float64))


def load_block(block: TorchBlock, params, batch_stats) -> None:
  """Copies a flax ``CMTBlock``'s ``params``/``batch_stats`` into ``block``
  (flax conv ``[kh, kw, in, out]`` -> torch ``[out, in, kh, kw]``, Dense
  ``[in, out]`` -> Linear ``[out, in]``)."""
  def conv(m, p):
    m.weight.data = _t(p["kernel"]).permute(3, 2, 0, 1).contiguous()
    m.bias.data = _t(p["bias"])

  def dense(m, p):
    m.weight.data = _t(p["kernel"]).T.contiguous()
    m.bias.data = _t(p["bias"])

  def norm(m, p, s=None):
    m.weight.data, m.bias.data = _t(p["scale"]), _t(p["bias"])
    if s is not None:
      m.running_mean.data, m.running_var.data = _t(s["mean"]), _t(s["var"])

  conv(block.lpu, params["lpu"])
  norm(block.norm1, params["norm1"])
  norm(block.norm2, params["norm2"])
  a, sa = params["attn"], batch_stats.get("attn", {})
  for n in ("q", "k", "v", "proj"):
    dense(getattr(block.attn, n), a[n])
  if block.attn.sr > 1:
    conv(block.attn.sr_conv, a["sr"])
    norm(block.attn.sr_bn, a["sr_bn"], sa["sr_bn"])
  m, sm = params["mlp"], batch_stats["mlp"]
  for n in ("conv1", "proj", "conv2"):
    conv(getattr(block.mlp, n), m[n])
  for n in ("conv1_bn", "proj_bn", "conv2_bn"):
    norm(getattr(block.mlp, n), m[n], sm[n])
