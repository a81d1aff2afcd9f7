"""Every shipped config takes real steps (issue 18): each config file's
variants and modes -- enumerated from the file's own ``VARIANTS`` and
``MODES`` (``MODE_KEY`` names the argument, default ``mode``; a ``compare``
mode stands for the modes it contains; ``REQUIRED_ARGS`` give what a variant
cannot run without; ``EXTRA_ARGS`` add option combinations with stages of
their own) -- is built, validated, and every stage run for 2 training steps
and one evaluation batch on ``tfds.testing.mock_data`` of its real datasets
(CIFAR-10/100, ``imagenet_resized``, the fine-grained targets, ...), with the
configured architecture, dropout, stochastic depth, augmentation,
perturbations and losses.

Test overrides shrink what only costs time -- WRN depth and width, ResNet-50's
blocks per stage, batch sizes, steps, attack iterations, tuning grids, sample sizes, selection
thresholds -- never a code path. Variants whose datasets are all embedded are
left to the end-to-end tests on the real embedded data.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any
from unittest import mock

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 48  # per split: one evaluation batch (eval_batch_size 64)
# GLC's trusted part must hold every one of CIFAR-100's classes (the reference's rule):
# 2,000 examples and a trusted half (TRUSTED) instead of 50,000 and 5%.
MOCK_EXAMPLES_OF = {"configs/recipes/label_noise.py": 2000,
                   # Mahalanobis' fit needs every one of CIFAR-100's classes
                   "configs/recipes/ood.py": 200, "configs/recipes/openood.py": 200,
                   # the importance weights need every source class in the source
                   # (P_s > 0 wherever the source model puts P_t): ImageNet's 1,000
                   "configs/recipes/domain_adaptive.py": 1000}
TRUSTED = 0.5
# Arguments that leave out repeated arms (another sampler is the same code path).
FEWER_ARMS = {"configs/recipes/domain_adaptive.py": "samplers=same",
              # one down-sampling factor: the others are the same code path
              "configs/recipes/attention_distill.py": "factors=4"}
VARIABLE_SIZE = (72, 80)  # images of datasets whose size varies (resized to image_size)


class _BalancedSource:
  """A mock split: images drawn from a fixed pool of 64 seeded random ones,
  class labels ``index % K`` (every class equally often, as in the real
  datasets), other features zero -- cheap to read whole."""

  def __init__(self, features, num_examples: int):
    import numpy as np
    import tensorflow_datasets as tfds
    self.n = num_examples
    rng = np.random.default_rng(0)
    self.fixed, self.images, self.labels, self.nested = {}, {}, {}, {}
    for key, f in features.items():
      if isinstance(f, tfds.features.FeaturesDict):  # e.g. celeb_a's attributes
        self.nested[key] = _BalancedSource(f, num_examples)
      elif isinstance(f, tfds.features.Image) or (
          isinstance(f, tfds.features.Tensor) and f.np_dtype == np.uint8 and len(f.shape) == 3):
        shape = tuple(d or s for d, s in zip(f.shape, VARIABLE_SIZE + (3,)))
        self.images[key] = rng.integers(0, 256, (64,) + shape, dtype=np.uint8)
      elif isinstance(f, tfds.features.ClassLabel):
        self.labels[key] = f.num_classes
      elif isinstance(f, tfds.features.Tensor):
        # Booleans (celeb_a's attributes): seeded random bits, so every group occurs.
        if f.np_dtype == np.bool_ and not f.shape:
          self.images[key] = rng.integers(0, 2, 64).astype(bool)
        else:
          self.fixed[key] = np.zeros(f.shape, f.np_dtype)

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {**self.fixed, **{k: v[i % 64] for k, v in self.images.items()},
            **{k: i % n for k, n in self.labels.items()},
            **{k: v[i] for k, v in self.nested.items()}}

  def __getitems__(self, indices) -> list:
    return [self[i] for i in indices]


def balanced_mock_data(num_examples: int):
  """``tfds.testing.mock_data`` serving :class:`_BalancedSource` splits."""
  import tensorflow_datasets as tfds

  def as_data_source(builder, split=None, **kwargs):
    del kwargs
    if split is None:
      return {s: _BalancedSource(builder.info.features, num_examples) for s in builder.info.splits}
    return _BalancedSource(builder.info.features, num_examples)
  return tfds.testing.mock_data(num_examples=num_examples, as_data_source_fn=as_data_source)
pytestmark = pytest.mark.slow


def _module(path: str):
  from jaxrobust import config as config_lib
  return config_lib.config_module(os.path.join(REPO, path))


def config_files() -> list[str]:
  return sorted(os.path.relpath(p, REPO) for p in
                glob.glob(os.path.join(REPO, "configs", "*.py"))
                + glob.glob(os.path.join(REPO, "configs", "recipes", "*.py"))
                if not p.endswith("__init__.py"))


def matrix() -> list[tuple[str, str]]:
  """``(config file, argument)`` for every variant x mode (see the module
  docstring)."""
  out = []
  for path in config_files():
    module = _module(path)
    variants = tuple(getattr(module, "VARIANTS", ("",)))
    modes = tuple(getattr(module, "MODES", ()))
    key = getattr(module, "MODE_KEY", "mode")
    if "compare" in modes:
      modes = ("compare",)
    required = dict(getattr(module, "REQUIRED_ARGS", {}))
    extras = ("",) + tuple(getattr(module, "EXTRA_ARGS", ()))
    for variant in variants:
      for mode in modes or ("",):
        for extra in extras:
          parts = [f"variant={variant}" if variant else "", f"{key}={mode}" if mode else "",
                   required.get(variant, ""), extra, FEWER_ARMS.get(path, "")]
          out.append((path, ",".join(p for p in parts if p)))
  return out


def _datasets(plan) -> set[str]:
  names = set()
  for _, options, c in plan.values():
    names.add(c.data.name)
    names.update(s.data for s in c.streams.values() if s.get("data"))
    for ev in c.evaluators.values():
      names.update(str(v).rpartition(":")[0] for v in dict(ev.get("sets", {}) or {}).values())
    for k in ("data", "source_data"):
      if options.get(k):
        names.add(options[k])
  return {n for n in names if n}


def _resolved(path: str, arg: str):
  from jaxrobust import config as config_lib
  from jaxrobust import stages
  c = _module(path).get_config(arg or None)
  config_lib.validate(c)
  if len(c.stages):
    return c, stages.stage_configs(c)
  return c, {"run": ("train", {}, c)}


def _real(plan) -> bool:
  from jaxrobust.data import sources
  return any(sources.base_name(n) not in sources.EMBEDDED for n in _datasets(plan))


MATRIX = [(p, a) for p, a in matrix() if _real(_resolved(p, a)[1])]


def shrink(c) -> Any:
  """Test overrides of a (stage) config: only what costs time."""
  c = c.copy_and_resolve_references()
  c.unlock()
  if c.model.name == "wrn":
    c.model.kwargs.depth, c.model.kwargs.width = 10, 1
  for name, m in c.modules.items():
    if m.model.get("name") == "wrn":
      m.model.kwargs.depth, m.model.kwargs.width = 10, 1
    for key in ("ngf", "ndf"):  # DCGAN widths (64 in the CIFAR/SVHN configs)
      if key in m.model.get("kwargs", {}):
        m.model.kwargs[key] = 8
  for s in c.streams.values():
    s.batch_size = 8
    for key in ("index", "labels"):
      if s.get(key):
        s[key] = re.sub(r"fraction=0\.\d+", f"fraction={TRUSTED}", str(s[key]))
        s[key] = re.sub(r"num_per_class=\d+", "num_per_class=2", s[key])
    if s.get("perturb"):
      s.perturb = re.sub(r"steps=\d+", "steps=2", s.perturb)
  for ev in c.evaluators.values():
    if ev.get("attacks"):
      ev.attacks = {k: re.sub(r"steps=\d+", "steps=2", str(v)) for k, v in ev.attacks.items()}
  if c.model.name == "resnet50":  # one bottleneck per stage; fewer pixels
    c.model.kwargs.layers = (1, 1, 1, 1)
    c.data.image_size = 32
  c.eval_batch_size = 64
  c.num_steps = 2
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 1
  c.plots = False
  c.progress_bar = False
  return c


def shrink_options(task: str, options: dict) -> dict:
  options = dict(options)
  if task == "tune_score":
    from jaxrobust.methods import tuning
    grid = options.get("grid") or tuning.GRIDS[options.get("score", "odin")]
    options["grid"] = {k: tuple(v)[:2] for k, v in dict(grid).items()}
  if task == "pseudo_label":
    options.update(threshold=0.0, num_per_class=8)  # a batch even if one class is predicted
    if options.get("exclude"):
      options["exclude"] = re.sub(r"num_per_class=\d+", "num_per_class=2", options["exclude"])
  if task == "gan_samples":
    options.update(num_samples=16, batch_size=8)
  if task == "importance_sample":
    options["size"] = 16
  if task == "estimate_corruption" and options.get("gold_fraction"):
    options["gold_fraction"] = TRUSTED
  return options


@pytest.mark.parametrize("path, arg", MATRIX,
                         ids=[f"{p.rsplit('/', 1)[1][:-3]}:{a}" for p, a in MATRIX])
def test_every_stage_takes_two_steps_on_mock_data(path, arg, tmp_path):
  from jaxrobust import stages, trainer
  c, plan = _resolved(path, arg)
  data_dir = str(tmp_path / "tfds")
  shrunk = {}
  for name, (task, options, merged) in plan.items():
    merged = shrink(merged)
    merged.data.data_dir = data_dir
    shrunk[name] = (task, shrink_options(task, options), merged)
  with balanced_mock_data(MOCK_EXAMPLES_OF.get(path, MOCK_EXAMPLES)):
    if not len(c.stages):
      results = trainer.train_and_evaluate(shrunk["run"][2], str(tmp_path / "run"))
      assert results["train/steps"] == 2.0
      return
    c.stages = {n: {**c.stages[n].to_dict()} for n in c.stages}
    with mock.patch.object(stages, "stage_configs", lambda _: shrunk):
      results = stages.run(c, str(tmp_path / "run"))
  trained = [n for n, (task, _, _) in plan.items() if task == "train"]
  for n in trained:
    assert results[f"{n}/train/steps"] == 2.0, n
  assert {n for n in plan} == {k.split("/", 1)[0] for k in results}


def test_the_matrix_covers_every_config_file_and_the_real_variants():
  files = {p for p, _ in MATRIX}
  assert {"configs/default.py", "configs/recipes/self_training.py",
          "configs/recipes/domain_adaptive.py"} <= files
  assert files == {p for p in config_files()
                   if any(v not in ("embedded", "glyphs", "smoke", "")
                          for v in getattr(_module(p), "VARIANTS", ("",)))}
  assert ("configs/recipes/ood.py",
          "variant=cifar10,mode=compare,outliers=imagenet_resized/32x32:train") in MATRIX
  assert ("configs/recipes/self_training.py", "variant=cifar10,mode=compare") in MATRIX
  assert ("configs/recipes/domain_adaptive.py", "variant=imagenet,mode=compare,samplers=same"
          ) in MATRIX
