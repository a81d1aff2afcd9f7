"""Numpy ports of the reference post-hoc detectors, file by file, for tests.

Followed: OpenOOD v1.5 (Jingkang50/OpenOOD at 3c35632) ``openood/postprocessors/``
and ``openood/networks/``; pytorch-ood 0.4.0 (the wheel) ``pytorch_ood/detector/``.
``w`` is PyTorch's head weight ``[K, D]`` (our kernel transposed), ``b`` its
bias. Every function returns the reference's value with "higher =
in-distribution": OpenOOD's ``conf`` as it is, pytorch-ood's scores negated.
Ties and percentiles as the references: ``np.percentile`` (linear), stable
top-k (lower index first among equal values, the order ``lax.top_k`` keeps;
``torch.topk`` leaves it open), ``np.round`` half to even.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import pairwise_distances_argmin_min
from sklearn.neighbors import NearestNeighbors


def logsumexp(z):
  m = z.max(-1, keepdims=True)
  return (np.log(np.exp(z - m).sum(-1, keepdims=True)) + m)[:, 0]


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def fc(f, w, b):
  return f @ w.T + b


def _topk(t, k):
  """torch.topk(t, k, dim=1), ties to the lower index."""
  i = np.argsort(-t, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(t, i, 1), i


# --- react_postprocessor.py (+ ReactNet.forward_threshold: feature.clip(max=threshold)) ---
def react_threshold(train_f, percentile=90):
  return np.percentile(train_f.flatten(), percentile)


def react(f, w, b, threshold):
  return logsumexp(fc(np.minimum(f, threshold), w, b))  # energyconf


# --- networks/ash_net.py: ash_p, ash_b, ash_s on [B, C, 1, 1]; ash_postprocessor.py ---
def _ash_k(n, percentile):
  return n - int(np.round(n * percentile / 100.0))


def ash_p(x, percentile=65):
  k = _ash_k(x.shape[1], percentile)
  v, i = _topk(x, k)
  out = np.zeros_like(x)
  np.put_along_axis(out, i, v, 1)
  return out


def ash_b(x, percentile=65):
  k = _ash_k(x.shape[1], percentile)
  s1 = x.sum(1)
  _, i = _topk(x, k)
  out = np.zeros_like(x)
  np.put_along_axis(out, i, np.repeat((s1 / k)[:, None], k, 1), 1)
  return out


def ash_s(x, percentile=65):
  s1 = x.sum(1)
  out = ash_p(x, percentile)
  s2 = out.sum(1)
  return out * np.exp(s1 / s2)[:, None]


def ash(f, w, b, variant, percentile=65):
  shaped = {"p": ash_p, "b": ash_b, "s": ash_s}[variant](f, percentile)
  return logsumexp(fc(shaped, w, b))


# --- networks/scale_net.py: scale(); scale_postprocessor.py ---
def scale(f, w, b, percentile=65):
  s1 = f.sum(1)
  s2 = ash_p(f, percentile).sum(1)
  return logsumexp(fc(f * np.exp(s1 / s2)[:, None], w, b))


# --- dice_postprocessor.py (setup on the train loader, calculate_mask, postprocess) ---
def dice(f, w, b, train_f, p=90):
  mean_act = train_f.mean(0)
  contrib = mean_act[None, :] * w
  thresh = np.percentile(contrib, p)
  masked_w = w * (contrib > thresh)
  vote = f[:, None, :] * masked_w
  return logsumexp(vote.sum(2) + b)


# --- gradnorm_postprocessor.py: per example, loss = mean(sum(-1 * log_softmax)), |dW|_1 ---
def gradnorm(f, w, b):
  out = []
  for x in f:
    p = softmax(fc(x[None], w, b))[0]
    grad_logits = len(p) * p - 1.0  # d/dz of -sum_k log softmax_k
    out.append(np.abs(np.outer(grad_logits, x)).sum())  # fc.weight.grad: [K, D]
  return np.array(out)


# --- gen_postprocessor.py: generalized_entropy(softmax, gamma, M) ---
def gen(f, w, b, gamma=0.1, M=100):
  probs = softmax(fc(f, w, b))
  probs_sorted = np.sort(probs, axis=1)[:, -M:]
  return -np.sum(probs_sorted ** gamma * (1 - probs_sorted) ** gamma, axis=1)


# --- kl_matching_postprocessor.py (setup over an ID loader, postprocess) ---
def kl_matching(f, w, b, fit_f):
  logits = fc(fit_f, w, b)
  all_softmax, preds = softmax(logits), logits.argmax(1)
  k = w.shape[0]
  mean_softmax = []
  for i in range(k):
    if np.sum(preds == i) == 0:
      temp = np.zeros((k,))
      temp[i] = 1
      mean_softmax.append(temp)
    else:
      mean_softmax.append(all_softmax[preds == i].mean(0))
  sm = softmax(fc(f, w, b))
  return -pairwise_distances_argmin_min(sm, np.array(mean_softmax),
                                        metric=lambda p, q: scipy.stats.entropy(p, q))[1]


# --- vim_postprocessor.py / residual_postprocessor.py ---
def _vim_fit(train_f, w, b, dim):
  u = -np.matmul(np.linalg.pinv(w), b)
  ec = EmpiricalCovariance(assume_centered=True)
  ec.fit(train_f - u)
  eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
  ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
  return u, np.real(ns)


def vim(f, w, b, train_f, dim):
  u, ns = _vim_fit(train_f, w, b, dim)
  vlogit_train = np.linalg.norm(np.matmul(train_f - u, ns), axis=-1)
  alpha = fc(train_f, w, b).max(axis=-1).mean() / vlogit_train.mean()
  energy = logsumexp(fc(f, w, b))
  return -np.linalg.norm(np.matmul(f - u, ns), axis=-1) * alpha + energy


def residual(f, w, b, train_f, dim):
  u, ns = _vim_fit(train_f, w, b, dim)
  return -np.linalg.norm(np.matmul(f - u, ns), axis=-1)


# --- pytorch_ood/detector/knn.py (sklearn NearestNeighbors on clamped-normalised z) ---
def _prepare(z):
  return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def knn(f, train_f, k=50):
  nn = NearestNeighbors().fit(_prepare(train_f))
  dist, _ = nn.kneighbors(_prepare(f), n_neighbors=k, return_distance=True)
  return -dist[:, -1]


# --- rmds_postprocessor.py ---
def relative_mahalanobis(f, train_f, train_y, num_classes):
  class_mean, centred = [], []
  for c in range(num_classes):
    s = train_f[train_y == c]
    class_mean.append(s.mean(0))
    centred.append(s - class_mean[c][None])
  class_mean = np.stack(class_mean)
  precision = EmpiricalCovariance(assume_centered=False).fit(np.concatenate(centred)).precision_
  whole_mean = train_f.mean(0)
  whole_precision = EmpiricalCovariance(assume_centered=False).fit(
      train_f - whole_mean).precision_
  t1 = f - whole_mean
  background = -np.einsum("nd,de,ne->n", t1, whole_precision, t1)
  scores = np.zeros((len(f), num_classes))
  for c in range(num_classes):
    t = f - class_mean[c]
    scores[:, c] = -np.einsum("nd,de,ne->n", t, precision, t) - background
  return scores.max(1)


# --- she_postprocessor.py (metric inner_product) ---
def she(f, w, b, train_f, train_y):
  preds = fc(train_f, w, b).argmax(1)
  patterns = np.stack([train_f[(train_y == i) & (preds == i)].mean(0)
                       for i in range(w.shape[0])])
  pred = fc(f, w, b).argmax(1)
  return np.sum(f * patterns[pred], 1)


# --- pytorch_ood/detector/nnguide.py (fit_features, predict_features) ---
def nnguide(f, w, b, train_f, k=10):
  bank = _prepare(train_f) * logsumexp(fc(train_f, w, b))[:, None]
  energy = logsumexp(fc(f, w, b))
  sims = _prepare(f) @ bank.T
  top = -np.sort(-sims, axis=1)[:, :k]
  return top.mean(1) * energy  # pytorch-ood returns -(guidance * energy)


# --- pytorch_ood/detector/fdbd.py ---
def fdbd(f, w, b, train_f):
  train_mean = train_f.mean(0)
  denom = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=2)
  np.fill_diagonal(denom, 1.0)
  logits = fc(f, w, b)
  pred = logits.argmax(1)
  diff = np.abs(logits - logits.max(1, keepdims=True))
  boundary = (diff / denom[pred]).sum(1)
  dist = np.maximum(np.linalg.norm(f - train_mean, axis=1), 1e-8)
  return boundary / ((logits.shape[1] - 1) * dist)  # pytorch-ood returns -score
