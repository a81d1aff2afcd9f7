"""The parity harness: the same initial weights, the same batches, 20 steps on
each side, and what is compared.

* **jaxrobust side** -- a config (``configs/default.py:cifar10``, the
  Hendrycks et al. recipe, made small) goes through ``jaxrobust.build``
  (:func:`jaxrobust.build.build_modules`, :func:`~jaxrobust.build.build_stream_steps`,
  :func:`~jaxrobust.build.build_updates`) into the library's own
  :func:`jaxrobust.train_step.make_train_step`, jitted on one device and fed
  the batches by hand (no data pipeline: no augmentation, and the batches are
  the very arrays the PyTorch side gets). Nothing of the step is rewritten
  or patched here: the library's BatchNorm (two-pass batch variance, running
  variance updated with the unbiased batch variance), its schedule offset,
  its perturbation passes and passes by group are what run.
* **PyTorch side** -- the reference port (:mod:`torch_reference`) on a
  WideResNet loaded with the jaxrobust initial weights through
  :func:`jaxrobust.convert.to_torch` (``load_state_dict(strict=True)``), run
  as the reference is written (``torch_reference.REFERENCE``) unless a test
  pins a jaxrobust option against the port mimicking it.
* **Compared** after every step: the loss and the learning rate the update
  used; after the last step: every parameter and BatchNorm running statistic
  (the jaxrobust state converted to the PyTorch names), running variances as
  they are (both sides average the unbiased batch variance). A tensor's
  deviation is ``max|jax - torch| / max|torch|``.
* **Tolerance**: float32 on both sides; a deviation passes when it is at most
  ``max(RTOL, FLOOR_FACTOR x floor)``, where the floor is the same deviation
  between the port's own float32 and float64 runs, measured in the same test.
  Kernels and losses agree to ~1e-6; BatchNorm biases, small tensors whose
  gradients are sums with heavy cancellation, carry float32 noise of up to
  ~1e-3 of their own size in PyTorch itself.

Everything is float32, WRN-10-1 (so every kind of block is there: identity
and 1x1 shortcuts), 32x32x3 images, 10 classes, batch 8, cosine schedule whose
total is the 20 steps run, dropout 0.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import torch

from configs import default
from jaxrobust import build, convert
from jaxrobust import config as config_lib
from jaxrobust import train_state as state_lib
from jaxrobust import train_step as step_lib

from . import torch_reference as ref

STEPS = 20
BATCH = 8
K = 10
DEPTH, WIDTH = 10, 1
IMAGE = (32, 32, 3)
# The tolerance of the float32 comparisons after 20 steps (deviation as above).
RTOL = 1e-4

torch.set_num_threads(1)


# --- configs and batches -----------------------------------------------------------------

def base_config(learning_rate: float = 0.1) -> ml_collections.ConfigDict:
  """``configs/default.py:cifar10`` (HPT's recipe: WRN, SGD Nesterov 0.9, wd
  5e-4 on all parameters, cosine to 1e-6 per step, ``schedule_offset=1``
  -- the reference's ``scheduler.step()`` before ``optimizer.step()`` --,
  mean = std = 0.5) made small and deterministic: WRN-10-1, dropout 0, no augmentation, batch 8,
  20 steps (the schedule's total), no evaluators."""
  c = default.get_config("cifar10")
  c.model.kwargs.depth, c.model.kwargs.width, c.model.kwargs.dropout_rate = DEPTH, WIDTH, 0.0
  c.streams.train.pp = ""
  c.streams.train.batch_size = BATCH
  c.num_steps = STEPS
  c.optimizer.learning_rate = learning_rate
  c.evaluators = ml_collections.ConfigDict()
  c.progress_bar = False
  return c


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """``config`` with nested ``overrides`` applied (:func:`jaxrobust.config.merge`)."""
  return config_lib.merge(config, overrides or {}, where="config")


def images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
  """float32 images in [0, 1] (uint8 levels / 255, rounded once in numpy)
  with a class-dependent colour and texture plus noise, so that the 20 steps
  learn something (the loss falls).

  Both sides get these very float32 values: the jaxrobust step takes float
  images as they are (uint8 would be converted inside the jitted step, where
  XLA multiplies by 1/255 instead of dividing: 41% of the values differ by one
  ulp), and both normalise with mean = std = 0.5, which is exact in float32
  on both sides (``(x - 0.5) / 0.5`` = ``2x - 1``). With a mean/std that is not
  a power of two, XLA multiplies by ``1/std`` where PyTorch divides, and
  those one-ulp input differences alone grow to ~3e-4 in the weights over 20
  float32 steps.
  """
  proto = np.random.default_rng(1234).uniform(40, 215, (K,) + IMAGE)
  noise = rng.normal(0, 30, (len(labels),) + IMAGE)
  return np.clip(proto[labels] + noise, 0, 255).astype(np.uint8).astype(np.float32) / np.float32(255)


def noise_images(rng: np.random.Generator, n: int) -> np.ndarray:
  """Uniform-noise images in [0, 1] (float32; the outliers)."""
  return rng.integers(0, 256, (n,) + IMAGE).astype(np.float32) / np.float32(255)


def stream_batch(image: np.ndarray, label: np.ndarray, **extra: np.ndarray) -> dict[str, np.ndarray]:
  n = len(image)
  return {"image": image, "label": label.astype(np.int32), "index": np.arange(n, dtype=np.int32),
          "mask": np.ones(n, bool), **extra}


def labelled_batches(seed: int = 0, batch: int = BATCH) -> list[dict[str, dict[str, np.ndarray]]]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    y = rng.integers(0, K, batch)
    out.append({"train": stream_batch(images(rng, y), y)})
  return out


MEAN = STD = (0.5, 0.5, 0.5)  # HPT's (tune.py:59-60) and configs/default.py:cifar10's


def to_torch_input(x01: np.ndarray, normalize: bool = True) -> torch.Tensor:
  """NHWC [0, 1] -> NCHW tensor, normalised as ``trn.Normalize(MEAN, STD)``
  (``(x - 0.5) / 0.5``) unless ``normalize=False`` (the adversarial code
  feeds [0, 1] and the model sees ``2x - 1``)."""
  t = torch.from_numpy(np.ascontiguousarray(x01.transpose(0, 3, 1, 2)))
  if normalize:
    m = torch.tensor(MEAN, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(STD, dtype=torch.float32).view(1, -1, 1, 1)
    t = (t - m) / s
  return t


# --- the two sides -----------------------------------------------------------------------

@dataclasses.dataclass
class Trajectory:
  """Per-step losses and learning rates, and the final weights as a PyTorch
  state_dict of numpy arrays (the jaxrobust side converted)."""
  losses: np.ndarray
  lrs: np.ndarray
  final: dict[str, np.ndarray]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class JaxRun:
  traj: Trajectory
  init: dict[str, np.ndarray]  # initial weights, PyTorch names
  metrics: list[dict[str, float]]


def run_jax(config: ml_collections.ConfigDict, batches: Sequence[Mapping[str, Any]],
            constants: Mapping[str, np.ndarray] | None = None) -> JaxRun:
  """``len(batches)`` steps of jaxrobust's own train step built from ``config``."""
  config_lib.validate(config)
  constants = dict(constants or {})
  modules = build.build_modules(config, num_classes=K, image_shape=IMAGE,
                                total_steps=config.num_steps,
                                steps_per_epoch=float(config.num_steps))
  stream_steps = build.build_stream_steps(config)
  updates = build.build_updates(config, modules, stream_steps, constants)
  spec = step_lib.StepSpec(modules=modules, streams=stream_steps, updates=updates,
                           num_classes=K)
  state = state_lib.create_state(modules, jax.random.PRNGKey(config.seed))
  init = jax.device_get(state.classifier)
  step = jax.jit(step_lib.make_train_step(spec))
  metrics = []
  for b in batches:
    state, m = step(state, b, state.rng, constants)
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  final = jax.device_get(state.classifier)
  return JaxRun(
      traj=Trajectory(losses=np.array([m["loss"] for m in metrics]),
                      lrs=np.array([m["learning_rate"] for m in metrics]),
                      final=convert.to_torch(final.params, final.batch_stats, arch="wrn")),
      init=convert.to_torch(init.params, init.batch_stats, arch="wrn"), metrics=metrics)


_RUNS: dict[str, JaxRun] = {}


def cached_jax_run(key: str, run: Callable[[], JaxRun]) -> JaxRun:
  """One jaxrobust run per key (family and overrides) per session: a
  family's parity test and its pins share it."""
  if key not in _RUNS:
    _RUNS[key] = run()
  return _RUNS[key]


def overrides_key(overrides: Mapping[str, Any] | None) -> str:
  return json.dumps(overrides or {}, sort_keys=True, default=str)


def torch_net(init: Mapping[str, np.ndarray]) -> ref.WideResNet:
  """The reference WideResNet with the jaxrobust initial weights (strict load)."""
  net = ref.WideResNet(DEPTH, K, WIDTH, drop_rate=0.0)
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in init.items()}, strict=True)
  return net


def run_torch(init: Mapping[str, np.ndarray], learning_rate: float,
              step_fn: Callable[[ref.WideResNet, Any, Any, int], ref.StepOut],
              steps: int = STEPS, dtype: torch.dtype = torch.float32
              ) -> tuple[Trajectory, ref.WideResNet]:
  """``steps`` calls of ``step_fn(net, optimizer, scheduler, t)`` from ``init``,
  with the reference's SGD and LambdaLR cosine over ``steps``; ``dtype``
  float64 gives the port's float64 trajectory (``step_fn`` casts its inputs
  with :func:`cast`)."""
  net = torch_net(init).to(dtype)
  optimizer, scheduler = ref.sgd_and_schedule(net, learning_rate, steps)
  outs = [step_fn(net, optimizer, scheduler, t) for t in range(steps)]
  final = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
  return Trajectory(losses=np.array([o.loss for o in outs]), lrs=np.array([o.lr for o in outs]),
                    final=final), net


def cast(net: torch.nn.Module, x: Any) -> torch.Tensor:
  """``x`` (tensor or array) in the dtype of ``net``'s weights."""
  return torch.as_tensor(x).to(net.conv1.weight.dtype)


# --- comparison --------------------------------------------------------------------------

def deviation(a: np.ndarray, b: np.ndarray) -> float:
  """``max|a - b| / max|b|`` (``b``: PyTorch)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


QUANTITIES = ("loss", "lr", "params", "bn_mean", "bn_var")
# A deviation passes when <= max(RTOL, FLOOR_FACTOR * the port's own float32
# error), the latter measured in the same test as the deviation of the port's
# float32 run from its float64 run.
FLOOR_FACTOR = 4.0


@dataclasses.dataclass
class Report:
  """Deviations of one jaxrobust run from one PyTorch run."""
  name: str
  loss: float  # max over steps of |loss_jax - loss_torch| / |loss_torch|
  lr: float  # max over steps, relative
  params: float  # max over parameters
  params_worst: str
  kernels: float  # max over conv / fc weights only
  bn_mean: float
  bn_var: float  # running_var, raw (both sides average the unbiased batch variance)
  moved: float  # max over kernels of max|final - init| / max|final|: the test is meaningful
  loss_drop: float  # first loss - last loss (torch)
  floor: "Report | None" = None  # the port's float32 run vs its float64 run

  def line(self) -> str:
    out = (f"{self.name:34s} loss {self.loss:.1e}  params {self.params:.1e} "
           f"({self.params_worst}; kernels {self.kernels:.1e})  bn mean {self.bn_mean:.1e}  "
           f"bn var {self.bn_var:.1e}  lr {self.lr:.1e}  "
           f"moved {self.moved:.2f}  loss {self.loss_drop:+.3f}")
    if self.floor is not None:
      f = self.floor
      out += (f"\n{'':34s} torch f32 vs f64: loss {f.loss:.1e}  params {f.params:.1e} "
              f"({f.params_worst}; kernels {f.kernels:.1e})  bn mean {f.bn_mean:.1e}  "
              f"bn var {f.bn_var:.1e}")
    return out

  def tolerance(self, what: str, rtol: float = RTOL) -> float:
    floor = getattr(self.floor, what) if self.floor is not None else 0.0
    return max(rtol, FLOOR_FACTOR * floor)

  def assert_parity(self, rtol: float = RTOL) -> None:
    print(self.line())
    assert self.moved > 1e-3, f"{self.name}: parameters barely moved; the comparison is empty"
    for what in QUANTITIES:
      tol = self.tolerance(what, rtol)
      assert getattr(self, what) <= tol, (
          f"{self.name}: {what} deviates by {getattr(self, what):.2e} > {tol:.1e}\n{self.line()}")


def compare(name: str, jax_traj: Trajectory, torch_traj: Trajectory, init: Mapping[str, Any],
            torch64: Trajectory | None = None) -> Report:
  """Deviations of ``torch_traj`` from ``jax_traj`` (see the module docstring);
  ``torch64``: the port's float64 run, for the float32 floor (``Report.floor``).
  A network without BatchNorm has BatchNorm deviations 0."""
  j, t = jax_traj, torch_traj
  params, means, var = {}, {}, {}
  for key, tv in t.final.items():
    if key.endswith("num_batches_tracked"):
      continue
    jv = j.final[key]
    if key.endswith("running_mean"):
      means[key] = deviation(jv, tv)
    elif key.endswith("running_var"):
      var[key] = deviation(jv, tv)
    else:
      params[key] = deviation(jv, tv)
  worst = max(params, key=params.get)
  kernels = [k for k in params if t.final[k].ndim > 1]
  moved = max(deviation(t.final[k], init[k]) for k in kernels)
  floor = compare(f"{name} floor", torch_traj, torch64, init) if torch64 is not None else None
  return Report(
      name=name, loss=float(np.max(np.abs(j.losses - t.losses) / np.abs(t.losses))),
      lr=float(np.max(np.abs(j.lrs - t.lrs) / np.abs(t.lrs))), params=params[worst],
      params_worst=worst, kernels=max(params[k] for k in kernels), bn_mean=max(means.values(), default=0.0),
      bn_var=max(var.values(), default=0.0), moved=moved, loss_drop=float(t.losses[0] - t.losses[-1]),
      floor=floor)


def compare_family(name: str, jax_run: JaxRun, learning_rate: float,
                   step_fn: Callable[[ref.WideResNet, Any, Any, int], ref.StepOut], *,
                   floor: bool = True) -> Report:
  """The PyTorch port ``step_fn`` from ``jax_run``'s initial weights, in
  float32 (and float64 for the floor), compared with ``jax_run``."""
  t32, _ = run_torch(jax_run.init, learning_rate, step_fn)
  t64 = run_torch(jax_run.init, learning_rate, step_fn, dtype=torch.float64)[0] if floor else None
  return compare(name, jax_run.traj, t32, jax_run.init, torch64=t64)
