#!/usr/bin/env python
"""Cost of adversarial (PGD) training and evaluation, side by side in one run.

1. Train step: a clean step against an adversarial PGD-10 step (Hendrycks et
   al.'s PGD_linf for training: eps=8/255, step 2/255, 10 steps, random start)
   on the same model, batch and optimizer. Both steps are built the way the
   trainer builds them (jaxrobust.build.build_modules / build_updates, the
   perturbation from ``config.streams.train.perturb``), then jitted with the
   state donated. A PGD-10 step runs 10 attack steps (forward + backward to the
   input, train-mode BatchNorm) before the clean step's forward, backward and
   update: about 11x a clean step if an attack step cost as much as a train step
   (it costs less: no weight gradients, no update).
2. Evaluation throughput (img/s, eval mode, jaxrobust.predict.Predictor as the
   robust evaluator runs it) of clean accuracy against accuracy under PGD-20
   (their test attack): 20 attack steps and one forward per batch.
3. Where the time goes: a train-mode forward, one attack step (the gradient of
   the summed cross-entropy w.r.t. the input), the PGD-10 perturbation alone,
   and the eval-mode forward and attack step; the "model" column predicts the
   rows above from these parts (clean step + 10 attack steps; forward + 20
   attack steps). ``--rolled`` adds the PGD-10 perturbation with its
   ``fori_loop`` rolled (pgd's default on accelerators; on CPU it unrolls, see
   jaxrobust.attacks.pgd).

Usage:
  python benchmarks/adversarial.py                       # WRN-16-2, batch 128 (CPU: about 2-3 min)
  python benchmarks/adversarial.py --model wrn_40_2 --rounds 5
  python benchmarks/adversarial.py --rolled              # + PGD-10 with a rolled loop (slow on CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.timing import median_time as _time  # noqa: E402
from jaxrobust.xla_flags import with_cpu_conv_tuning  # noqa: E402  (imports no jax)

TRAIN_ATTACK = "pgd(eps=8/255, step_size=2/255, steps=10)"
EVAL_ATTACK = "pgd(eps=8/255, step_size=2/255, steps=20)"


def _config(args, perturb: str):
  import ml_collections

  from jaxrobust.config import base_config
  config = base_config()
  config.model.name = args.model_name
  config.model.kwargs = ml_collections.ConfigDict(args.model_kwargs)
  config.streams.train.perturb = perturb
  return config


def _step(args, perturb: str):
  """(jitted step, modules) built from a config as the trainer does."""
  import jax

  from jaxrobust import attacks, build
  from jaxrobust import train_step as step_lib
  config = _config(args, perturb)
  modules = build.build_modules(config, num_classes=10, image_shape=(32, 32, 3),
                                total_steps=1000, steps_per_epoch=100)
  spec = config.streams.train.perturb
  stream_steps = {"train": step_lib.StreamStep(
      name="train", perturb=attacks.build(spec, where="config.streams.train.perturb")
      if spec else None)}
  updates = build.build_updates(config, modules, stream_steps, {})
  step_spec = step_lib.StepSpec(modules=modules, streams=stream_steps, updates=updates,
                                num_classes=10)
  return jax.jit(step_lib.make_train_step(step_spec), donate_argnums=(0,)), modules


def _batch(n: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          "label": rng.integers(0, 10, n).astype(np.int32),
          "index": np.arange(n, dtype=np.int32), "mask": np.ones(n, bool)}


def train_steps(args) -> dict[str, float]:
  import jax
  import numpy as np

  from jaxrobust import train_state as state_lib
  data = {"train": _batch(args.batch)}
  out = {}
  for name, perturb in [("clean", ""), ("pgd10", TRAIN_ATTACK)]:
    step, modules = _step(args, perturb)
    holder = {"state": state_lib.create_state(modules, jax.random.PRNGKey(0))}
    rng_key = np.asarray(jax.device_get(holder["state"].rng))

    def run(step=step, holder=holder, rng_key=rng_key):
      holder["state"], m = step(holder["state"], data, rng_key, {})
      m["loss"].block_until_ready()
    out[name] = _time(run, args.rounds)
  return out


def parts(args) -> dict[str, float]:
  """Forward, one attack step and the PGD perturbation alone, train and eval mode."""
  import jax
  import jax.numpy as jnp

  from jaxrobust import attacks
  from jaxrobust import train_state as state_lib
  from jaxrobust.data import pp
  _, modules = _step(args, "")
  module = modules["classifier"]
  variables = state_lib.create_state(modules, jax.random.PRNGKey(0)).classifier.variables
  b = _batch(args.batch)
  x = pp.to_unit_range(jnp.asarray(b["image"]))
  labels, mask = jnp.asarray(b["label"]), jnp.asarray(b["mask"])
  out = {}
  # The variables are arguments (as in the step and the Predictor), not constants of the program.
  for mode, train in [("train", True), ("eval", False)]:
    def ce(v, z, train=train):
      return attacks.PerturbContext(
          logits_fn=module.logits_fn(v, train=train), x=z, labels=labels, mask=mask,
          rng=jax.random.PRNGKey(1), num_classes=module.num_classes).cross_entropy(z, labels)
    forward = jax.jit(lambda v, z, train=train: module.logits_fn(v, train=train)(z))
    grad = jax.jit(lambda v, z, ce=ce: jax.grad(lambda q: jnp.sum(ce(v, q)))(z))
    out[f"forward_{mode}"] = _time(lambda f=forward: f(variables, x).block_until_ready(),
                                   args.rounds)
    out[f"attack_step_{mode}"] = _time(lambda g=grad: g(variables, x).block_until_ready(),
                                       args.rounds)
  perturb = attacks.build(TRAIN_ATTACK)
  pgd10 = jax.jit(lambda v, z: perturb(attacks.PerturbContext(
      logits_fn=module.logits_fn(v, train=True), x=z, labels=labels, mask=mask,
      rng=jax.random.PRNGKey(1), num_classes=module.num_classes)))
  out["pgd10_train"] = _time(lambda: pgd10(variables, x).block_until_ready(), args.rounds)
  if args.rolled:  # the same attack with the loop kept rolled (a while loop)
    rolled = jax.jit(lambda v, z: attacks.pgd(
        attacks.PerturbContext(logits_fn=module.logits_fn(v, train=True), x=z, labels=labels,
                               mask=mask, rng=jax.random.PRNGKey(1),
                               num_classes=module.num_classes).cross_entropy,
        z, labels, eps=8 / 255, step_size=2 / 255, steps=10, rng=jax.random.PRNGKey(1),
        unroll=1))
    out["pgd10_rolled"] = _time(lambda: rolled(variables, x).block_until_ready(), 1)
  return out


def evaluation(args) -> dict[str, float]:
  """img/s of clean and PGD-20 accuracy through the Predictor (eval mode)."""
  import jax
  import numpy as np

  from jaxrobust import attacks, sharding
  from jaxrobust import train_state as state_lib
  from jaxrobust.data import pipeline
  from jaxrobust.predict import Predictor
  _, modules = _step(args, "")
  module = modules["classifier"]
  variables = state_lib.create_state(modules, jax.random.PRNGKey(0)).classifier.variables
  n = args.batch * args.eval_batches
  rng = np.random.default_rng(0)
  source = pipeline.InMemorySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                   rng.integers(0, 10, n).astype(np.int32))
  mesh = sharding.make_mesh((("data", -1),))
  predictor = Predictor(module, batch_size=args.batch,
                        batch_sharding=sharding.data_sharding(mesh, ("data",)))
  out = {}
  for name, spec in [("clean", None), ("pgd20", EVAL_ATTACK)]:
    perturb = attacks.build(spec, where="benchmark") if spec else None
    run = lambda p=perturb, k=spec or "": predictor(variables, source, fields=("correct",),
                                                     perturb=p, perturb_key=k)
    out[name] = n / _time(run, args.rounds)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="wrn_16_2", help="wrn_<depth>_<width> or small_cnn")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median) after a warm-up")
  parser.add_argument("--eval_batches", type=int, default=1, help="batches per evaluation round")
  parser.add_argument("--rolled", action="store_true",
                      help="also time PGD-10 with the loop rolled (slow on XLA:CPU: naive "
                           "input-gradient convolutions inside a while loop)")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = with_cpu_conv_tuning(os.environ.get("XLA_FLAGS", "")).strip()
  if args.model.startswith("wrn_"):
    depth, width = map(int, args.model[4:].split("_"))
    args.model_name, args.model_kwargs = "wrn", {"depth": depth, "width": width}
  else:
    args.model_name, args.model_kwargs = args.model, {}
  import jax
  print(f"{args.model}, batch {args.batch}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU cores; medians of {args.rounds} rounds after a warm-up.\n"
        f"train attack: {TRAIN_ATTACK}; eval attack: {EVAL_ATTACK}.\n")
  t0 = time.perf_counter()

  steps = train_steps(args)
  p = parts(args)
  ev = evaluation(args)
  b = args.batch

  clean, adv = steps["clean"], steps["pgd10"]
  model_adv = clean + 10 * p["attack_step_train"]
  print(f"{'train step (B = ' + str(b) + ')':34s} {'s/step':>8s} {'img/s':>8s} {'vs clean':>9s} "
        f"{'model':>8s}")
  print(f"{'clean step':34s} {clean:8.3f} {b / clean:8.1f} {1.0:8.2f}x {'':>8s}")
  print(f"{'PGD-10 step':34s} {adv:8.3f} {b / adv:8.1f} {adv / clean:8.2f}x "
        f"{model_adv / clean:7.2f}x")
  print(f"{'(ideal if attack step = train step)':34s} {'':>8s} {'':>8s} {11.0:8.2f}x")

  clean_ips, adv_ips = ev["clean"], ev["pgd20"]
  model_ips = b / (p["forward_eval"] + 20 * p["attack_step_eval"])
  print(f"\n{'evaluation (eval mode)':34s} {'img/s':>8s} {'vs clean':>9s} {'model':>8s}")
  print(f"{'clean accuracy':34s} {clean_ips:8.1f} {1.0:8.3f}x")
  print(f"{'PGD-20 robust accuracy':34s} {adv_ips:8.1f} {adv_ips / clean_ips:8.3f}x "
        f"{model_ips / clean_ips:7.3f}x")

  print(f"\n{'where the time goes (batch ' + str(b) + ')':44s} {'s':>8s} {'vs fwd':>7s}")
  rows = [("forward, train mode", p["forward_train"], p["forward_train"]),
          ("attack step = fwd + bwd to x, train mode", p["attack_step_train"],
           p["forward_train"]),
          ("PGD-10 perturbation alone, train mode", p["pgd10_train"], p["forward_train"]),
          ("clean train step (fwd + bwd + update)", clean, p["forward_train"]),
          ("forward, eval mode", p["forward_eval"], p["forward_eval"]),
          ("attack step = fwd + bwd to x, eval mode", p["attack_step_eval"], p["forward_eval"])]
  if "pgd10_rolled" in p:
    rows.insert(3, ("PGD-10 alone, rolled loop (unroll=1)", p["pgd10_rolled"], p["forward_train"]))
  for name, seconds, ref in rows:
    print(f"{name:44s} {seconds:8.3f} {seconds / ref:6.2f}x")
  print(f"\nPGD-10 step = clean step + {(adv - clean) / p['attack_step_train']:.1f} attack steps "
        f"(perturbation alone: {p['pgd10_train'] / p['attack_step_train']:.1f} attack steps); "
        f"an attack step costs {p['attack_step_train'] / clean:.2f} of a clean train step.")
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
