"""The README's "Writing a method" example runs as written: its method file
registers a loss term, a score and a stage task, and its config uses them in a
recipe (on a tiny model)."""

import json
import os
import re

import numpy as np

from configs import default
from jaxrobust import stages

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(section: str) -> list[str]:
  text = open(README, encoding="utf-8").read()
  body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_writing_a_method_example_runs(tmp_path, data_dir):
  method, config_lines = _blocks("Writing a method")
  if "logit_norm_penalty" not in stages.TASKS and "mean_logit_norm" not in stages.TASKS:
    exec(compile(method, "README:logit_norm.py", "exec"), {"__name__": "readme_method"})
  c = default.get_config("smoke")
  c.data.data_dir = str(data_dir)
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.progress_bar = False
  c.plots = False
  c.evaluators.ood.sets = {"blobs": "blobs/gray:validation"}
  exec(compile(config_lines, "README:config", "exec"), {"c": c})
  results = stages.run(c, str(tmp_path))
  assert np.isfinite(results["train/ood/neg_logit_norm/blobs/auroc"])
  assert results["norms/mean_logit_norm"] > 0
  metrics = [json.loads(l) for l in open(tmp_path / "train" / "metrics.jsonl")]
  assert any("train/loss/logit_norm_penalty" in m for m in metrics)
  norms = np.load(tmp_path / "norms" / "artifacts" / "norms.npz")["norms"]
  assert norms.shape == (180,)


def test_every_config_the_readme_names_builds_and_validates():
  """Each `--config configs/...py[:args]` of the README loads; a recipe's
  stages (tasks, options, merged configs, artifact references) validate."""
  import importlib.util

  from jaxrobust import config as config_lib
  text = open(README, encoding="utf-8").read()
  specs = sorted(set(re.findall(r"--config (configs/[\w/]+\.py(?::[^\s`]*)?)", text)))
  assert len(specs) >= 8
  for spec in specs:
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("cfg", os.path.join(
        os.path.dirname(README), path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    c = module.get_config(arg or None)
    config_lib.validate(c)
    if len(c.stages):
      stages.stage_configs(c)
