"""Benchmark: exact jaxrobust OOD metrics vs scikit-learn, plus the histogram.

Scores are MSP-like with realistic ties: ID confidences pile up at 1.0 and
everything is quantized to 1e-4 (10**4 distinct values). For each size and
ID:OOD ratio, each implementation runs once to warm up (and compile), then
``--repeats`` times; the table shows medians and sklearn_time / time.

  python benchmarks/metrics.py                  # 1e6 and 1e7 scores
  python benchmarks/metrics.py --sizes 1e6 --repeats 5

Conventions compared like for like: AUROC = ``roc_auc_score``; FPR95 = OOD
positive, first ROC point with TPR >= 0.95 (``roc_curve``, as OpenOOD/UB);
AUPR = ``average_precision_score`` with ID positive; "openood" = the three
sklearn curves OpenOOD computes (``roc_curve`` + two
``precision_recall_curve`` + ``auc``) vs one ``ood_metrics(..., 'openood')``.
The histogram row is ``OODHistogram(10**5 bins)`` update + compute of all
metrics with their error bounds.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics as skm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed  # noqa: E402
from jaxrobust.metrics import ood  # noqa: E402
from jaxrobust.metrics.streaming import OODHistogram  # noqa: E402


def msp_like(rng, n: int, in_dist: bool) -> np.ndarray:
  gap = rng.beta(0.5, 8.0, n) if in_dist else rng.beta(1.0, 3.0, n)
  if in_dist:
    gap[rng.random(n) < 0.3] = 0.0  # saturated softmax
  return np.round(1.0 - 0.9 * gap, 4).astype(np.float32)


def sklearn_openood(y_ood, conf):
  fpr, tpr, _ = skm.roc_curve(y_ood, -conf)
  p_in, r_in, _ = skm.precision_recall_curve(1 - y_ood, conf)
  p_out, r_out, _ = skm.precision_recall_curve(y_ood, -conf)
  return (skm.auc(fpr, tpr), skm.auc(r_in, p_in), skm.auc(r_out, p_out),
          fpr[np.argmax(tpr >= 0.95)])


def run(n: int, id_per_ood: int, repeats: int, hist: OODHistogram) -> list[tuple]:
  rng = np.random.default_rng(0)
  n_in = n * id_per_ood // (id_per_ood + 1)
  xi, xo = msp_like(rng, n_in, True), msp_like(rng, n - n_in, False)
  conf = np.concatenate([xi, xo])
  y_in = np.r_[np.ones(n_in), np.zeros(n - n_in)].astype(np.int32)
  y_ood = 1 - y_in
  ji, jo = jnp.asarray(xi), jnp.asarray(xo)

  def sk_fpr95():
    fpr, tpr, _ = skm.roc_curve(y_ood, -conf)
    return fpr[np.argmax(tpr >= 0.95)]

  hist_all = jax.jit(lambda a, b: hist.compute(hist.update(hist.init(), a, b),
                                               positive="out"))
  cases = [
      ("auroc", lambda: skm.roc_auc_score(y_in, conf), lambda: ood.auroc(ji, jo), "auroc"),
      ("fpr95", sk_fpr95,
       lambda: ood.fpr_at_tpr(ji, jo, positive="out", select="first_ge"), "fpr"),
      ("aupr_in", lambda: skm.average_precision_score(y_in, conf),
       lambda: ood.aupr_in(ji, jo), "aupr_in"),
      ("openood", lambda: sklearn_openood(y_ood, conf)[0],
       lambda: ood.ood_metrics(ji, jo, "openood")["auroc"], "auroc"),
  ]
  t_hist, h = timed(lambda: hist_all(ji, jo), repeats)
  rows = []
  for name, sk_fn, jx_fn, hist_key in cases:
    t_sk, v_sk = timed(sk_fn, repeats)
    t_jx, v_jx = timed(jx_fn, repeats)
    rows.append((f"{n:.0e}", f"{id_per_ood}:1", name, t_sk, t_jx, t_sk / t_jx,
                 t_hist, t_sk / t_hist, abs(float(v_jx) - float(v_sk)),
                 abs(float(h[hist_key]) - float(v_sk))))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1e6,1e7")
  parser.add_argument("--ratios", default="1,5", help="ID:OOD ratios")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--bins", type=int, default=10**5)
  args = parser.parse_args()
  hist = OODHistogram(num_bins=args.bins)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"median of {args.repeats} after warm-up")
  head = ("n", "ID:OOD", "metric", "sklearn s", "exact s", "x sk", "hist s", "x sk",
          "|exact-sk|", "|hist-sk|")
  print("{:>6} {:>6} {:>8} {:>10} {:>9} {:>6} {:>8} {:>6} {:>10} {:>10}".format(*head))
  for size in (int(float(s)) for s in args.sizes.split(",")):
    for ratio in (int(r) for r in args.ratios.split(",")):
      for row in run(size, ratio, args.repeats, hist):
        print("{:>6} {:>6} {:>8} {:>10.3f} {:>9.3f} {:>6.1f} {:>8.3f} {:>6.1f} "
              "{:>10.1e} {:>10.1e}".format(*row), flush=True)


if __name__ == "__main__":
  main()
