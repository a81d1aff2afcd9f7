"""Every shipped config's resolved form, as plain JSON, to hold a refactor
to "behaviour unchanged": ``tests/fixtures/resolved_configs.json.gz`` was written
by this module from the code before the engine was split into builder,
trainer and stage-task API; ``tests/test_refactor_fixtures.py`` compares it
with what the code resolves today.

``python -m tests.config_snapshot`` rewrites the fixture (only when a config
change is intended; say so in the commit).
"""

from __future__ import annotations

import json
import os
from typing import Any

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "resolved_configs.json.gz")

# (config file, argument after ':') -- every variant and mode of every config
# file at the time of the snapshot.
SNAPSHOT_ARGS: tuple[tuple[str, str], ...] = (
    *(("configs/default.py", v) for v in ("embedded", "glyphs", "smoke", "cifar10", "cifar100")),
    *(("configs/recipes/pretrain_finetune.py", f"variant={v},mode={m}")
      for v in ("embedded", "cifar10", "cifar100")
      for m in ("full", "last_layer", "scratch", "compare")),
    *(("configs/recipes/adversarial.py", f"variant={v},mode={m}")
      for v in ("embedded", "cifar10", "cifar100")
      for m in ("full", "last_layer", "scratch", "compare")),
    *(("configs/recipes/label_noise.py", f"variant={v},method={m}")
      for v in ("embedded", "cifar10", "cifar100")
      for m in ("ce", "forward", "glc", "compare")),
    ("configs/recipes/label_noise.py", "kind=flip,strength=0.4,pretrained=True"),
    ("configs/recipes/label_noise.py", "kind=hierarchical"),
    *(("configs/recipes/ood.py", f"variant=embedded,mode={m}")
      for m in ("compare", "msp", "energy_ft", "oe_ft", "confidence")),
    *(("configs/recipes/ood.py", f"variant={v},mode={m},outliers=imagenet_resized/32x32:train")
      for v in ("cifar10", "cifar100")
      for m in ("compare", "msp", "energy_ft", "oe_ft", "confidence")),
    *(("configs/recipes/self_training.py", a) for a in (
        "", "mode=compare", "aug=s1,rounds=1", "normalize=False", "student=wide",
        "init=supervised", "init=simclr", "smoke=True", "variant=cifar10",
        "variant=cifar10,mode=compare", "variant=cifar10,unlabeled=imagenet,init=simclr")),
    *(("configs/recipes/domain_adaptive.py", a) for a in (
        "", "mode=compare", "targets=letters",
        "samplers=same+elastic+uniform,sizes=2000+8000,targets=digits+letters", "smoke=True",
        "variant=imagenet", "variant=imagenet,targets=pets+cars+food+cifar10+birds,mode=compare")),
)


def load_config(path: str, arg: str):
  from jaxrobust import config as config_lib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return config_lib.load_file(os.path.join(root, path) + (f":{arg}" if arg else ""))


def _plain(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def resolve(path: str, arg: str) -> dict[str, Any]:
  """The config validated; for a recipe, every stage's task, options and
  merged config, in run order."""
  from jaxrobust import config as config_lib
  from jaxrobust import stages
  c = load_config(path, arg)
  config_lib.validate(c)
  if not len(c.stages):
    return {"config": _plain(c.to_dict())}
  plan = stages.stage_configs(c)
  return {"order": list(plan),
          "stages": {name: {"task": task, "options": _plain(options),
                            "config": _plain(merged.to_dict())}
                     for name, (task, options, merged) in plan.items()}}


def snapshot() -> dict[str, Any]:
  return {f"{path}:{arg}": resolve(path, arg) for path, arg in SNAPSHOT_ARGS}


if __name__ == "__main__":
  os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
  import gzip
  with gzip.open(FIXTURE, "wt", encoding="utf-8") as f:
    json.dump(snapshot(), f, indent=1, sort_keys=True)
  print(f"wrote {FIXTURE}")
