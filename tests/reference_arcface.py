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


def cbam_torch(x_nhwc, p, *, train=False, momentum=0.01):
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
  bn = nn.BatchNorm2d(1, eps=1e-5, momentum=momentum).double()
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


def gaussian_blur_torch(x_nhwc, kernel=5, sigma=(0.1, 2.0)):
  """teaching-where-to-look ``utility/noise.py`` ``gaussian_blur`` (depthwise 2-D conv)."""
  import torch
  import torch.nn.functional as F

  def k1(size, s):
    t = torch.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, steps=size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (t / s).pow(2))
    return pdf / pdf.sum()

  k2 = torch.mm(k1(kernel, sigma[1])[:, None], k1(kernel, sigma[0])[None, :])
  x = torch.tensor(np.asarray(x_nhwc, np.float64)).permute(0, 3, 1, 2)
  k2 = k2.expand(x.shape[1], 1, kernel, kernel)
  r = kernel // 2
  x = F.conv2d(F.pad(x, [r, r, r, r], mode="reflect"), k2, groups=x.shape[1])
  return x.permute(0, 2, 3, 1).numpy()


def nearest_down_up_torch(x_nhwc, factor):
  import torch
  import torch.nn.functional as F
  x = torch.tensor(np.asarray(x_nhwc, np.float64)).permute(0, 3, 1, 2)
  size = x.shape[-1]
  x = F.interpolate(F.interpolate(x, size=size // factor), size=size)
  return x.permute(0, 2, 3, 1).numpy()


def askd_loss_torch(low, high, lam=5.0):
  """``DistillLoss.forward``: Σ λ · mean(1 − cosine_similarity(flatten(l), flatten(h)))."""
  import torch
  import torch.nn.functional as F
  total = 0.0
  for l_, h_ in zip(low, high):
    l_t = torch.tensor(np.asarray(l_, np.float64)).reshape(len(l_), -1)
    h_t = torch.tensor(np.asarray(h_, np.float64)).reshape(len(h_), -1)
    total += float(torch.mean(1.0 - F.cosine_similarity(l_t, h_t))) * lam
  return total


def at_loss_torch(xs, ys, beta=1000.0):
  """szagoruyko/attention-transfer ``utils.at_loss`` summed, times β/2 (NCHW inputs)."""
  import torch
  import torch.nn.functional as F

  def at(x):
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

  total = 0.0
  for x, y in zip(xs, ys):
    x = torch.tensor(np.asarray(x, np.float64))
    y = torch.tensor(np.asarray(y, np.float64))
    total += float((at(x) - at(y)).pow(2).mean())
  return beta / 2 * total


def kd_torch(s, t, temperature):
  """RepDistiller ``DistillKL``: KL(p_t ‖ p_s) summed, × T² / batch."""
  import torch
  import torch.nn.functional as F
  s = torch.tensor(np.asarray(s, np.float64))
  t = torch.tensor(np.asarray(t, np.float64))
  p_s = F.log_softmax(s / temperature, dim=1)
  p_t = F.softmax(t / temperature, dim=1)
  return float(F.kl_div(p_s, p_t, reduction="sum") * temperature**2 / s.shape[0])
