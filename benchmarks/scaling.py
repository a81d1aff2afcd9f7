#!/usr/bin/env python
"""Scaling: the real training loop on 1-8 devices and 1-2 processes (CPU), and
throughput and MFU on an accelerator host against PyTorch.

**CPU topologies** (default). Each row runs ``python -m launch.train`` (or
``launch.local_cluster`` for 2 processes: JAX's distributed runtime, gloo
collectives) with the same config and the same global batch -- strong
scaling -- and reads the steady-state step time from ``metrics.jsonl``
(between the first and the last logged step, so compilation and start-up are
left out). On a host with C cores, splitting it into more XLA devices cannot
go faster than C-fold; the table shows what sharding and process boundaries
cost, as ratios to 1 process × 1 device and to 1 process with the same
number of devices.

**Accelerator** (``--accelerator``, on a GPU or TPU host). jaxrobust's train
step (benchmarks/train_step.py: the trainer's loss, optimizer and input
handling, one step in flight) in bfloat16 on all local devices, for WRN-28-10
(32×32, CIFAR) and ResNet-50 (224×224, ImageNet), beside the same networks in
PyTorch on the same GPU (bf16 autocast, channels_last; ResNet-50 from
torchvision). MFU = model FLOPs per step (XLA's cost analysis of the jax step,
also used for the PyTorch rows: same network) × steps/s ÷ the devices' peak
bf16 FLOP/s (a table of known chips, or ``--peak_tflops``).

Usage:
  python benchmarks/scaling.py                          # CPU topologies (~5 min on 2 cores)
  python benchmarks/scaling.py --topologies 1x1,1x8,2x4 --steps 40
  python benchmarks/scaling.py --accelerator            # on a GPU/TPU host
  python benchmarks/scaling.py --accelerator --models wrn_28_10 --batch 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
             "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}

# (model, image size, classes, default per-device batch)
MODELS = {"wrn_28_10": (32, 10, 128), "resnet50": (224, 1000, 128)}


@dataclasses.dataclass(frozen=True)
class Topology:
  processes: int
  devices_per_process: int

  @property
  def devices(self) -> int:
    return self.processes * self.devices_per_process

  @property
  def name(self) -> str:
    return f"{self.processes}x{self.devices_per_process}"


def parse_topologies(text: str) -> list[Topology]:
  out = []
  for item in text.split(","):
    p, _, d = item.strip().partition("x")
    out.append(Topology(int(p), int(d)))
  return out


def step_seconds(metrics_path: str) -> tuple[float, int]:
  """Steady-state seconds per step from ``metrics.jsonl``: the trainer logs
  ``train/steps_per_second`` = steps done / seconds since the loop started,
  so ``step / rate`` is the time at each logged step; the first logged step
  (compilation included) is the start of the window."""
  points = []
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      m = json.loads(line)
      if "train/steps_per_second" in m:
        points.append((int(m["step"]), m["step"] / m["train/steps_per_second"]))
  if len(points) < 2:
    raise RuntimeError(f"{metrics_path}: fewer than two logged steps; raise --steps.")
  (s0, t0), (s1, t1) = points[0], points[-1]
  return (t1 - t0) / (s1 - s0), s1 - s0


def run_topology(topo: Topology, args: argparse.Namespace, workdir: str) -> float:
  train_args = ["--config", args.config, f"--workdir={workdir}",
                f"--config.num_steps={args.steps}", f"--config.log_every_steps={args.log_every}",
                f"--config.checkpoint_every_steps={10 * args.steps}",
                f"--config.streams.train.batch_size={args.cpu_batch}",
                "--config.progress_bar=False", "--config.plots=False",
                "--config.evaluators.classification.splits=()", "--config.evaluators.ood.sets={}",
                *args.train_flags]
  if args.data_dir:
    train_args.append(f"--config.data.data_dir={args.data_dir}")
  env = {**os.environ, "XLA_FLAGS": ""}
  if topo.processes == 1:
    cmd = [sys.executable, "-m", "launch.train", f"--host_devices={topo.devices_per_process}",
           *train_args]
  else:
    cmd = [sys.executable, "-m", "launch.local_cluster", f"--processes={topo.processes}",
           f"--devices_per_process={topo.devices_per_process}", "--", *train_args]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{topo.name} failed:\n{(out.stdout + out.stderr)[-3000:]}")
  return step_seconds(os.path.join(workdir, "metrics.jsonl"))[0]


def cpu_main(args: argparse.Namespace) -> None:
  topologies = parse_topologies(args.topologies)
  times: dict[str, list[float]] = {t.name: [] for t in topologies}
  root = tempfile.mkdtemp(prefix="jaxrobust-scaling-")
  try:
    for r in range(args.repeats):  # round-robin: load from elsewhere hits every row alike
      for topo in topologies:
        wd = os.path.join(root, f"{topo.name}-{r}")
        times[topo.name].append(run_topology(topo, args, wd))
        print(f"  round {r + 1}: {topo.name} {1e3 * times[topo.name][-1]:.1f} ms/step",
              file=sys.stderr, flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  base = med.get("1x1")
  print(f"\n{args.config}, global batch {args.cpu_batch}, {os.cpu_count()} cores, "
        f"median of {args.repeats} run(s) of {args.steps} steps (steady state)\n")
  print(f"{'processes x devices':<20} {'devices':>7} {'ms/step':>9} {'img/s':>8} "
        f"{'vs 1x1':>7} {'efficiency':>10} {'vs 1 process':>13}")
  for topo in topologies:
    t = med[topo.name]
    same = med.get(f"1x{topo.devices}")
    speedup = base / t if base else float("nan")
    boundary = f"{same / t:.2f}" if same and topo.processes > 1 else "-"
    print(f"{topo.name:<20} {topo.devices:>7} {1e3 * t:>9.1f} {args.cpu_batch / t:>8.0f} "
          f"{speedup:>7.2f} {speedup / topo.devices:>10.2f} {boundary:>13}")
  print("\nvs 1x1: speedup over one device; efficiency: speedup / devices; vs 1 process: "
        "the same number of devices in one process (the cost of the process boundary).")


def peak_flops(device_kind: str, override: float) -> float:
  if override:
    return override * 1e12
  for name, peak in PEAK_BF16.items():
    if name.lower() in device_kind.lower():
      return peak
  return 0.0


def accelerator_main(args: argparse.Namespace) -> None:
  import jax
  import train_step as ts
  kind, count = jax.devices()[0].device_kind, jax.device_count()
  peak = peak_flops(kind, args.peak_tflops) * count
  rows = []
  for model in args.models.split(","):
    size, classes, per_device = MODELS.get(model, (32, 10, 128))
    batch = args.batch or per_device * count
    common = dict(model=model, image_size=size, num_classes=classes, dtype="bfloat16")
    configs = [ts.Config(f"jax-{model}", devices=count, note=f"jit, {count} x {kind}", **common)]
    if ts._has_module("torch") and not args.no_torch:
      import torch
      if torch.cuda.is_available():
        if model != "resnet50" or ts._has_module("torchvision"):
          configs.append(ts.Config(f"torch-{model}", "torch", memory_format="channels_last",
                                   device="cuda", note="PyTorch, 1 GPU, bf16 autocast",
                                   **common))
    workers = []
    for cfg in configs:
      n = 1 if cfg.framework == "torch" else count
      workers.append((ts.Worker(cfg, batch // count * n, args.warmup, os.cpu_count() or 1), n))
    for _ in range(args.rounds):
      for w, _ in workers:
        w.run(args.steps_per_round)
    flops = next(w.info["flops_per_step"] for w, _ in workers if w.cfg.framework == "jax")
    for w, n in workers:
      w.close()
      t = statistics.median(w.times)
      b = batch // count * n
      f = flops * n / count  # the jax step's FLOPs scale with the batch per device
      rows.append((w.cfg.name, n, b, t, b / t, f / t, (f / t) / (peak * n / count)
                   if peak else float("nan"), w.cfg.note))
  print(f"\n{count} x {kind}, peak {peak / 1e12 / count:.0f} TFLOP/s bf16 per chip, "
        f"median of {args.rounds} rounds of {args.steps_per_round} steps\n")
  print(f"{'row':<20} {'chips':>5} {'batch':>6} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>8} "
        f"{'MFU':>6}  note")
  for name, n, b, t, ips, fps, mfu, note in rows:
    print(f"{name:<20} {n:>5} {b:>6} {1e3 * t:>9.2f} {ips:>9.0f} {fps / 1e12:>8.1f} "
          f"{mfu:>6.1%}  {note}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--accelerator", action="store_true")
  parser.add_argument("--topologies", default="1x1,1x2,1x4,1x8,2x1,2x2,2x4")
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--cpu_batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--train_flags", nargs="*", default=[])
  parser.add_argument("--models", default="wrn_28_10,resnet50")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: 128 per chip)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps_per_round", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  (accelerator_main if args.accelerator else cpu_main)(args)


if __name__ == "__main__":
  main()
