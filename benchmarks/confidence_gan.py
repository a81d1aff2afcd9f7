"""The joint confidence loss's step (Lee et al. 2018) against three clean classifier steps.

The joint step runs three updates (discriminator, generator, classifier) with
two generator passes, three discriminator passes and four classifier passes;
the issue's yardstick is 3x a clean cross-entropy step of the same classifier
at the same batch. Both are jaxrobust's own step (``make_train_step``) built
from ``configs/recipes/confidence_gan.py``, jitted on one device, state
donated, timed after compilation (median of ``--rounds``).

  python benchmarks/confidence_gan.py                       # embedded and cifar10 sizes
  python benchmarks/confidence_gan.py --variants embedded --rounds 20
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from configs.recipes import confidence_gan  # noqa: E402
from jaxrobust import stages  # noqa: E402
from engine_step import engine_step  # noqa: E402
from timing import median_time  # noqa: E402

K = 10


def _image(c) -> tuple[int, int, int]:
  return (32, 32, len(c.data.mean))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="embedded,cifar10")
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args()
  rows = []
  for variant in args.variants.split(","):
    recipe = confidence_gan.get_config(f"{variant},mode=compare")
    configs = stages.stage_configs(recipe)
    joint, clean = configs["joint"][2], configs["ce"][2]
    t_joint = median_time(engine_step(joint, _image(joint), K), args.rounds)
    t_clean = median_time(engine_step(clean, _image(clean), K), args.rounds)
    rows.append((variant, joint.model.name, joint.streams.train.batch_size,
                 t_joint, t_clean, t_joint / (3 * t_clean)))
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, median of {args.rounds} steps")
  print("| variant | classifier | batch | joint step (ms) | clean step (ms) | joint / (3 x clean) |")
  print("|---|---|---|---|---|---|")
  for v, model, b, tj, tc, ratio in rows:
    print(f"| {v} | {model} | {b} | {1e3 * tj:.1f} | {1e3 * tc:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
  main()
