"""Benchmark: DFR's L1 logistic-regression fits, batched JAX vs a liblinear loop.

Synthetic embeddings shaped like ResNet-50 avgpool features (2048-d,
non-negative, about half exactly zero, per-feature scales from a Gamma law;
a weak "core" signal from the label and a strong "spurious" one from the
place), in Waterbirds' group proportions (validation 467/466/133/133 of 1,199;
training 3498/184/56/1057). Four workloads, as DFR runs them
(:mod:`jaxrobust.methods.dfr`):

* ``tr_val tune``: the 7 values of C on the balanced half of the validation set;
* ``tr_val final``: 20 fits at one C on fresh balanced subsamples of the
  validation set;
* ``tr_tr tune``: 7 C × 13 class weights (91 fits) on one balanced training
  subsample (liblinear capped at ``max_iter=20`` as the reference; ours to
  ``tol``);
* ``tr_tr final``: 10 fits on fresh balanced training subsamples.

jaxrobust: one :func:`dfr.fit_many` call per workload (FISTA, float32, stop at
relative duality gap 1e-4). Reference: ``LogisticRegression(penalty='l1',
solver='liblinear', C=C)`` (float64, default ``tol=1e-4``) in a Python loop.
Each side runs once to warm up (and compile), then ``--repeats`` times; the
table shows medians, reference_time / time, and the largest relative excess
of our objective over liblinear's and the smallest prediction agreement.

  python benchmarks/dfr.py                        # full sizes
  python benchmarks/dfr.py --dim 512 --scale 0.25 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed  # noqa: E402
from jaxrobust.methods import dfr  # noqa: E402

VAL_GROUPS = (467, 466, 133, 133)
TRAIN_GROUPS = (3498, 184, 56, 1057)


def embeddings(group_sizes, scale, rng):
  """Features [N, len(scale)], labels and groups (group = 2 label + place)."""
  dim = len(scale)
  g = np.concatenate([np.full(n, k) for k, n in enumerate(group_sizes)])
  y, place = g // 2, g % 2
  z = rng.normal(size=(g.size, dim))
  z[:, :dim // 16] += 0.6 * (2 * y[:, None] - 1)
  z[:, dim // 16:dim // 4] += 1.0 * (2 * place[:, None] - 1)
  return (np.maximum(z, 0) * scale).astype(np.float32), y, g


def liblinear_loop(x, y, cs, weights=None, max_iter=100):
  out = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for i, c in enumerate(cs):
      xi, yi = (x[i], y[i]) if x.ndim == 3 else (x, y)
      m = LogisticRegression(penalty="l1", solver="liblinear", C=c, max_iter=max_iter)
      m.fit(xi, yi, sample_weight=None if weights is None else weights[i])
      out.append((m.coef_[0], m.intercept_[0]))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--scale", type=float, default=1.0, help="multiplies the group sizes")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--only", default="", help="comma-separated workloads to run")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  size = lambda sizes: [max(4, int(round(n * args.scale))) for n in sizes]  # noqa: E731
  feature_scale = rng.gamma(2.0, 0.25, size=args.dim)
  x_val, y_val, g_val = embeddings(size(VAL_GROUPS), feature_scale, rng)
  x_tr, y_tr, g_tr = embeddings(size(TRAIN_GROUPS), feature_scale, rng)

  val_plan = dfr.tr_val_plan(g_val, seed=0)
  tr_plan = dfr.tr_tr_plan(g_tr, seed=0)
  mean, scale = dfr.standardize_fit(x_val[val_plan.tune_fit])
  x_tune = np.asarray(dfr.standardize(x_val[val_plan.tune_fit], mean, scale))
  mean, scale = dfr.standardize_fit(x_tr)
  x_val_std = np.asarray(dfr.standardize(x_val, mean, scale))
  x_tr_std = np.asarray(dfr.standardize(x_tr, mean, scale))
  cands = [(c, w0, w1) for c in dfr.C_GRID for w0, w1 in dfr._class_weight_candidates(
      True, dfr.CLASS_WEIGHT_GRID)]
  y_trt = y_tr[tr_plan.tune]
  cw = np.asarray([np.where(y_trt == 1, w1, w0) for _, w0, w1 in cands])
  y_trf = y_tr[tr_plan.final]
  workloads = {  # name: (x, y, C, sample weights, liblinear max_iter)
      "tr_val tune": (x_tune, y_val[val_plan.tune_fit], np.asarray(dfr.C_GRID), None, 100),
      "tr_val final": (x_val_std[val_plan.final], y_val[val_plan.final],
                       np.full(len(val_plan.final), 0.3), None, 100),
      "tr_tr tune": (x_tr_std[tr_plan.tune], y_trt, np.asarray([c for c, _, _ in cands]), cw, 20),
      "tr_tr final": (x_tr_std[tr_plan.final], y_trf, np.full(len(tr_plan.final), 0.3),
                      np.where(y_trf == 1, 2.0, 1.0), 100),
  }
  only = [w for w in args.only.split(",") if w]
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), D = {args.dim}, "
        f"validation {len(y_val)} (groups {np.bincount(g_val).tolist()}), training {len(y_tr)}, "
        f"median of {args.repeats} after warm-up")
  head = ("workload", "fits", "rows", "liblinear s", "jax s", "x ref", "max obj excess",
          "min agree")
  print("{:<13} {:>5} {:>5} {:>12} {:>8} {:>6} {:>15} {:>9}".format(*head))
  for name, (x, y, cs, w, sk_iter) in workloads.items():
    if only and name not in only:
      continue
    x_j = jnp.asarray(x)
    t_sk, sk = timed(lambda: liblinear_loop(x.astype(np.float64), y, cs, w, sk_iter), args.repeats)
    t_jx, (coef, intercept) = timed(lambda: dfr.fit_many(x_j, y, C=cs, sample_weight=w),
                                    args.repeats)
    excess, agree = [], []
    for i, (c, (sk_w, sk_b)) in enumerate(zip(cs, sk)):
      xi, yi = (x[i], y[i]) if x.ndim == 3 else (x, y)
      wi = None if w is None else w[i]
      ours = float(dfr.l1_logistic_objective(coef[i], intercept[i], xi, yi, C=c, sample_weight=wi))
      theirs = float(dfr.l1_logistic_objective(sk_w, sk_b, xi, yi, C=c, sample_weight=wi))
      excess.append((ours - theirs) / theirs)
      agree.append(np.mean(dfr.predict(coef[i], intercept[i], xi) == (xi @ sk_w + sk_b > 0)))
    print(f"{name:<13} {len(cs):>5} {x.shape[-2]:>5} {t_sk:>12.2f} {t_jx:>8.2f} "
          f"{t_sk / t_jx:>6.2f} {max(excess):>15.1e} {min(agree):>9.4f}", flush=True)


if __name__ == "__main__":
  main()
