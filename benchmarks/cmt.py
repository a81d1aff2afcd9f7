"""CMT for 32x32 inputs vs WRN-16-4: parameters, FLOPs, images/s (inference and
a training step), side by side.

  python benchmarks/cmt.py                       # batch 32, 5 rounds (~10 min)
  python benchmarks/cmt.py --batch 8 --rounds 2  # quick
  python benchmarks/cmt.py --models cmt_ti_32,wrn_16_4,wrn_16_2

FLOPs are XLA's count for the compiled program
(``jax.jit(f).lower(...).compile().cost_analysis()['flops']``; a multiply-add
is 2 FLOPs), per image, for the eval-mode forward pass and for one SGD training
step (forward, backward, update). Timings are medians of ``--rounds`` calls
after a warm-up on the default backend (CPU here); the machine may be shared,
so read the ratios. Both models get 10 classes and float32 compute.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import timed  # noqa: E402
from jaxrobust.models import get_model  # noqa: E402

#: Benchmark name -> (registry name, kwargs).
MODELS = {
    "cmt_ti_32": ("cmt_ti_32", {}),
    # CMT-S with the stride-1 stem: about WRN-16-4's forward FLOPs.
    "cmt_s_32": ("cmt", dict(variant="s", stem_stride=1)),
    "wrn_16_4": ("wrn", dict(depth=16, width=4)),
    "wrn_16_2": ("wrn", dict(depth=16, width=2)),
    "wrn_40_2": ("wrn_40_2", {}),
}


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def measure(name: str, batch: int, rounds: int, num_classes: int = 10) -> dict[str, float]:
  registry_name, kwargs = MODELS[name]
  model = get_model(registry_name, num_classes=num_classes, **kwargs)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(batch, 32, 32, 3), jnp.float32)
  y = jnp.asarray(rng.randint(0, num_classes, batch))
  variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)

  def forward(params, stats, x):
    return model.apply({"params": params, "batch_stats": stats}, x, train=False)

  def train_step(params, stats, opt_state, x, y, key):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new["batch_stats"], opt_state, loss

  fwd = jax.jit(forward).lower(params, stats, x).compile()
  fwd1 = jax.jit(forward).lower(params, stats, x[:1]).compile()
  step = jax.jit(train_step).lower(params, stats, opt_state, x, y, jax.random.key(1)).compile()
  t_fwd, _ = timed(lambda: fwd(params, stats, x), rounds)
  t_step, _ = timed(lambda: step(params, stats, opt_state, x, y, jax.random.key(1)), rounds)
  return {
      "params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)),
      "fwd_flops": flops(fwd1),
      "fwd_flops_batch": flops(fwd) / batch,
      "step_flops": flops(step) / batch,
      "infer_ips": batch / t_fwd,
      "train_ips": batch / t_step,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="cmt_ti_32,cmt_s_32,wrn_16_4",
                      help=f"comma-separated, from {sorted(MODELS)}")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  names = [n for n in args.models.split(",") if n]
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f"unknown --models {unknown}; known: {sorted(MODELS)}")
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), batch {args.batch}, "
        f"32x32x3 inputs, 10 classes, float32")
  rows = {n: measure(n, args.batch, args.rounds) for n in names}
  header = ["", *names]
  lines = [
      ("parameters", lambda r: f"{r['params']:,}"),
      ("forward GFLOPs / image (batch 1)", lambda r: f"{r['fwd_flops'] / 1e9:.3f}"),
      (f"forward GFLOPs / image (batch {args.batch})",
       lambda r: f"{r['fwd_flops_batch'] / 1e9:.3f}"),
      ("train step GFLOPs / image", lambda r: f"{r['step_flops'] / 1e9:.3f}"),
      ("inference images/s", lambda r: f"{r['infer_ips']:.0f}"),
      ("train step images/s", lambda r: f"{r['train_ips']:.0f}"),
  ]
  table = [header] + [[label, *(fmt(rows[n]) for n in names)] for label, fmt in lines]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  for i, row in enumerate(table):
    print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    if i == 0:
      print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  b = rows[names[-1]]
  for name in names[:-1]:
    a = rows[name]
    print(f"{name} / {names[-1]}: forward FLOPs {a['fwd_flops'] / b['fwd_flops']:.2f}x, "
          f"params {a['params'] / b['params']:.2f}x, inference {a['infer_ips'] / b['infer_ips']:.2f}x "
          f"speed, training {a['train_ips'] / b['train_ips']:.2f}x speed")


if __name__ == "__main__":
  main()
