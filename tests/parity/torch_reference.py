"""PyTorch (and numpy) ports of the reference repositories' training steps.

Each port keeps the reference's structure -- its module order, its loss
expressions, its optimizer and scheduler calls and their order, its train/eval
mode switches -- and cites the file and lines it follows. Written for the
parity tier (``tests/parity``), which runs them side by side with jaxrobust's
own train step from the same weights (:mod:`jaxrobust.convert`) and the same
batches; the WideResNet is also the PyTorch model of
``benchmarks/train_step.py``.

Repositories, at the commits read:

* HPT -- ``hendrycks/pre-training`` 10cd02a3c21698dfc790a50fe442fddf417ad17b
  (PyTorch 0.4 code; run here on PyTorch 2.13, which has the same semantics
  for every call used);
* EN -- ``wetliu/energy_ood`` 77f3c09b788bb5a7bfde6fd3671228320ea0949c (built
  on ``hendrycks/outlier-exposure``; same ``models/wrn.py``);
* NS -- ``google-research/noisystudent`` aac52bf02448f6e45aee6c418f3e588803e4fa43
  (TensorFlow 1; its loss is ported to numpy, :func:`ns_student_loss`).

What the ports cannot run as the reference does is in the arguments, never
hidden: dropout is 0 (the parity tests need determinism), the data come as
ready tensors (no loaders, no augmentation). :class:`Departures` lists what a
port can mimic of jaxrobust's *options* that differ from the reference, so
that a test can show that this option, and nothing else, is where the two
differ; by default (:data:`REFERENCE`) the ports run the reference as written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Departures:
  """jaxrobust options that depart from the reference, mimicked on the
  PyTorch side when set (all False: the reference as written).

  Attributes:
    lr_at_step: update ``t`` (0-based) uses the schedule's value at ``t``, as
      optax does (jaxrobust's ``config.optimizer.schedule_offset=0``). The
      reference calls ``scheduler.step()`` *before* ``optimizer.step()``
      (HPT ``tune.py:151``, EN ``train.py:188``, ``train_glc.py:400``,
      adversarial ``tune.py:145``), so its update ``t`` uses ``lambda(t + 1)``
      (jaxrobust's ``schedule_offset=1``, the CIFAR configs' default): its
      first update is already annealed and its last one is at ``lr_min``.
  """
  lr_at_step: bool = False


REFERENCE = Departures()


# --- the WideResNet (HPT uncertainty/CIFAR/models/wrn.py:7-96; EN CIFAR/models/wrn.py) -------

class BasicBlock(nn.Module):
  """wrn.py:7-38. Pre-activation block; when the width changes the 1x1
  ``convShortcut`` takes the pre-activated input."""

  def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
    self.droprate = drop_rate
    self.equalInOut = in_planes == out_planes  # wrn.py:19 (the stride is not checked)
    self.convShortcut = (None if self.equalInOut else
                         nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.equalInOut:
      x = self.relu1(self.bn1(x))
      out = self.relu2(self.bn2(self.conv1(x)))
    else:
      out = self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x)))))
    if self.droprate > 0:
      out = F.dropout(out, p=self.droprate, training=self.training)
    out = self.conv2(out)
    return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
  """wrn.py:41-53: ``nb_layers`` blocks in ``self.layer``."""

  def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int,
               drop_rate: float = 0.0):
    super().__init__()
    self.layer = nn.Sequential(*[
        BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                   drop_rate) for i in range(nb_layers)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layer(x)


class WideResNet(nn.Module):
  """wrn.py:56-96: conv1, block1-3, bn1, ReLU, 8x8 average pool, fc; the
  reference's initialisation (convs ``normal(0, sqrt(2 / (k*k*out)))``, BN
  1/0, fc bias 0). ``forward(x, return_features=True)`` also returns the
  pooled features (the reference's ``feature_list`` gives the map before
  pooling; the benchmark compares the pooled ones)."""

  def __init__(self, depth: int, num_classes: int, widen_factor: int = 1,
               drop_rate: float = 0.0):
    super().__init__()
    n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    assert (depth - 4) % 6 == 0
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, n_channels[0], 3, stride=1, padding=1, bias=False)
    self.block1 = NetworkBlock(n, n_channels[0], n_channels[1], 1, drop_rate)
    self.block2 = NetworkBlock(n, n_channels[1], n_channels[2], 2, drop_rate)
    self.block3 = NetworkBlock(n, n_channels[2], n_channels[3], 2, drop_rate)
    self.bn1 = nn.BatchNorm2d(n_channels[3])
    self.relu = nn.ReLU(inplace=True)
    self.fc = nn.Linear(n_channels[3], num_classes)
    self.nChannels = n_channels[3]
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.bias.data.zero_()

  def forward(self, x: torch.Tensor, return_features: bool = False):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = self.relu(self.bn1(out))
    out = F.avg_pool2d(out, out.shape[-1])  # wrn.py:94 pools 8x8 (32x32 inputs)
    features = out.view(-1, self.nChannels)
    logits = self.fc(features)
    return (logits, features) if return_features else logits


# --- optimizer and schedule (HPT tune.py:120-136; EN train.py:151-167; train_glc.py:349-359) --

def cosine_annealing(step: float, total_steps: int, lr_max: float, lr_min: float) -> float:
  """tune.py:125-127."""
  return lr_min + (lr_max - lr_min) * 0.5 * (1 + np.cos(step / total_steps * np.pi))


def sgd_and_schedule(net: nn.Module, learning_rate: float, total_steps: int, *,
                     momentum: float = 0.9, decay: float = 5e-4, lr_min: float = 1e-6
                     ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
  """SGD with Nesterov momentum and L2 weight decay on every parameter, and
  the ``LambdaLR`` cosine to ``lr_min`` over ``total_steps`` (= ``epochs *
  len(train_loader)`` there), stepped every batch (tune.py:120-136)."""
  optimizer = torch.optim.SGD(net.parameters(), learning_rate, momentum=momentum,
                              weight_decay=decay, nesterov=True)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lr_lambda=lambda step: cosine_annealing(step, total_steps, 1,
                                                         lr_min / learning_rate))
  return optimizer, scheduler


@contextlib.contextmanager
def _schedule(scheduler, dep: Departures) -> Iterator[None]:
  """``scheduler.step()`` where the reference calls it: after the forward
  pass, before ``optimizer.step()`` -- or after the update (``lr_at_step``)."""
  import warnings
  if not dep.lr_at_step:
    with warnings.catch_warnings():  # PyTorch >= 1.1 warns about exactly this order
      warnings.simplefilter("ignore", UserWarning)
      scheduler.step()
  yield
  if dep.lr_at_step:
    scheduler.step()


def _update(optimizer, scheduler, dep, loss_fn) -> tuple[Any, float]:
  """The reference loops' update: (``scheduler.step()`` where the reference
  puts it,) ``zero_grad``, the loss, ``backward``, the learning rate used,
  ``optimizer.step()``."""
  with _schedule(scheduler, dep):
    optimizer.zero_grad()
    loss = loss_fn()
    loss.backward()
    lr = current_lr(optimizer)
    optimizer.step()
  return loss, lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
  return float(optimizer.param_groups[0]["lr"])


@dataclasses.dataclass
class StepOut:
  """What one ported step returns: its loss and the learning rate its update used."""
  loss: float
  lr: float


# --- HPT fine-tuning / CE baseline (uncertainty/CIFAR/tune.py:141-158; baseline.py alike) -----

def hpt_train_step(net: nn.Module, optimizer, scheduler, data: torch.Tensor,
                   target: torch.Tensor, dep: Departures = REFERENCE) -> StepOut:
  """One batch of ``train()`` in tune.py:141-158 (the CE baseline of
  baseline.py is the same loop): train mode, forward, ``scheduler.step()``,
  ``zero_grad``, mean cross-entropy, backward, ``optimizer.step()``. ``data``
  is already normalised (``trn.Normalize(mean, std)``, tune.py:59-63)."""
  net.train()  # tune.py:142 (once per epoch there)
  x = net(data)
  loss, lr = _update(optimizer, scheduler, dep, lambda: F.cross_entropy(x, target))
  return StepOut(loss.item(), lr)


# --- OE / energy fine-tuning (EN CIFAR/train.py:172-205) -------------------------------------

def oe_energy_train_step(net: nn.Module, optimizer, scheduler, in_data: torch.Tensor,
                         in_target: torch.Tensor, out_data: torch.Tensor, *, score: str,
                         m_in: float = -25.0, m_out: float = -7.0,
                         dep: Departures = REFERENCE) -> StepOut:
  """One batch of ``train()`` in EN train.py:172-205: the in-distribution and
  outlier batches concatenated into ONE forward pass (train.py:179, 185),
  cross-entropy on the in part plus, for ``score='OE'``, ``0.5 * mean(-(mean_k
  x - logsumexp x))`` over the outliers (train.py:197-198), or, for
  ``score='energy'``, ``0.1 * (mean(relu(E_in - m_in)^2) + mean(relu(m_out -
  E_out)^2))`` with ``E = -logsumexp`` (train.py:193-196)."""
  if score not in ("OE", "energy"):
    raise ValueError(f"score must be 'OE' or 'energy', got {score!r}")
  net.train()  # train.py:173
  data = torch.cat((in_data, out_data), 0)
  x = net(data)
  n_in = len(in_data)
  def loss_fn():
    loss = F.cross_entropy(x[:n_in], in_target)
    if score == "energy":
      ec_out = -torch.logsumexp(x[n_in:], dim=1)
      ec_in = -torch.logsumexp(x[:n_in], dim=1)
      return loss + 0.1 * (torch.pow(F.relu(ec_in - m_in), 2).mean()
                           + torch.pow(F.relu(m_out - ec_out), 2).mean())
    return loss + 0.5 * -(x[n_in:].mean(1) - torch.logsumexp(x[n_in:], dim=1)).mean()

  loss, lr = _update(optimizer, scheduler, dep, loss_fn)
  return StepOut(loss.item(), lr)


# --- PGD adversarial training (robustness/adversarial/attacks.py:40-68, tune.py:133-154) -----

class PGDLinf(nn.Module):
  """``PGD_linf`` of attacks.py:40-68: inputs in [0, 1], the model sees
  ``2x - 1``, sum-reduced cross-entropy, sign steps, projection and clamp.

  The reference draws its random start with ``uniform_(-eps, eps)`` from
  PyTorch's global generator; here ``start_noise`` (a tensor like ``bx``)
  replaces that draw so that both sides can start from the same point
  (zeros: no random start).

  Two quirks of the reference are kept unless switched off:

  * ``alias_start`` -- ``adv_bx = bx.detach()`` shares ``bx``'s storage, so
    the in-place ``adv_bx += noise`` (attacks.py:54-55) also moves ``bx``: the
    projection (attacks.py:66) is onto the eps-ball around ``bx + noise``, not
    around the clean ``bx``, and an adversarial example can be up to ``2 eps``
    from the clean image (the caller's ``bx`` is modified too);
  * ``clamp_start=False`` -- the first gradient is taken at the unclamped
    start (it may leave [0, 1]).

  jaxrobust (:func:`jaxrobust.attacks.pgd`) projects around the clean images
  and clamps the start: ``PGDLinf(..., alias_start=False, clamp_start=True)``.
  """

  def __init__(self, epsilon: float, num_steps: int, step_size: float, *,
               alias_start: bool = True, clamp_start: bool = False):
    super().__init__()
    self.epsilon, self.num_steps, self.step_size = epsilon, num_steps, step_size
    self.alias_start, self.clamp_start = alias_start, clamp_start

  def forward(self, model: nn.Module, bx: torch.Tensor, by: torch.Tensor,
              start_noise: torch.Tensor | None = None) -> torch.Tensor:
    noise = torch.zeros_like(bx) if start_noise is None else start_noise
    adv_bx = bx.detach() if self.alias_start else bx.detach().clone()
    adv_bx += noise
    if self.clamp_start:
      adv_bx = adv_bx.clamp(0, 1)
    for _ in range(self.num_steps):
      adv_bx.requires_grad_()
      with torch.enable_grad():
        logits = model(adv_bx * 2 - 1)
        loss = F.cross_entropy(logits, by, reduction="sum")
      grad = torch.autograd.grad(loss, adv_bx, only_inputs=True)[0]
      adv_bx = adv_bx.detach() + self.step_size * torch.sign(grad.detach())
      adv_bx = torch.min(torch.max(adv_bx, bx - self.epsilon), bx + self.epsilon).clamp(0, 1)
    return adv_bx


def batchnorm_running_stats(net: nn.Module) -> dict[str, torch.Tensor]:
  return {k: v.clone() for k, v in net.state_dict().items()
          if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def adversarial_train_step(net: nn.Module, optimizer, scheduler, adversary: PGDLinf,
                           bx: torch.Tensor, by: torch.Tensor,
                           start_noise: torch.Tensor | None = None,
                           dep: Departures = REFERENCE) -> StepOut:
  """One batch of ``train()`` in adversarial/tune.py:133-154: the attack runs
  with the net in train mode (set once per epoch, tune.py:134), so BatchNorm
  normalises with batch statistics and each attack pass updates the running
  statistics; then the training forward on ``adv_bx * 2 - 1`` and the usual
  update (adversarial examples only, no clean loss)."""
  net.train()
  adv_bx = adversary(net, bx.clone(), by, start_noise)  # clone: the reference's bx is a fresh batch
  logits = net(adv_bx * 2 - 1)
  loss, lr = _update(optimizer, scheduler, dep, lambda: F.cross_entropy(logits, by))
  return StepOut(loss.item(), lr)


# --- GLC phase 2 (robustness/label_corruption/train_glc.py:366-409) ---------------------------

def glc_phase2_step(net: nn.Module, optimizer, scheduler, c_hat_transpose: torch.Tensor,
                    data: np.ndarray, target: np.ndarray, *, num_classes: int, batch_size: int,
                    dep: Departures = REFERENCE) -> StepOut:
  """One batch of ``train_phase2`` in train_glc.py:366-409. ``target`` marks
  gold (trusted) rows by ``label + num_classes`` (the reference's tagging);
  silver rows are forwarded first, then gold rows, in two passes
  (train_glc.py:389-397); silver loss ``-sum log((softmax * C_hat^T[y]).sum(1))``,
  gold loss summed cross-entropy, ``(loss_g + loss_s) / batch_size``."""
  net.train()  # train_glc.py:367
  gold = target > (num_classes - 1)
  silver = target < num_classes
  data_t = torch.as_tensor(data)
  loss_s = 0
  if silver.sum() > 0:
    output_s = net(data_t[torch.as_tensor(silver)])
    target_s = torch.from_numpy(target[silver]).long()
    pre1 = c_hat_transpose[target_s]
    pre2 = torch.mul(F.softmax(output_s, dim=1), pre1)
    loss_s = -(torch.log(pre2.sum(1))).sum(0)
  loss_g = 0
  if gold.sum() > 0:
    output_g = net(data_t[torch.as_tensor(gold)])
    target_g = torch.from_numpy(target[gold] - num_classes).long()
    loss_g = F.cross_entropy(output_g, target_g, reduction="sum")  # size_average=False
  loss, lr = _update(optimizer, scheduler, dep, lambda: (loss_g + loss_s) / batch_size)
  return StepOut(loss.item(), lr)


def glc_c_hat(probs: np.ndarray, gold_labels: np.ndarray, num_classes: int) -> np.ndarray:
  """``get_C_hat_transpose`` of train_glc.py:305-328 after the forward passes:
  ``C_hat[i]`` = mean softmax of the gold examples of true class ``i``;
  returns ``C_hat.T`` as float32."""
  c_hat = np.zeros((num_classes, num_classes))
  for label in range(num_classes):
    c_hat[label] = np.mean(probs[gold_labels == label], axis=0, keepdims=True)
  return c_hat.T.astype(np.float32)


# --- Noisy Student student loss (noisystudent main.py:300-304, 487-557), numpy ----------------

def _np_log_softmax(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def tf_softmax_cross_entropy(onehot_labels: np.ndarray, logits: np.ndarray,
                             label_smoothing: float = 0.0) -> np.ndarray:
  """``tf.losses.softmax_cross_entropy(..., reduction=NONE)``: labels smoothed
  to ``onehot * (1 - ls) + ls / K``, then ``-sum(labels * log_softmax)`` per
  example."""
  k = onehot_labels.shape[-1]
  labels = onehot_labels * (1.0 - label_smoothing) + label_smoothing / k
  return -(labels * _np_log_softmax(logits)).sum(-1)


def ns_student_loss(lab_logits: np.ndarray, lab_labels: np.ndarray, unl_logits: np.ndarray,
                    unl_labels: np.ndarray | None = None, unl_probs: np.ndarray | None = None,
                    *, num_classes: int, unlabel_ratio: float, teacher_softmax_temp: float = -1,
                    label_smoothing: float = 0.1) -> dict[str, float]:
  """The student's data loss of main.py:487-550 (offline pseudo-labels: no
  teacher model in the graph, ``label_data_sample_prob = 1``).

  * ``lab_loss`` = mean CE of the labelled rows with label smoothing
    (main.py:501-514);
  * hard pseudo-labels (``teacher_softmax_temp == -1``, the flag default):
    ``unl_loss`` = mean CE to ``one_hot(unl_labels)`` with the same label
    smoothing (main.py:518-529); soft (any other T): ``unl_probs ** (1/T)``
    renormalised, mean CE without smoothing (main.py:530-541, 300-304);
  * ``data_loss = (lab_loss * B_l + unl_loss * B_l * unlabel_ratio) / B_l``
    (main.py:547-550) = ``lab_loss + unlabel_ratio * unl_loss``.

  The L2 term ``weight_decay * sum(l2_loss(v))`` of main.py:552-555 (non-BN
  variables) is not part of it: it is the optimizer's weight decay in
  jaxrobust. Returns ``lab_loss``, ``unl_loss``, ``data_loss``.
  """
  eye = np.eye(num_classes)
  lab_loss = float(np.mean(tf_softmax_cross_entropy(eye[lab_labels], lab_logits,
                                                    label_smoothing)))
  if teacher_softmax_temp == -1:
    unl_loss = float(np.mean(tf_softmax_cross_entropy(eye[unl_labels], unl_logits,
                                                      label_smoothing)))
  else:
    scaled = np.power(np.asarray(unl_probs, np.float64), 1.0 / teacher_softmax_temp)
    teacher = scaled / scaled.sum(-1, keepdims=True)
    unl_loss = float(np.mean(np.sum(teacher * -_np_log_softmax(unl_logits), -1)))
  batch = len(lab_logits)
  real_lab_bsz, real_unl_bsz = float(batch), batch * unlabel_ratio
  data_loss = (lab_loss * real_lab_bsz + unl_loss * real_unl_bsz) / real_lab_bsz
  return {"lab_loss": lab_loss, "unl_loss": unl_loss, "data_loss": data_loss}


def ns_student_torch_loss(lab_logits: torch.Tensor, lab_labels: torch.Tensor,
                          unl_logits: torch.Tensor, unl_target: torch.Tensor, *,
                          num_classes: int, unlabel_ratio: float, hard: bool,
                          label_smoothing: float = 0.1) -> torch.Tensor:
  """:func:`ns_student_loss` in torch, to train with it (checked against the
  numpy port at every step of the parity test). ``unl_target``: class ids
  (hard) or the teacher distribution (soft, already tempered)."""
  eye = torch.eye(num_classes, dtype=lab_logits.dtype)

  def smooth_ce(labels_onehot, logits, ls):
    labels = labels_onehot * (1.0 - ls) + ls / num_classes
    return -(labels * F.log_softmax(logits, dim=-1)).sum(-1).mean()

  lab_loss = smooth_ce(eye[lab_labels], lab_logits, label_smoothing)
  if hard:
    unl_loss = smooth_ce(eye[unl_target], unl_logits, label_smoothing)
  else:
    unl_loss = (unl_target * -F.log_softmax(unl_logits, dim=-1)).sum(-1).mean()
  return lab_loss + unlabel_ratio * unl_loss


def ns_student_step(net: nn.Module, optimizer, scheduler, lab_data: torch.Tensor,
                    lab_labels: torch.Tensor, unl_data: torch.Tensor, unl_target: torch.Tensor,
                    *, num_classes: int, unlabel_ratio: float, hard: bool,
                    label_smoothing: float = 0.1, dep: Departures = REFERENCE
                    ) -> tuple[StepOut, np.ndarray]:
  """A Noisy Student step: labelled and unlabelled images in ONE forward pass
  (main.py:355-365: ``lab_bsz = image.shape[0] - unl_bsz``; logits split at
  ``lab_bsz``, main.py:478-491), the loss of :func:`ns_student_torch_loss`.
  The optimizer is NOT the reference's (RMSProp with its EMA; not ported):
  both sides of the parity test use the HPT SGD + cosine schedule. Returns
  the step and the logits (for the numpy port)."""
  net.train()
  logits = net(torch.cat((lab_data, unl_data), 0))
  n = len(lab_data)
  loss, lr = _update(optimizer, scheduler, dep, lambda: ns_student_torch_loss(
      logits[:n], lab_labels, logits[n:], unl_target, num_classes=num_classes,
      unlabel_ratio=unlabel_ratio, hard=hard, label_smoothing=label_smoothing))
  return StepOut(loss.item(), lr), logits.detach().numpy()

