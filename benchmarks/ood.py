#!/usr/bin/env python
"""OOD methods' cost, side by side in one run, printed as tables.

1. Scoring throughput (img/s) of MSP, energy, ODIN and Mahalanobis (with and
   without input pre-processing) on the same model and batch: jaxrobust's
   compiled per-batch prediction (jaxrobust.predict.Predictor), eval mode.
   ODIN and Mahalanobis with ε need a forward, a backward to the input and a
   second forward (about 3x a forward, ideally).
2. Mahalanobis fit on N x D features (default 50,000 x 640, WRN-28-10's
   penultimate width on CIFAR's training set): jaxrobust.methods.mahalanobis.fit
   against the reference computation (per-class means in numpy, then
   sklearn.covariance.EmpiricalCovariance on the class-centred features, as
   lib_generation.sample_estimator).
3. Train-step time of Outlier Exposure / energy fine-tuning (one forward pass
   over an in-distribution batch B plus an outlier batch 2B, CE + the method's
   term) against a clean step on a batch of 3B.

Usage:
  python benchmarks/ood.py                          # WRN-16-2, batch 128 (CPU: about 3 min)
  python benchmarks/ood.py --model wrn_40_2 --batch 128 --features 50000,640
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.timing import median_time as _time  # noqa: E402
from jaxrobust.xla_flags import with_cpu_conv_tuning  # noqa: E402  (imports no jax)


def _model(name: str, depth_width: str):
  import jax.numpy as jnp
  import optax

  from jaxrobust import optim
  from jaxrobust.config import base_config
  from jaxrobust.models import get_model
  from jaxrobust.modules import Module
  kwargs = {}
  if name == "wrn":
    depth, width = map(int, depth_width.split("x"))
    kwargs = {"depth": depth, "width": width}
  model = get_model(name, num_classes=10, dtype=jnp.float32, **kwargs)
  opt = base_config().optimizer
  schedule = optim.learning_rate_schedule(opt, 1000, 100)
  return Module(name="classifier", model=model, num_classes=10, input_shape=(32, 32, 3),
                mean=(0.5,) * 3, std=(0.5,) * 3, tx=optim.create_optimizer(opt, schedule),
                schedule=schedule), optax


def scoring(args) -> list[tuple[str, float]]:
  import jax
  import numpy as np

  from jaxrobust import scores, sharding
  from jaxrobust import train_state as state_lib
  from jaxrobust.data import pipeline
  from jaxrobust.methods import mahalanobis
  from jaxrobust.predict import Predictor
  module, _ = _model(args.model_name, args.wrn)
  state = state_lib.create_state({"classifier": module}, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  n = args.batch * args.batches
  source = pipeline.InMemorySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                   rng.integers(0, 10, n).astype(np.int32))
  mesh = sharding.make_mesh((("data", -1),))
  predictor = Predictor(module, batch_size=args.batch,
                        batch_sharding=sharding.data_sharding(mesh, ("data",)))
  variables = state.classifier.variables
  feats = predictor(variables, source, fields=("features", "label"))
  stats = mahalanobis.fit(feats["features"], feats["label"], 10, ridge=1e-6)
  rows = []
  for name, spec in [("MSP", "msp"), ("energy", "energy"), ("ODIN (T=1000, eps=0.0014)",
                                                           "odin"),
                     ("Mahalanobis, eps=0", "mahalanobis"),
                     ("Mahalanobis, eps=0.0014", "mahalanobis(epsilon=0.0014)")]:
    method = scores.build(spec)
    fitted = {"s": stats} if method.fit is not None else None
    run = lambda m=method, f=fitted: predictor(variables, source, fields=("s",), scores={"s": m},
                                               perturb=m.perturb, perturb_key=m.key, fitted=f)
    seconds = _time(run, args.rounds)
    rows.append((name, n / seconds))
  return rows


def fit_time(args) -> list[tuple[str, float]]:
  import numpy as np
  from sklearn.covariance import EmpiricalCovariance

  from jaxrobust.methods import mahalanobis
  n, d = map(int, args.features.split(","))
  rng = np.random.default_rng(0)
  f = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, 10, n)

  def reference():
    means = np.stack([f[y == c].mean(0) for c in range(10)])
    EmpiricalCovariance(assume_centered=False).fit(f - means[y])

  return [("jaxrobust mahalanobis.fit (float64)", _time(lambda: mahalanobis.fit(f, y, 10), 3)),
          ("reference: numpy means + sklearn EmpiricalCovariance", _time(reference, 3))]


def step_time(args) -> list[tuple[str, float]]:
  import jax
  import numpy as np

  from jaxrobust import losses
  from jaxrobust import train_state as state_lib
  from jaxrobust import train_step as step_lib
  from jaxrobust.methods import energy, outlier_exposure  # noqa: F401  (registers the terms)
  module, _ = _model(args.model_name, args.wrn)
  b = args.batch
  rng = np.random.default_rng(0)

  def batch(n, labelled=True):
    return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "label": (rng.integers(0, 10, n) if labelled else np.full(n, -1)).astype(np.int32),
            "index": np.arange(n, dtype=np.int32), "mask": np.ones(n, bool)}

  def make(streams, terms):
    spec = step_lib.StepSpec(
        modules={"classifier": module},
        streams={s: step_lib.StreamStep(s) for s in streams},
        updates=[step_lib.Update("classifier", "classifier", losses.build_loss(terms),
                                 tuple(streams))], num_classes=10)
    return jax.jit(step_lib.make_train_step(spec), donate_argnums=(0,))

  ce = {"cross_entropy": {}}
  cases = [
      ("clean step, batch 3B", ["train"], ce, {"train": batch(3 * b)}),
      ("OE step, B + 2B outliers", ["train", "outliers"],
       {**ce, "outlier_exposure": {"weight": 0.5}}, {"train": batch(b), "outliers": batch(2 * b, False)}),
      ("energy step, B + 2B outliers", ["train", "outliers"],
       {**ce, "energy_hinge": {"weight": 0.1, "m_in": -25.0, "m_out": -7.0}},
       {"train": batch(b), "outliers": batch(2 * b, False)}),
  ]
  rows = []
  for name, streams, terms, data in cases:
    step = make(streams, terms)
    holder = {"state": state_lib.create_state({"classifier": module}, jax.random.PRNGKey(0))}
    rng_key = np.asarray(jax.device_get(holder["state"].rng))

    def run(step=step, data=data):
      holder["state"], m = step(holder["state"], data, rng_key, {})
      m["loss"].block_until_ready()
    rows.append((name, _time(run, args.rounds)))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="wrn_16_2", help="wrn_<depth>_<width> or small_cnn")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=4, help="batches per scoring round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--features", default="50000,640", help="N,D of the Mahalanobis fit")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = with_cpu_conv_tuning(os.environ.get("XLA_FLAGS", "")).strip()
  if args.model.startswith("wrn_"):
    args.model_name, args.wrn = "wrn", args.model[4:].replace("_", "x")
  else:
    args.model_name, args.wrn = args.model, ""
  import jax
  print(f"{args.model}, batch {args.batch}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU cores; medians of {args.rounds} rounds after a warm-up.\n")

  rows = scoring(args)
  base = rows[0][1]
  print(f"{'scoring':40s} {'img/s':>9s} {'vs MSP':>7s}")
  for name, ips in rows:
    print(f"{name:40s} {ips:9.1f} {ips / base:6.2f}x")

  rows = fit_time(args)
  print(f"\n{'Mahalanobis fit, ' + args.features.replace(',', ' x ') + ' features':52s} "
        f"{'s':>7s} {'vs ref':>7s}")
  ref = rows[-1][1]
  for name, seconds in rows:
    print(f"{name:52s} {seconds:7.3f} {ref / seconds:6.2f}x")

  rows = step_time(args)
  clean = rows[0][1]
  print(f"\n{'train step (B = ' + str(args.batch) + ')':40s} {'s/step':>8s} {'vs clean':>9s}")
  for name, seconds in rows:
    print(f"{name:40s} {seconds:8.3f} {seconds / clean:8.2f}x")


if __name__ == "__main__":
  main()
