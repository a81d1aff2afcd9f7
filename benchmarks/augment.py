#!/usr/bin/env python
"""Throughput of the S1-S4 augmentation presets (jaxrobust.data.pp) on the
default JAX device against a PIL loop on the host doing the same ops.

Workload: a batch of ``--batch`` uint8 images ``--size`` x ``--size`` x 3,
random content. JAX rows: ``jax.jit(pp.build(chain))`` on the batch already on
the device (uint8 -> [0, 1] inside), a fresh key per call, timed to
``block_until_ready`` (``benchmarks/timing.py::median_time``, median over
``--rounds`` calls after one warm-up call that compiles). PIL rows: one Python
loop over the images with Pillow doing the same ops (AutoAugment's CIFAR-10
policy and RandAugment N=2, M=10 with the jaxrobust level mappings, Pillow
``ImageOps`` / ``ImageEnhance`` / ``transform`` with gray fill, BILINEAR resize
for scale jittering, numpy for pad/crop/flip and Cutout), single-threaded, as a
per-process data-loader worker would run them. Compile time is printed apart.

  python benchmarks/augment.py                      # S1, S2, S4; batch 256 of 32x32x3
  python benchmarks/augment.py --chains s1,s2,s3,s4 --batch 1024 --rounds 10
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import jax  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from benchmarks.timing import median_time  # noqa: E402
from jaxrobust.data import autoaugment as aa  # noqa: E402
from jaxrobust.data import pp  # noqa: E402

GRAY = (128, 128, 128)

# ---------------------------------------------------------------- the PIL loop


def _affine(img: Image.Image, coeffs) -> Image.Image:
  return img.transform(img.size, Image.AFFINE, coeffs, fillcolor=GRAY)


def _cutout(img: Image.Image, pad: float, rng: random.Random) -> Image.Image:
  a = np.array(img)
  h, w = a.shape[:2]
  cy, cx, p = rng.randrange(h), rng.randrange(w), int(pad)
  a[max(0, cy - p):cy + p, max(0, cx - p):cx + p] = 128
  return Image.fromarray(a)


PIL_OPS = {
    "AutoContrast": lambda im, v, r: ImageOps.autocontrast(im),
    "Equalize": lambda im, v, r: ImageOps.equalize(im),
    "Invert": lambda im, v, r: ImageOps.invert(im),
    "Identity": lambda im, v, r: im,
    "Posterize": lambda im, v, r: im.point(
        [i & ~((1 << max(0, 8 - int(v))) - 1) for i in range(256)] * 3),
    "Solarize": lambda im, v, r: ImageOps.solarize(im, v),
    "SolarizeAdd": lambda im, v, r: im.point(
        [min(255, max(0, i + int(v))) if i < 128 else i for i in range(256)] * 3),
    "Color": lambda im, v, r: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v, r: ImageEnhance.Contrast(im).enhance(v),
    "Brightness": lambda im, v, r: ImageEnhance.Brightness(im).enhance(v),
    "Sharpness": lambda im, v, r: ImageEnhance.Sharpness(im).enhance(v),
    "Rotate": lambda im, v, r: im.rotate(v, fillcolor=GRAY),
    "ShearX": lambda im, v, r: _affine(im, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v, r: _affine(im, (1, 0, 0, v, 1, 0)),
    "TranslateX": lambda im, v, r: _affine(im, (1, 0, v, 0, 1, 0)),
    "TranslateY": lambda im, v, r: _affine(im, (1, 0, 0, 0, 1, v)),
    "Cutout": _cutout,
}


def _apply(img: Image.Image, op: str, arg: float, rng: random.Random) -> Image.Image:
  if op in aa.SIGNED_OPS and rng.random() < 0.5:
    arg = -arg
  return PIL_OPS[op](img, arg, rng)


def _pil_autoaugment(img: Image.Image, rng: random.Random) -> Image.Image:
  size = img.size[0]
  for op, prob, level in rng.choice(aa.POLICIES["cifar10"]):
    if rng.random() < prob:
      arg = aa.level_to_arg(op, level, "cifar", translate_const=size * 10 / 32)
      img = _apply(img, op, arg, rng)
  return img


def _pil_randaugment(img: Image.Image, rng: random.Random) -> Image.Image:
  size = img.size[0]
  for _ in range(2):
    op = rng.choice(aa.RANDAUGMENT_OPS)
    img = _apply(img, op, aa.level_to_arg(op, 10, "tpu", translate_const=size / 8,
                                          cutout_const=size / 8), rng)
  return img


def _pil_scale_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
  w, h = img.size
  s = rng.uniform(0.5, 2.0)
  sw, sh = max(1, round(s * w)), max(1, round(s * h))
  big = img.resize((sw, sh), Image.BILINEAR)
  oy, ox = int(rng.random() * (sh - h)), int(rng.random() * (sw - w))
  canvas = Image.new(img.mode, (w, h))
  canvas.paste(big, (-ox, -oy))
  return canvas


def _np_pad_crop_flip(a: np.ndarray, rng: random.Random, crop: bool = True) -> np.ndarray:
  h, w = a.shape[:2]
  if crop:
    a = np.pad(a, ((4, 4), (4, 4), (0, 0)))
    dy, dx = rng.randrange(9), rng.randrange(9)
    a = a[dy:dy + h, dx:dx + w]
  return a[:, ::-1] if rng.random() < 0.5 else a


def pil_chain(chain: str, images: np.ndarray, rng: random.Random) -> np.ndarray:
  out = []
  for a in images:
    img = Image.fromarray(a)
    if chain in ("s2", "s3"):
      img = _pil_autoaugment(img, rng)
    elif chain == "s4":
      img = _pil_randaugment(img, rng)
    if chain in ("s3", "s4"):
      img = _pil_scale_jitter(img, rng)
    out.append(_np_pad_crop_flip(np.asarray(img), rng, crop=chain in ("s1", "s2")))
  return np.stack(out)


# ---------------------------------------------------------------- main


def time_chain(chain: str, images: np.ndarray, on_device: jax.Array, args: argparse.Namespace
               ) -> tuple[str, str, float, float, float, float]:
  """(chain, its ops, jax img/s, PIL img/s, jax / PIL, compile + first call seconds)."""
  chain_fn = pp.build(chain)
  fn = jax.jit(lambda step, x: chain_fn(jax.random.fold_in(jax.random.PRNGKey(0), step),
                                        pp.to_unit_range(x)))
  step = [0]

  def run_jax() -> None:
    step[0] += 1
    jax.block_until_ready(fn(step[0], on_device))

  start = time.perf_counter()
  run_jax()
  compile_s = time.perf_counter() - start
  t_jax = median_time(run_jax, args.rounds)
  rng = random.Random(0)
  t_pil = median_time(lambda: pil_chain(chain, images, rng), args.pil_rounds)
  return (chain, pp.PRESETS.get(chain, chain), args.batch / t_jax, args.batch / t_pil,
          t_pil / t_jax, compile_s)



def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--chains", default="s1,s2,s4")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--pil_rounds", type=int, default=3)
  args = parser.parse_args()

  images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                             dtype=np.uint8)
  device = jax.devices()[0]
  on_device = jax.device_put(images, device)
  print(f"device: {device.device_kind} ({jax.default_backend()}), batch {args.batch} of "
        f"{args.size}x{args.size}x3, jax {jax.__version__}, {os.cpu_count()} host cores")
  rows = []
  for chain in args.chains.split(","):
    rows.append(time_chain(chain, images, on_device, args))
  print(f"\n{'chain':<6} {'ops':<55} {'jax img/s':>11} {'PIL img/s':>11} {'x PIL':>7} "
        f"{'compile s':>10}")
  for chain, text, jax_ips, pil_ips, ratio, compile_s in rows:
    print(f"{chain:<6} {text:<55} {jax_ips:>11,.0f} {pil_ips:>11,.0f} {ratio:>7.1f} "
          f"{compile_s:>10.1f}")


if __name__ == "__main__":
  main()
