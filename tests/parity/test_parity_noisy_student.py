"""Parity: the Noisy Student student loss (``google-research/noisystudent``
``main.py:487-550``, TensorFlow; ported to numpy, ``torch_reference.ns_student_loss``)
against jaxrobust's step with the student losses of
:func:`jaxrobust.methods.self_training.student_losses` (``cross_entropy`` on
``train``, ``pseudo`` on ``unlabeled``), as they come: ``normalize=False``
(Noisy Student's own combination) and ``unlabel_ratio`` the stream's batch
ratio, nothing overridden.

That default is the reference's loss: label smoothing 0.1 on the labelled
term (``lab_loss``, ``--label_smoothing=0.1``), the pseudo term weighted by
``unlabel_ratio`` (``(lab_loss * B_l + unl_loss * B_u) / B_l``), smoothing 0.1
on hard pseudo-labels and none on soft ones. Compared for hard and soft
pseudo-labels over 20 steps, and at step 0 against the numpy port on the same
logits. Nothing is pinned.

Labelled and unlabelled images go through ONE forward pass on both sides
(main.py: one ``image`` batch, logits split at ``lab_bsz``). The optimizer is
not the reference's (RMSProp + EMA, not ported): both sides train with the
HPT SGD; the PyTorch side computes the loss with a torch twin of the numpy
port, checked against it at every step. The L2 term of main.py:552-555 is
the optimizer's weight decay in jaxrobust (not in the loss).
"""

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from jaxrobust.methods import self_training  # noqa: E402

from . import common  # noqa: E402
from . import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.slow]

LR = 0.01
RATIO = 2  # unlabel_ratio (SVHN's run.sh: 5; B1-B7: 3)
UNL_BATCH = RATIO * common.BATCH
LS = 0.1  # --label_smoothing

OVERRIDES: dict = {}  # student_losses' default is the reference's loss


def teacher_probs(rng, n):
  logits = rng.normal(0, 2, (n, common.K))
  p = np.exp(logits - logits.max(1, keepdims=True))
  return (p / p.sum(1, keepdims=True)).astype(np.float32)


def batches(hard: bool):
  rng = np.random.default_rng(3)
  out = []
  for b in common.labelled_batches(seed=3):
    probs = teacher_probs(rng, UNL_BATCH)
    extra = {} if hard else {"soft_label": probs}
    classes = probs.argmax(1)
    b["unlabeled"] = common.stream_batch(common.images(rng, classes), classes, **extra)
    out.append(b)
  return out


def config(hard: bool, overrides=None):
  c = common.base_config(LR)
  c.streams.unlabeled = {"data": "svhn_extra", "batch_size": UNL_BATCH}
  c.losses = self_training.student_losses(normalize=False, hard=hard, unlabel_ratio=RATIO)
  return common.with_overrides(c, overrides)


def jax_run(hard: bool, overrides=None) -> common.JaxRun:
  return common.cached_jax_run(
      f"ns:{hard}:{common.overrides_key(overrides)}",
      lambda: common.run_jax(config(hard, overrides), batches(hard)))


def compare(hard: bool, overrides=None, *, label_smoothing: float = LS,
            unlabel_weight: float = RATIO, dep: ref.Departures = ref.REFERENCE) -> common.Report:
  """jaxrobust with ``overrides`` vs the port whose loss is the reference's
  with ``label_smoothing`` and ``unlabel_weight`` (the reference:
  ``LS``, ``RATIO``)."""
  bs = batches(hard)

  def step(net, optimizer, scheduler, t):
    lab, unl = bs[t]["train"], bs[t]["unlabeled"]
    target = (torch.from_numpy(unl["label"].astype(np.int64)) if hard
              else common.cast(net, unl["soft_label"]))
    out, logits = ref.ns_student_step(
        net, optimizer, scheduler, common.cast(net, common.to_torch_input(lab["image"])),
        torch.from_numpy(lab["label"].astype(np.int64)),
        common.cast(net, common.to_torch_input(unl["image"])), target, num_classes=common.K,
        unlabel_ratio=unlabel_weight, hard=hard, label_smoothing=label_smoothing, dep=dep)
    port = ref.ns_student_loss(
        logits[:common.BATCH], lab["label"], logits[common.BATCH:], unl["label"],
        unl.get("soft_label"), num_classes=common.K, unlabel_ratio=unlabel_weight,
        teacher_softmax_temp=-1 if hard else 1.0, label_smoothing=label_smoothing)
    np.testing.assert_allclose(out.loss, port["data_loss"], rtol=1e-5)  # torch twin = numpy port
    return out

  return common.compare_family(f"noisy student ({'hard' if hard else 'soft'})",
                               jax_run(hard, overrides), LR, step)


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_noisy_student_loss_parity(hard):
  """jaxrobust's default student losses vs the ported loss, 20 steps."""
  compare(hard, OVERRIDES).assert_parity()


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_noisy_student_default_student_loss(hard):
  """jaxrobust's default student loss at step 0 is the numpy port's
  ``data_loss`` on the same logits (``lab_loss + unlabel_ratio *
  unl_loss``, label smoothing 0.1 on the labelled and on hard pseudo-labels),
  and differs from it without label smoothing or with the pseudo term
  weighted 1 (what earlier engines left out) by far more than the check's
  tolerance (at initialisation the logits are nearly uniform and the
  smoothing moves the loss by ~3e-4 of its value)."""
  j = jax_run(hard, OVERRIDES)
  b = batches(hard)[0]
  net = common.torch_net(j.init).double().train()
  with torch.no_grad():
    logits = net(common.to_torch_input(np.concatenate([b["train"]["image"],
                                                       b["unlabeled"]["image"]])).double()
                 ).numpy()
  lab, unl = logits[:common.BATCH], logits[common.BATCH:]
  port = lambda **kw: ref.ns_student_loss(
      lab, b["train"]["label"], unl, b["unlabeled"]["label"], b["unlabeled"].get("soft_label"),
      num_classes=common.K, teacher_softmax_temp=-1 if hard else 1.0,
      **{"unlabel_ratio": RATIO, "label_smoothing": LS, **kw})["data_loss"]
  print(f"noisy student ({'hard' if hard else 'soft'}) step-0 loss: jaxrobust "
        f"{j.traj.losses[0]:.6f}, reference {port():.6f}, without label smoothing "
        f"{port(label_smoothing=0.0):.6f}, pseudo weight 1 {port(unlabel_ratio=1):.6f}")
  rel = 1e-6
  assert j.traj.losses[0] == pytest.approx(port(), rel=rel)
  for other in (port(label_smoothing=0.0), port(unlabel_ratio=1)):
    assert abs(other - j.traj.losses[0]) > 100 * rel * port()
