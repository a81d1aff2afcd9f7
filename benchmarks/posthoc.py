"""Benchmark: post-hoc OOD detectors, fit time and scoring throughput against
MSP on the same features; KNN's search against scikit-learn and numpy.

Features are post-ReLU Gaussians around K class means (N_train x D training
rows, N_test queries), the head a noisy nearest-mean classifier. Each
measurement runs once to warm up (and compile), then ``--repeats`` times; the
tables show medians.

  python benchmarks/posthoc.py                                   # 50k x 10k, D = 128, 512
  python benchmarks/posthoc.py --train 10000 --test 2000 --dims 128 --repeats 2

Table 1, per detector: ``posthoc.fit`` (seconds; the streamed sums, banks and
percentiles of :mod:`jaxrobust.methods.posthoc`), ``posthoc.score`` on the
N_test queries (seconds and examples/s) and its time over MSP's on the same
features (``softmax(features @ kernel + bias).max()``, jitted).

Table 2, KNN (k = ``--k``) at each D: jaxrobust's chunked ``lax.top_k`` search
(float32, ``posthoc.score('knn')``), ``sklearn.neighbors.NearestNeighbors``
(``fit`` + ``kneighbors``, ``algorithm='auto'``, ``n_jobs=-1``; float32 input
as pytorch-ood's ``knn.py``) and a numpy brute force (float32 matrix products
over query chunks of 1,024 rows and ``np.partition``); the k-th distances'
largest difference to sklearn's, and time ratios (sklearn / jaxrobust).
``--skip_sklearn`` drops the slow reference at full size.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed  # noqa: E402
from jaxrobust import scores  # noqa: E402
from jaxrobust.methods import posthoc  # noqa: E402


def make_data(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  means = np.abs(rng.normal(0, 1, (classes, dim)))
  y = rng.integers(0, classes, n_train)
  train = np.maximum(means[y] + rng.normal(size=(n_train, dim)), 0).astype(np.float32)
  yt = rng.integers(0, classes, n_test)
  test = np.maximum(means[yt] + 1.3 * rng.normal(size=(n_test, dim)), 0).astype(np.float32)
  kernel = (means.T + 0.05 * rng.normal(size=(dim, classes))).astype(np.float32)
  bias = (-(means ** 2).sum(1) / 2).astype(np.float32)
  return train, y, test, kernel, bias


def numpy_knn(bank: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  """k-th nearest Euclidean distance, float32 products, chunked over queries."""
  b2 = (bank * bank).sum(1)
  out = []
  for i in range(0, len(queries), chunk):
    q = queries[i:i + chunk]
    d2 = (q * q).sum(1)[:, None] + b2[None, :] - 2 * q @ bank.T
    out.append(np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0)))
  return np.concatenate(out)


def normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def detector_table(args, dim: int) -> None:
  train, y, test, kernel, bias = make_data(args.train, args.test, dim, args.classes)
  head = {"kernel": kernel, "bias": bias}
  msp = jax.jit(lambda f, w, b: scores.msp(f @ w + b))
  t_msp, _ = timed(lambda: msp(test, kernel, bias), args.repeats)
  print(f"\nD = {dim}: {args.train:,} training rows, {args.test:,} queries, K = {args.classes}; "
        f"MSP scores them in {t_msp * 1e3:.2f} ms ({args.test / t_msp:,.0f} examples/s)")
  print("{:<22} {:>9} {:>10} {:>14} {:>9}".format(
      "detector", "fit s", "score ms", "examples/s", "x MSP"))
  options = {"vim": {"dim": dim // 2}, "residual": {"dim": dim // 2}}
  for name in posthoc.names():
    opts = options.get(name, {})
    t_fit, state = timed(lambda: posthoc.fit(name, train, y, **head, **opts), args.fit_repeats)
    t_score, _ = timed(lambda: posthoc.score(name, test, state, **head, **opts), args.repeats)
    print(f"{name:<22} {t_fit:>9.3f} {t_score * 1e3:>10.2f} {args.test / t_score:>14,.0f} "
          f"{t_score / t_msp:>9.1f}", flush=True)


def knn_table(args) -> None:
  print(f"\nKNN, k = {args.k}: {args.train:,} bank x {args.test:,} queries "
        f"(normalised features)")
  print("{:<6} {:<34} {:>9} {:>9} {:>11}".format(
      "D", "implementation", "seconds", "x sklearn", "max |diff|"))
  for dim in args.dims:
    train, y, test, kernel, bias = make_data(args.train, args.test, dim, args.classes)
    head = {"kernel": kernel, "bias": bias}
    state = posthoc.fit("knn", train, y, **head, k=args.k)
    t_jx, s_jx = timed(lambda: posthoc.score("knn", test, state, **head, k=args.k),
                       args.repeats)
    d_jx = -np.asarray(s_jx)
    bank, queries = normalise(train), normalise(test)
    t_np, d_np = timed(lambda: numpy_knn(bank, queries, args.k), args.repeats)
    rows = []
    if not args.skip_sklearn:
      def sk():
        nn = NearestNeighbors(n_jobs=-1).fit(bank)
        return nn.kneighbors(queries, n_neighbors=args.k)[0][:, -1]
      t_sk, d_sk = timed(sk, args.repeats)
      rows.append(("sklearn NearestNeighbors (auto)", t_sk, d_sk))
    else:
      t_sk, d_sk = None, d_np
    rows += [("numpy brute force (float32)", t_np, d_np),
             ("jaxrobust (jit, lax.top_k chunks)", t_jx, d_jx)]
    for impl, t, d in rows:
      ratio = f"{t_sk / t:>9.2f}" if t_sk else f"{'-':>9}"
      print(f"{dim:<6} {impl:<34} {t:>9.3f} {ratio} {np.abs(d - d_sk).max():>11.1e}",
            flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train", type=int, default=50_000, help="training rows (the bank)")
  parser.add_argument("--test", type=int, default=10_000, help="queries")
  parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--k", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--fit_repeats", type=int, default=1)
  parser.add_argument("--skip_sklearn", action="store_true")
  parser.add_argument("--skip_detectors", action="store_true")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"median of {args.repeats} after warm-up (fits: {args.fit_repeats})")
  if not args.skip_detectors:
    for dim in args.dims:
      detector_table(args, dim)
  knn_table(args)


if __name__ == "__main__":
  main()
