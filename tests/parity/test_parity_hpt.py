"""Parity: the HPT cross-entropy fine-tuning / baseline step
(``hendrycks/pre-training`` ``uncertainty/CIFAR/tune.py:141-158``) against
jaxrobust's step built from ``configs/default.py:cifar10``.

Pinned departures (each pin asserts that the difference exists and is the
expected one):

* the schedule index: the reference's update ``t`` uses ``lambda(t + 1)``
  (``scheduler.step()`` before ``optimizer.step()``), jaxrobust's (optax)
  ``lambda(t)``;
* the BatchNorm running variance: flax averages the biased batch variance,
  PyTorch the unbiased one (equal after the ``n/(n-1)`` correction);
* the BatchNorm batch variance: flax's default one-pass ``E[x^2] - E[x]^2``
  (``use_fast_variance=True``, which jaxrobust keeps) makes jaxrobust's float32
  gradients 1-10% wrong on these batches, PyTorch's two-pass ones are right
  to 3e-6 (``common.two_pass_bn_variance`` is the stand-in switch).
"""

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from jaxrobust import build, convert  # noqa: E402

from . import common  # noqa: E402
from . import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.slow]

# tune.py fine-tunes at 0.001, baseline.py trains at 0.1 (chaotic in float32 at batch 8);
# 0.01 moves the kernels by 17% in 20 steps.
LR = 0.01

# jaxrobust's departures that no engine option removes yet: the PyTorch side
# mimics them (ALIGN) or a stand-in switches them off (TWO_PASS). When the engine
# grows the options they go into OVERRIDES instead (one line each).
OVERRIDES: dict = {}
ALIGN = ref.Departures(lr_at_step=True)
TWO_PASS = True


def jax_run(overrides=None, two_pass: bool = TWO_PASS) -> common.JaxRun:
  config = common.with_overrides(common.base_config(LR), overrides)
  return common.cached_jax_run(
      f"hpt:{common.overrides_key(overrides)}:{two_pass}",
      lambda: common.run_jax(config, common.labelled_batches(), two_pass_variance=two_pass))


def step_fn(dep: ref.Departures):
  batches = common.labelled_batches()

  def step(net, optimizer, scheduler, t):
    b = batches[t]["train"]
    return ref.hpt_train_step(net, optimizer, scheduler,
                              common.cast(net, common.to_torch_input(b["image"])),
                              torch.from_numpy(b["label"].astype(np.int64)), dep)
  return step


def bn_inputs(net):
  return (common.cast(net, common.to_torch_input(common.labelled_batches()[0]["train"]["image"])),)


def compare(overrides=None, dep: ref.Departures = ALIGN, two_pass: bool = TWO_PASS,
            floor: bool = True) -> common.Report:
  """The one comparison: jaxrobust with ``overrides`` vs the reference port
  with ``dep`` mimicked."""
  return common.compare_family(f"hpt ce ({_short(dep)})", jax_run(overrides, two_pass), LR,
                               step_fn(dep), bn_inputs, floor=floor)


def _short(dep: ref.Departures) -> str:
  return "mimics " + (",".join(k for k, v in vars(dep).items() if v) or "nothing")


def test_hpt_finetune_step_parity():
  compare(OVERRIDES, ALIGN).assert_parity()


def test_hpt_pin_schedule_index():
  """The reference anneals one step ahead: its update ``t`` uses jaxrobust's
  learning rate of step ``t + 1`` (its last one ``lr_min``), and that alone
  moves the weights well beyond the tolerance."""
  j = jax_run(OVERRIDES)
  lrs = [ref.cosine_annealing(t, common.STEPS, LR, 1e-6) for t in range(common.STEPS + 1)]
  np.testing.assert_allclose(j.traj.lrs, lrs[:-1], rtol=1e-5)  # float32 in jaxrobust
  report = compare(OVERRIDES, ref.REFERENCE, floor=False)
  print(report.line())
  traj, _ = common.run_torch(j.init, LR, step_fn(ref.REFERENCE))
  np.testing.assert_allclose(traj.lrs, lrs[1:], rtol=1e-9)
  assert traj.lrs[-1] == pytest.approx(1e-6)
  assert traj.losses[0] == pytest.approx(j.traj.losses[0], rel=common.RTOL)  # same start
  assert report.params > 100 * common.RTOL


def test_hpt_pin_running_variance():
  """Flax's running variance is PyTorch's without the n/(n-1) factor: the
  raw running variances differ by more than the tolerance, the corrected ones
  agree (asserted in the parity test)."""
  report = compare(OVERRIDES, ALIGN, floor=False)
  assert report.bn_var <= common.RTOL < report.bn_var_raw


def test_hpt_pin_fast_batch_variance():
  """jaxrobust's BatchNorm as shipped (flax ``use_fast_variance=True``): its
  float32 gradients at step 0 are >= 0.1% off the float64 ones (PyTorch
  float32: <= 1e-5), and with the two-pass variance they are as good as
  PyTorch's; over 20 steps the shipped one leaves the parity tolerance."""
  config = common.base_config(LR)
  batch = common.labelled_batches()[0]["train"]
  x, y = batch["image"], batch["label"]
  init = jax_run(OVERRIDES).init
  net64 = common.torch_net(init).double().train()
  torch.nn.functional.cross_entropy(net64(common.to_torch_input(x).double()),
                                    torch.from_numpy(y.astype(np.int64))).backward()
  net32 = common.torch_net(init).train()
  torch.nn.functional.cross_entropy(net32(common.to_torch_input(x)),
                                    torch.from_numpy(y.astype(np.int64))).backward()
  truth = {n: p.grad.numpy() for n, p in net64.named_parameters()}
  torch_err = max(common.deviation(p.grad.numpy(), truth[n]) for n, p in net32.named_parameters())

  def jax_error(two_pass: bool) -> float:
    with common.two_pass_bn_variance(two_pass):
      module = build.build_modules(config, num_classes=common.K, image_shape=common.IMAGE,
                                   total_steps=common.STEPS, steps_per_epoch=1.0)["classifier"]
      params, stats = convert.from_torch(init, arch="wrn")

      def loss(p):
        logits, _, _ = module.apply({"params": p, "batch_stats": stats}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      grads = convert.to_torch(jax.device_get(jax.jit(jax.grad(loss))(params)), stats,
                               arch="wrn")
    return max(common.deviation(grads[n], truth[n]) for n in truth)

  shipped, two_pass = jax_error(False), jax_error(True)
  print(f"step-0 gradient error vs float64: jaxrobust as shipped {shipped:.1e}, "
        f"two-pass variance {two_pass:.1e}, PyTorch float32 {torch_err:.1e}")
  assert torch_err <= 1e-5 and two_pass <= 1e-5 < 1e-3 <= shipped
  report = compare(OVERRIDES, ALIGN, two_pass=False, floor=False)
  print(report.line())
  assert report.params > 10 * common.RTOL
