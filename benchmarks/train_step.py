#!/usr/bin/env python
"""WRN-40-2 train-step throughput: jaxrobust (1 device, sharded) vs PyTorch, one run.

Workload (the Hendrycks et al. CIFAR recipe): WRN-40-2, batch 128 of 32x32x3,
softmax cross-entropy, SGD(lr 0.1, momentum 0.9, nesterov) with weight decay
5e-4 on all parameters; one step = forward, backward, update and BatchNorm
running-statistics update.

Every configuration runs in its own worker process (XLA_FLAGS, such as the
host device count, must be set before jax is imported). Workers are started and
compiled one after the other, then timed in round-robin rounds, so that load
from other processes on a shared machine hits all configurations alike. The
table gives the median over rounds of ``--steps`` consecutive steps, after
``--warmup`` untimed steps.

Usage:
  python benchmarks/train_step.py                       # main table
  python benchmarks/train_step.py --host_devices 2,8    # sharded over 2 and 8
  python benchmarks/train_step.py --explore             # + XLA flag / dtype study
  python benchmarks/train_step.py --only jax-1dev,torch-channels_last
  python benchmarks/train_step.py --ref 74a52ac       # + the same rows for an older revision
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from jaxrobust.xla_flags import CPU_CONV_XLA_FLAG  # noqa: E402  (imports no jax)

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Config:
  """One measured configuration."""
  name: str
  framework: str = "jax"          # "jax" | "torch"
  devices: int = 1                 # jax: host devices the batch is sharded over
  xla_flags: str = ""              # extra XLA_FLAGS (jax)
  dtype: str = "float32"           # jax computation dtype
  donate: bool = True              # jax: donate the train state buffers
  memory_format: str = "nchw"      # torch: "nchw" | "channels_last"
  repo: str = ""                   # jax: import jaxrobust from this checkout (--ref)
  note: str = ""
  model: str = "wrn_40_2"          # a jaxrobust model name (torch: wrn_D_W or resnet50)
  image_size: int = 32
  num_classes: int = NUM_CLASSES
  device: str = "cpu"              # torch: "cpu" | "cuda"


# The flag the launcher sets on CPU (jaxrobust/xla_flags.py; benchmarks/README.md).
TUNED_XLA_FLAGS = CPU_CONV_XLA_FLAG


def default_configs(host_devices: list[int], cores: int) -> list[Config]:
  configs = []
  for flags, tag, what in [("", "", "default XLA flags"),
                           (TUNED_XLA_FLAGS, "-tuned", "Eigen convs (TUNED_XLA_FLAGS)")]:
    configs.append(Config(f"jax-1dev{tag}", xla_flags=flags, note=f"jit, 1 device, {what}"))
    configs += [Config(f"jax-{n}dev{tag}", devices=n, xla_flags=flags,
                       note=f"jit, batch sharded over {n} host devices, {what}")
                for n in host_devices if n > 1]
  configs += [Config("torch-nchw", "torch", note=f"PyTorch, {cores} threads"),
              Config("torch-channels_last", "torch", memory_format="channels_last",
                     note=f"PyTorch, {cores} threads")]
  return configs


def explore_configs(n: int) -> list[Config]:
  """Options tried on top of the main table (see benchmarks/README.md)."""
  eigen_conv = TUNED_XLA_FLAGS
  onednn = "--xla_cpu_use_onednn=true"
  one_thread = "--xla_cpu_multi_thread_eigen=false"
  return [
      Config("jax-1dev-nodonate", donate=False, note="no buffer donation"),
      Config("jax-1dev-tuned-nodonate", xla_flags=eigen_conv, donate=False,
             note="Eigen convs, no buffer donation"),
      Config("jax-1dev-bf16", dtype="bfloat16", note="bfloat16 compute, f32 params"),
      Config("jax-1dev-onednn", xla_flags=onednn, note="oneDNN thunks"),
      Config("jax-1dev-onednnconv", xla_flags=f"{eigen_conv} {onednn}",
             note="oneDNN instead of YNNPACK convs"),
      Config("jax-1dev-tuned-bf16", xla_flags=eigen_conv, dtype="bfloat16",
             note="Eigen convs, bfloat16 compute"),
      Config("jax-1dev-noynn", xla_flags="--xla_cpu_experimental_ynn_fusion_type=",
             note="no YNNPACK fusions at all"),
      Config("jax-1dev-tuned-noconcsched",
             xla_flags=f"{eigen_conv} --xla_cpu_enable_concurrency_optimized_scheduler=false",
             note="Eigen convs, default scheduler"),
      Config("jax-1dev-tuned-xnngraph", xla_flags=f"{eigen_conv} "
             "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
             note="Eigen convs, XNNPACK graph fusion"),
      Config("jax-2dev-tuned", devices=2, xla_flags=eigen_conv, note="Eigen convs, 2 devices"),
      Config(f"jax-{2 * n}dev", devices=2 * n, note=f"{2 * n} devices"),
      Config(f"jax-{n}dev-onednn", devices=n, xla_flags=onednn, note="oneDNN thunks"),
      Config(f"jax-{n}dev-1thread-eigen", devices=n, xla_flags=one_thread,
             note="single-threaded Eigen"),
      Config(f"jax-{n}dev-bf16", devices=n, dtype="bfloat16", note="bfloat16 compute"),
  ]


# ----------------------------------------------------------------------------
# Worker side: builds one configuration and answers "RUN <steps>" on stdin.
# ----------------------------------------------------------------------------

def _use_checkout(repo: str) -> None:
  """Imports jaxrobust from ``repo`` (another revision) in this worker."""
  for name in [m for m in sys.modules if m == "jaxrobust" or m.startswith("jaxrobust.")]:
    del sys.modules[name]
  sys.path.insert(0, repo)


def _jaxrobust_step(cfg: Config, mesh):
  """jaxrobust's own train step: the trainer's loss composition
  (cross-entropy), optimizer (SGD Nesterov 0.9, L2 5e-4 before momentum, cosine
  lr 0.1) and input handling (uint8 -> [0, 1] -> normalised inside the model;
  no augmentation, as in the PyTorch rows). Returns (step, state, state
  shardings, extra step arguments).

  Revisions up to 74a52ac (before the method architecture) had another step
  API; it is built here too so that ``--ref`` can time them side by side.
  """
  import jax
  import jax.numpy as jnp

  from jaxrobust import losses, optim
  from jaxrobust import sharding as sharding_lib
  from jaxrobust import train_state as state_lib
  from jaxrobust import train_step as step_lib
  from jaxrobust.config import base_config
  from jaxrobust.models import get_model

  k = cfg.num_classes
  model = get_model(cfg.model, num_classes=k, dtype=jnp.dtype(cfg.dtype))
  config = base_config()
  mean = std = (0.5, 0.5, 0.5)
  shape = (cfg.image_size, cfg.image_size, 3)
  schedule = optim.learning_rate_schedule(config.optimizer, 10_000, 390)
  tx = optim.create_optimizer(config.optimizer, schedule)
  if hasattr(state_lib, "ModuleState"):  # the current API
    from jaxrobust.modules import Module
    module = Module(name="classifier", model=model, num_classes=k,
                    input_shape=shape, mean=mean, std=std, tx=tx, schedule=schedule)
    spec = step_lib.StepSpec(
        modules={"classifier": module}, streams={"train": step_lib.StreamStep("train")},
        updates=[step_lib.Update("classifier", "classifier",
                                 losses.build_loss(config.losses), ("train",))],
        num_classes=k)
    step = step_lib.make_train_step(spec)
    abstract = state_lib.abstract_state({"classifier": module})
    create = lambda r: state_lib.create_state({"classifier": module}, r)
    extra = ({},)
  else:  # 74a52ac and older
    from jaxrobust.data import augment
    preprocess = {"train": lambda im, r, train: augment.preprocess(
        im, r, train=False, flip=False, crop_padding=0, mean=mean, std=std)}
    step = step_lib.make_train_step(model, tx, losses.build_loss(config.losses),
                                    num_classes=k, preprocess=preprocess,
                                    learning_rate=schedule)
    abstract = state_lib.abstract_state(model, tx, (1,) + shape)
    create = functools.partial(state_lib.create_state, model, tx, input_shape=(1,) + shape)
    extra = ()
  state_sh = sharding_lib.tree_shardings(abstract, mesh, ((".*", "replicate"),))
  state = jax.jit(create, out_shardings=state_sh)(jax.random.PRNGKey(0))
  return step, state, state_sh, extra


def _jax_worker(cfg: Config, batch: int):
  """Returns (run(steps) -> seconds, info dict)."""
  if cfg.repo:
    _use_checkout(cfg.repo)
  else:
    sys.path.insert(0, REPO)
  import jax
  import numpy as np

  from jaxrobust import sharding as sharding_lib

  if jax.device_count() < cfg.devices:
    raise RuntimeError(f"{cfg.name}: {jax.device_count()} devices, need {cfg.devices}")
  if batch % cfg.devices:
    raise ValueError(f"batch {batch} is not divisible by {cfg.devices} devices")
  mesh = sharding_lib.make_mesh((("data", cfg.devices),), devices=jax.devices()[:cfg.devices])
  step, state, state_sh, extra = _jaxrobust_step(cfg, mesh)
  rng = np.random.RandomState(0)
  size = cfg.image_size
  batch_np = {"train": {"image": rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8),
                        "label": rng.randint(0, cfg.num_classes, batch).astype(np.int32),
                        "index": np.arange(batch, dtype=np.int32),
                        "mask": np.ones(batch, bool)}}
  if not extra:
    del batch_np["train"]["index"]
  data_sh = sharding_lib.data_sharding(mesh, ("data",))
  replicated = sharding_lib.replicated(mesh)
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  batch_arrays = jax.device_put(batch_np, data_sh)
  root_rng = jax.device_put(np.asarray(jax.device_get(state.rng)), replicated)
  shardings = (state_sh, data_sh, replicated) + (replicated,) * len(extra)
  step_fn = jax.jit(step, in_shardings=shardings, out_shardings=(state_sh, replicated),
                    donate_argnums=(0,) if cfg.donate else ())

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays, root_rng, *extra).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # cost_analysis counts the FLOPs of one device's program.
  flops = float(cost.get("flops", 0.0)) * cfg.devices
  holder = {"state": state}

  def run(steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      holder["state"], metrics = compiled(holder["state"], batch_arrays, root_rng, *extra)
      # One step in flight, as in the trainer (XLA:CPU host-device collectives
      # deadlock when dozens of programs are queued).
      metrics["loss"].block_until_ready()
    return time.perf_counter() - t

  info = {"compile_s": compile_s, "flops_per_step": flops,
          "params": num_params}
  return run, info


def _torch_wrn(depth: int = 40, width: int = 2, num_classes: int = NUM_CLASSES):
  """The hendrycks WideResNet (``wrn.py`` layout and names), the PyTorch port
  of the parity tests (``tests/parity/torch_reference.py``)."""
  from tests.parity.torch_reference import WideResNet
  return WideResNet(depth, num_classes, width)


def _torch_model(cfg: Config):
  """The PyTorch twin of ``cfg.model``: ``wrn_<depth>_<width>`` (written
  below) or ``resnet50`` (torchvision's, which must be installed)."""
  if cfg.model.startswith("wrn_"):
    _, depth, width = cfg.model.split("_")
    return _torch_wrn(int(depth), int(width), cfg.num_classes)
  if cfg.model == "resnet50":
    import torchvision
    return torchvision.models.resnet50(num_classes=cfg.num_classes)
  raise ValueError(f"no PyTorch twin of {cfg.model!r} in this benchmark")


def _torch_worker(cfg: Config, batch: int, threads: int):
  import contextlib

  import numpy as np
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  device = torch.device(cfg.device)
  model = _torch_model(cfg).to(device)
  fmt = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
  model = model.to(memory_format=fmt).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                        weight_decay=5e-4)
  rng = np.random.RandomState(0)
  size = cfg.image_size
  images = torch.from_numpy(rng.randn(batch, 3, size, size).astype(np.float32)).to(device)
  images = images.contiguous(memory_format=fmt)
  labels = torch.from_numpy(rng.randint(0, cfg.num_classes, batch)).to(device)
  loss_fn = torch.nn.CrossEntropyLoss()
  # bfloat16 as jax's dtype=bfloat16: activations and matmuls in bf16, float32 parameters.
  cast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
          if cfg.dtype == "bfloat16" else contextlib.nullcontext())

  def run(steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      opt.zero_grad(set_to_none=True)
      with cast:
        loss = loss_fn(model(images), labels)
      loss.backward()
      opt.step()
    loss.item()  # waits for the device
    return time.perf_counter() - t

  return run, {"compile_s": 0.0, "flops_per_step": 0.0, "torch": torch.__version__,
               "params": sum(p.numel() for p in model.parameters())}


def _matmul_worker(size: int = 2048):
  """Single-device f32 jnp.dot, the 'matmul peak' of the % of peak column."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()

  def run(steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      out = f(a)
    out.block_until_ready()
    return time.perf_counter() - t

  return run, {"compile_s": 0.0, "flops_per_step": 2.0 * size ** 3, "params": 0}


def worker_main(spec: str) -> None:
  args = json.loads(spec)
  cfg = Config(**args["config"])
  flags = [os.environ.get("XLA_FLAGS", ""), cfg.xla_flags]
  if cfg.framework == "jax":
    flags.append(f"--xla_force_host_platform_device_count={max(cfg.devices, 1)}")
  os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f).strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if cfg.framework == "torch":
    run, info = _torch_worker(cfg, args["batch"], args["threads"])
  elif cfg.framework == "matmul":
    run, info = _matmul_worker()
  else:
    run, info = _jax_worker(cfg, args["batch"])
  run(args["warmup"])
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "RUN":
      print(f"TIME {run(int(cmd[1])):.6f}", flush=True)
    else:
      break


# ----------------------------------------------------------------------------
# Numerical cross-check of the Flax WRN against the PyTorch one.
# ----------------------------------------------------------------------------

def torch_check_main() -> None:
  """Copies Flax WRN-16-2 weights into the PyTorch WRN and compares a train step.

  Runs in float64 on both sides so that the comparison is tight (1e-9).
  """
  import jax
  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch

  sys.path.insert(0, REPO)
  from jaxrobust.models import get_model

  torch.set_num_threads(1)
  depth, width, batch = 16, 2, 8
  model = get_model("wrn", num_classes=NUM_CLASSES, depth=depth, width=width, dtype=jnp.float64)
  rng = np.random.RandomState(0)
  x = rng.randn(batch, 32, 32, 3)
  y = rng.randint(0, NUM_CLASSES, batch)
  variables = model.init(jax.random.key(0), jnp.asarray(x), train=False)
  variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
  params, stats = variables["params"], variables["batch_stats"]

  def loss_fn(p):
    (logits, feats), upd = model.apply({"params": p, "batch_stats": stats}, jnp.asarray(x),
                                       train=True, return_features=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
    return loss, (logits, feats, upd["batch_stats"])

  (_, (logits, feats, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

  from jaxrobust import convert

  tmodel = _torch_wrn(depth, width).double()
  t = lambda a: torch.from_numpy(np.array(a))
  # jaxrobust.convert maps the Flax tree to the reference's state_dict names.
  tmodel.load_state_dict({k: t(v) for k, v in convert.to_torch(params, stats, arch="wrn").items()},
                         strict=True)
  tconvs = [m for m in tmodel.modules() if isinstance(m, torch.nn.Conv2d)]
  tgrads = convert.to_torch(grads, stats, arch="wrn")
  flax_conv_grads = [tgrads[n + ".weight"] for n, m in tmodel.named_modules()
                     if isinstance(m, torch.nn.Conv2d)]
  tmodel.train()
  tx = t(x.transpose(0, 3, 1, 2))
  tlogits, tfeats = tmodel(tx, return_features=True)
  torch.nn.functional.cross_entropy(tlogits, t(y)).backward()
  rows = [
      ("train-mode logits", logits, tlogits.detach().numpy()),
      ("features", feats, tfeats.detach().numpy()),
      ("head kernel grad", grads["head"]["kernel"], tmodel.fc.weight.grad.numpy().T),
      ("conv kernel grads (all, worst)", np.concatenate([np.ravel(g) for g in flax_conv_grads]),
       np.concatenate([m.weight.grad.numpy().ravel() for m in tconvs])),
      ("final BN running mean", new_stats["bn"]["mean"], tmodel.bn1.running_mean.numpy().copy()),
      # Both update running_var with the unbiased batch variance (layers.BatchNorm).
      ("final BN running var", new_stats["bn"]["var"], tmodel.bn1.running_var.numpy().copy()),
  ]
  shifted = _map_stats(stats, lambda s: {"mean": s["mean"] + 0.1, "var": s["var"] * 1.5})
  tmodel.eval()
  tmodel.load_state_dict({k: t(v) for k, v in convert.to_torch(params, shifted, arch="wrn").items()})
  with torch.no_grad():
    eval_ref = tmodel(tx).numpy()
  eval_logits = model.apply({"params": params, "batch_stats": shifted}, jnp.asarray(x),
                            train=False)
  rows.append(("eval-mode logits (shifted running stats)", eval_logits, eval_ref))
  worst = 0.0
  print(f"Flax vs PyTorch WRN-{depth}-{width}, float64, batch {batch} "
        "(max |diff| / max |torch|):")
  for name, a, b in rows:
    rel = float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))
    worst = max(worst, rel)
    print(f"  {name:44s} {rel:.1e}")
  print(f"  => {'OK' if worst < 1e-9 else 'MISMATCH'} (tolerance 1e-9)", flush=True)
  if worst >= 1e-9:
    sys.exit(1)


def _map_stats(tree, fn):
  if "mean" in tree:
    return fn(tree)
  return {k: _map_stats(v, fn) for k, v in tree.items()}


# ----------------------------------------------------------------------------
# Coordinator.
# ----------------------------------------------------------------------------

class Worker:
  def __init__(self, cfg: Config, batch: int, warmup: int, threads: int):
    self.cfg = cfg
    spec = json.dumps({"config": dataclasses.asdict(cfg), "batch": batch, "warmup": warmup,
                       "threads": threads})
    env = dict(os.environ)
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=REPO)
    self.info = json.loads(self._expect("READY"))
    self.times: list[float] = []

  def _expect(self, tag: str) -> str:
    for line in self.proc.stdout:
      if line.startswith(tag + " "):
        return line[len(tag) + 1:]
    raise RuntimeError(f"worker {self.cfg.name} exited with {self.proc.wait()}")

  def run(self, steps: int) -> None:
    self.proc.stdin.write(f"RUN {steps}\n")
    self.proc.stdin.flush()
    self.times.append(float(self._expect("TIME")) / steps)

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write("QUIT\n")
      self.proc.stdin.close()
      self.proc.wait()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--torch_check", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--host_devices", default="8",
                      help="comma-separated host device counts for the sharded jax rows")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=3, help="round-robin timing rounds")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  parser.add_argument("--explore", action="store_true", help="also time the option study")
  parser.add_argument("--only", default="", help="comma-separated config names to run")
  parser.add_argument("--no_check", action="store_true",
                      help="skip the Flax-vs-PyTorch numerical check")
  parser.add_argument("--ref", default="",
                      help="a git revision of jaxrobust whose jax rows are timed too, side by "
                           "side (e.g. the commit before a refactor)")
  args = parser.parse_args()
  if args.worker:
    return worker_main(args.worker)
  if args.torch_check:
    return torch_check_main()

  host_devices = [int(n) for n in args.host_devices.split(",") if n]
  configs = default_configs(host_devices, args.threads)
  if args.explore:
    configs += explore_configs(max(host_devices))
  if args.only:
    wanted = set(args.only.split(","))
    configs = [c for c in configs if c.name in wanted]
  if args.ref:
    checkout = _export(args.ref)
    configs += [dataclasses.replace(c, name=f"{c.name}@{args.ref[:7]}", repo=checkout,
                                    note=f"{c.note}; jaxrobust at {args.ref}")
                for c in configs if c.framework == "jax"]
  have_torch = _has_module("torch")
  if not have_torch:
    print("torch is not installed (pip install 'jaxrobust[torch]'): PyTorch rows skipped.")
    configs = [c for c in configs if c.framework != "torch"]
  if have_torch and not args.no_check:
    subprocess.run([sys.executable, os.path.abspath(__file__), "--torch_check"], check=True,
                   cwd=REPO)

  print(f"\nWRN-40-2 train step, batch {args.batch}, 32x32x3, SGD nesterov + wd; "
        f"{os.cpu_count()} CPU cores; {args.rounds} rounds x {args.steps} steps "
        f"after {args.warmup} warm-up steps; load average {os.getloadavg()[0]:.1f}.",
        flush=True)
  workers = []
  try:
    for cfg in configs + [Config("matmul-2048", "matmul", note="jnp.dot f32, 1 device")]:
      t = time.perf_counter()
      workers.append(Worker(cfg, args.batch, args.warmup, args.threads))
      print(f"  started {cfg.name:28s} ({time.perf_counter() - t:5.1f} s incl. compile "
            f"{workers[-1].info['compile_s']:.1f} s)", flush=True)
    for _ in range(args.rounds):
      for w in workers:
        w.run(args.steps if w.cfg.framework != "matmul" else 4)
  finally:
    for w in workers:
      w.close()
  _print_table(workers, args.batch)
  print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes skew the "
        "medians; PyTorch's OpenMP threads suffer most)")


def _print_table(workers: list[Worker], batch: int) -> None:
  matmul = next(w for w in workers if w.cfg.framework == "matmul")
  peak = matmul.info["flops_per_step"] / statistics.median(matmul.times)
  jax_flops = next((w.info["flops_per_step"] for w in workers
                    if w.cfg.framework == "jax" and w.cfg.dtype == "float32"), 0.0)
  torch_rows = [w for w in workers if w.cfg.framework == "torch"]
  ref_med = max((batch / statistics.median(w.times) for w in torch_rows), default=None)
  ref_best = max((batch / min(w.times) for w in torch_rows), default=None)
  print(f"\nmatmul peak (jnp.dot 2048, f32, 1 device): {peak / 1e9:.1f} GFLOP/s")
  if jax_flops:
    print(f"XLA cost analysis: {jax_flops / batch / 1e9:.3f} GFLOP/img per train step "
          "(fwd + bwd + update); also used for the PyTorch rows")
  print("img/s and s/step: median over rounds; 'best': fastest round. Ratios are to the "
        "faster PyTorch row (median to median, best to best).")
  header = (f"{'config':26s} {'img/s':>6s} {'s/step':>6s} {'x torch':>7s} {'best':>6s} "
            f"{'x torch':>7s} {'GFLOP/s':>7s} {'%peak':>5s}  note")
  print("\n" + header + "\n" + "-" * len(header))
  for w in workers:
    if w.cfg.framework == "matmul":
      continue
    med, best = statistics.median(w.times), min(w.times)
    gflops = jax_flops / med / 1e9 if jax_flops else float("nan")
    r_med = f"{batch / med / ref_med:.2f}x" if ref_med else "n/a"
    r_best = f"{batch / best / ref_best:.2f}x" if ref_best else "n/a"
    print(f"{w.cfg.name:26s} {batch / med:6.1f} {med:6.2f} {r_med:>7s} {batch / best:6.1f} "
          f"{r_best:>7s} {gflops:7.1f} {100 * gflops * 1e9 / peak:4.0f}%  {w.cfg.note}")


def _export(ref: str) -> str:
  """``git archive`` of revision ``ref`` into a temporary directory."""
  import tempfile
  out = tempfile.mkdtemp(prefix="jaxrobust-ref-")
  archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True)
  subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
  return out


def _has_module(name: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
  main()
