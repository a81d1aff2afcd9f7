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
