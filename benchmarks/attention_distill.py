"""A-SKD's distillation step (Shin et al. 2022) against the student's plain step.

Every arm of ``configs/recipes/attention_distill.py:mode=compare`` at one
down-sampling factor -- the student alone (cross-entropy), logit KD, feature
distillation, attention transfer and A-SKD -- as jaxrobust's own train step
(``make_train_step``) built from the recipe's stage config, jitted on one
device, state donated, timed after compilation (median of ``--rounds``). The
distilling arms add a forward pass of the frozen teacher (no backward) and
their loss term; ``x student`` is each step's time over the plain student's.
The teacher is randomly initialised here (its checkpoint only fixes values,
not cost).

  python benchmarks/attention_distill.py                      # embedded sizes, factor 4
  python benchmarks/attention_distill.py --depth 10 --width 1    # the reproduction's size
  python benchmarks/attention_distill.py --variants embedded,face --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from configs.recipes import attention_distill as recipe_lib  # noqa: E402
from jaxrobust import stages  # noqa: E402
from engine_step import engine_step  # noqa: E402
from timing import median_time  # noqa: E402

ARMS = ("student", "kd", "fd", "at", "askd")
FACE_CLASSES = 1000  # a face variant's identity count only sizes the head


def _recipe(variant: str, factor: int, batch: int, depth: int, width: int):
  arg = (f"variant={variant},mode=compare,factors={factor},batch_size={batch},depth={depth},"
         f"width={width}")
  if variant == "face":
    arg += "," + recipe_lib.REQUIRED_ARGS["face"]
  return recipe_lib.get_config(arg)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="embedded")
  parser.add_argument("--factor", type=int, default=4)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--depth", type=int, default=-1, help="WRN depth (default: the variant's)")
  parser.add_argument("--width", type=int, default=-1, help="WRN width (default: the variant's)")
  args = parser.parse_args()
  rows = []
  for variant in args.variants.split(","):
    setting = recipe_lib.SETTINGS[variant]
    recipe = _recipe(variant, args.factor, args.batch, args.depth, args.width)
    configs = stages.stage_configs(recipe)
    size = setting.image_size or 32  # 0: as stored -- glyphs and digits are stored at 32x32
    image = (size, size, setting.channels)
    k = setting.num_classes or FACE_CLASSES
    times = {}
    for arm in ARMS:
      times[arm] = median_time(engine_step(configs[f"{arm}_{args.factor}"][2], image, k),
                               args.rounds)
    model = configs[f"student_{args.factor}"][2].model.kwargs
    rows.append((variant, f"wrn-{model.depth}-{model.width}+cbam", image, args.batch, times))
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, factor {args.factor}, "
        f"median of {args.rounds} steps")
  print("| variant | model | input | batch | arm | step (ms) | x student |")
  print("|---|---|---|---|---|---|---|")
  for variant, model, image, b, times in rows:
    for arm in ARMS:
      print(f"| {variant} | {model} | {'x'.join(map(str, image))} | {b} | {arm} | "
            f"{1e3 * times[arm]:.1f} | {times[arm] / times['student']:.2f} |")


if __name__ == "__main__":
  main()
