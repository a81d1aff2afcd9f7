"""Reference ports for ArcFace / CBAM / A-SKD / LFW verification tests.

* ``arcface_logits_np``: numpy port of arcface-pytorch's ``ArcMarginProduct.forward``
  (``easy_margin=False``; ``sine = sqrt(clamp(1 - cos², 0, 1))``).
* ``arcface_logits_torch``: the same in torch (for autograd gradients).
"""

from __future__ import annotations

import math

import numpy as np


def _normalize(x: np.ndarray, axis: int) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def arcface_logits_np(features, weights, labels, *, s=64.0, m=0.5, easy_margin=False):
  """Port of ArcMarginProduct: weights ``[D, K]`` (the reference's is ``[K, D]``)."""
  cosine = _normalize(np.asarray(features, np.float64), 1) @ _normalize(
      np.asarray(weights, np.float64), 0)
  sine = np.sqrt(np.clip(1.0 - cosine**2, 0, 1))
  phi = cosine * math.cos(m) - sine * math.sin(m)
  if easy_margin:
    phi = np.where(cosine > 0, phi, cosine)
  else:
    phi = np.where(cosine > math.cos(math.pi - m), phi, cosine - math.sin(math.pi - m) * m)
  one_hot = np.zeros_like(cosine)
  rows = np.flatnonzero(np.asarray(labels) >= 0)
  one_hot[rows, np.asarray(labels)[rows]] = 1.0
  return s * (one_hot * phi + (1.0 - one_hot) * cosine)


def arcface_loss_torch(features, weights, labels, *, s=64.0, m=0.5):
  """``(loss, grad_features, grad_weights)`` by torch autograd (float64)."""
  import torch
  import torch.nn.functional as F
  f = torch.tensor(np.asarray(features, np.float64), requires_grad=True)
  w = torch.tensor(np.asarray(weights, np.float64), requires_grad=True)
  y = torch.tensor(np.asarray(labels, np.int64))
  cosine = F.linear(F.normalize(f), F.normalize(w.t())).clamp(-1, 1)
  sine = torch.sqrt((1.0 - cosine**2).clamp(0, 1))
  phi = cosine * math.cos(m) - sine * math.sin(m)
  phi = torch.where(cosine > math.cos(math.pi - m), phi, cosine - math.sin(math.pi - m) * m)
  one_hot = F.one_hot(y, cosine.shape[1]).to(cosine.dtype)
  logits = s * (one_hot * phi + (1 - one_hot) * cosine)
  loss = F.cross_entropy(logits, y)
  loss.backward()
  return loss.item(), f.grad.numpy(), w.grad.numpy()


def cbam_torch(x_nhwc, p, *, train=False):
  """Port of Jongchan/attention-module ``CBAM`` (ChannelGate avg+max, SpatialGate
  ChannelPool(max, mean) -> conv7x7 -> BN -> sigmoid), weights from the flax
  params ``p`` of :class:`jaxrobust.models.cbam.CBAM` and batch stats
  ``p['stats']``. Returns ``(refined NHWC, channel logits, spatial logits NHWC)``."""
  import torch
  import torch.nn as nn
  c = x_nhwc.shape[-1]
  hidden = p["channel_fc1"]["kernel"].shape[1]
  mlp = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, c)).double()
  conv = nn.Conv2d(2, 1, 7, padding=3, bias=False).double()
  bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01).double()
  t = lambda a: torch.tensor(np.asarray(a, np.float64))
  with torch.no_grad():
    mlp[0].weight.copy_(t(p["channel_fc1"]["kernel"]).T)
    mlp[0].bias.copy_(t(p["channel_fc1"]["bias"]))
    mlp[2].weight.copy_(t(p["channel_fc2"]["kernel"]).T)
    mlp[2].bias.copy_(t(p["channel_fc2"]["bias"]))
    conv.weight.copy_(t(p["spatial_conv"]["kernel"]).permute(3, 2, 0, 1))
    bn.weight.copy_(t(p["spatial_bn"]["scale"]))
    bn.bias.copy_(t(p["spatial_bn"]["bias"]))
    bn.running_mean.copy_(t(p["stats"]["mean"]))
    bn.running_var.copy_(t(p["stats"]["var"]))
  bn.train(train)
  with torch.no_grad():
    x = t(x_nhwc).permute(0, 3, 1, 2)
    att = mlp(x.mean((2, 3))) + mlp(x.amax((2, 3)))
    x = x * torch.sigmoid(att)[:, :, None, None]
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    s = bn(conv(pooled))
    x = x * torch.sigmoid(s)
  return (x.permute(0, 2, 3, 1).numpy(), att.numpy(), s.permute(0, 2, 3, 1).numpy(),
          bn.running_mean.numpy(), bn.running_var.numpy())
