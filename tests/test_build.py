"""The house (issue 17): a run is built once from its config, the engine's
import graph has no circle and imports no method, methods are found by name,
and stage tasks can write models that every reader takes for trained ones."""

import ast
import graphlib
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from jaxrobust import build
from jaxrobust import checkpoint as ckpt_lib
from jaxrobust import config as config_lib
from jaxrobust import stages
from jaxrobust.data import sources
from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS
from tiny_config import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jaxrobust")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> set[str]:
  """Every jaxrobust module ``path`` imports, at module level or inside
  functions (``from jaxrobust import x`` counts as ``jaxrobust.x``)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("jaxrobust")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxrobust"):
      out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
  return out


def _engine_graph() -> dict[str, set[str]]:
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        modules[_module_name(path)] = path
  graph = {}
  for name, path in modules.items():
    if name.startswith("jaxrobust.methods"):
      continue
    deps = {d for d in _imports(path) if d in modules and d != name}
    # A package may import its own submodules (evaluators registers its built-in types).
    graph[name] = {d for d in deps if not d.startswith(name + ".")}
  return graph


def test_engine_import_graph_has_no_circle_and_no_method():
  graph = _engine_graph()
  assert len(graph) > 30
  graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a circle
  methods = {m: sorted(d for d in deps if d.startswith("jaxrobust.methods"))
             for m, deps in graph.items()}
  assert {m: d for m, d in methods.items() if d} == {}
  # The stage-task API builds on the builder, never on the loop or the runner.
  assert not graph["jaxrobust.tasks"] & {"jaxrobust.trainer", "jaxrobust.stages"}
  assert "jaxrobust.trainer" not in graph["jaxrobust.build"]


def test_methods_are_loaded_by_name_on_demand():
  code = (
      "import sys\n"
      "import jaxrobust.stages, jaxrobust.trainer, jaxrobust.build, jaxrobust.scores\n"
      "assert not [m for m in sys.modules if m.startswith('jaxrobust.methods.')], 'eager'\n"
      "from jaxrobust import scores\n"
      "m = scores.build('odin(temperature=10)')\n"
      "assert m.perturb is not None and 'jaxrobust.methods.odin' in sys.modules\n"
      "from jaxrobust.tasks import TASKS\n"
      "assert {'estimate_corruption', 'pseudo_label', 'target_prior', 'tune_score'} <= set(TASKS.names())\n"
      "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "ok"


@pytest.mark.slow
def test_each_run_is_built_once_per_stage(tmp_path, data_dir):
  """validate: once for the recipe and once per stage (it ran three times
  per stage); module specs once per run; a dataset's spec once per run."""
  c = tiny_config(data_dir, steps=2)
  c.stages = {"train": {"task": "train"},
              "scores": {"task": "evaluate", "checkpoint": "artifact:train/checkpoint"}}
  with mock.patch.object(config_lib, "validate", wraps=config_lib.validate) as validate, \
       mock.patch.object(build, "module_specs", wraps=build.module_specs) as specs, \
       mock.patch.object(sources, "get_spec", wraps=sources.get_spec) as get_spec:
    stages.run(c, str(tmp_path))
  assert validate.call_count == 1 + 2
  # train's build_run, then the evaluate task's modules and save_model-free checkpoint meta
  assert specs.call_count == 1 + 1
  digits = [call for call in get_spec.call_args_list if call.args[0] == "digits"]
  assert len(digits) == 2  # once by each stage


def test_build_run_is_frozen_and_checks_before_compiling(data_dir, tmp_path):
  run = build.build_run(tiny_config(data_dir, steps=3), str(tmp_path))
  assert run.total_steps == 3 and run.num_classes == 10 and run.task.image_shape == (32, 32, 1)
  assert [u.name for u in run.updates] == ["classifier"]
  assert run.meta["modules"]["classifier"]["model"] == "small_cnn"
  with pytest.raises(Exception):
    run.total_steps = 4  # frozen
  c = tiny_config(data_dir)
  c.model.trainable = "nothing/.*"
  with pytest.raises(ValueError, match="config.model.trainable='nothing/.\\*' matches no "):
    build.build_run(c, str(tmp_path / "bad"))


# --- stage tasks that write models -----------------------------------------------------

def _rescale_head(ctx, *, checkpoint: str, scale: float = 2.0, shift: float = 0.5):
  """A stage task that writes a model: the trained classifier with its head
  rescaled (logits' = scale * logits + shift)."""
  params, stats = ckpt_lib.load_pretrained(ctx.checkpoint_path(checkpoint))
  params = dict(params)
  head = dict(params["head"])
  head["kernel"] = np.asarray(head["kernel"]) * scale
  head["bias"] = np.asarray(head["bias"]) * scale + shift
  params["head"] = head
  ref = ctx.save_model({"classifier": {"params": params, "batch_stats": stats}})
  assert ref == f"artifact:{ctx.name}/checkpoint"
  return {"scale": scale}


def _bad_save(ctx, *, checkpoint: str, what: str = "shape"):
  params, stats = ckpt_lib.load_pretrained(ctx.checkpoint_path(checkpoint))
  if what == "shape":
    params = {**params, "head": {**params["head"], "bias": np.zeros(3, np.float32)}}
    ctx.save_model({"classifier": {"params": params, "batch_stats": stats}})
  else:
    ctx.save_model({"generator": {"params": params, "batch_stats": stats}})
  return {}


for _name, _fn in (("_test_rescale_head", _rescale_head), ("_test_bad_save", _bad_save)):
  if _name not in TASKS:
    TASKS.register(_name)(_fn)


@pytest.mark.slow
def test_a_task_writes_a_model_that_predict_evaluate_and_init_from_read(tmp_path, data_dir):
  c = tiny_config(data_dir, steps=3)
  c.stages = {
      "train": {"task": "train"},
      "dump": {"task": "predict", "checkpoint": "artifact:train/checkpoint", "split": "test"},
      "rescale": {"task": "_test_rescale_head", "checkpoint": "artifact:train/checkpoint"},
      "dump2": {"task": "predict", "checkpoint": "artifact:rescale/checkpoint", "split": "test",
                "name": "rescaled"},
      "scores": {"task": "evaluate", "checkpoint": "artifact:rescale/checkpoint"},
      "finetune": {"task": "train", "config": {"init_from": {"path": "artifact:rescale/checkpoint",
                                                             "reset_head": "never"},
                                               "num_steps": 1,
                                               "optimizer": {"learning_rate": 0.0,
                                                             "weight_decay": 0.0}}},
  }
  results = stages.run(c, str(tmp_path))
  before = np.load(tmp_path / "dump" / "artifacts" / "predictions.npz")["logits"]
  after = np.load(tmp_path / "dump2" / "artifacts" / "rescaled.npz")["logits"]
  np.testing.assert_allclose(after, 2.0 * before + 0.5, rtol=1e-5, atol=1e-5)
  # evaluation of the written model = classification of its logits
  labels = np.load(tmp_path / "dump" / "artifacts" / "predictions.npz")["label"]
  assert results["scores/test/accuracy"] == pytest.approx(
      float(np.mean(after.argmax(-1) == labels)), abs=1e-6)
  # init_from took every array of it (a step at learning rate 0 changes nothing but BN stats)
  p_rescaled, _ = ckpt_lib.load_pretrained(str(tmp_path / "rescale"))
  p_ft, _ = ckpt_lib.load_pretrained(str(tmp_path / "finetune"))
  np.testing.assert_allclose(p_ft["head"]["kernel"], p_rescaled["head"]["kernel"], rtol=1e-6)


@pytest.mark.parametrize("what, message", [
    # Each case trains a run first: the development tier keeps the second.
    pytest.param("shape", r"save_model: module 'classifier' params do not fit the model: "
                          r"head/bias: \(3,\) \(model: \(10,\)\)", marks=pytest.mark.slow),
    ("module", r"save_model: no module 'generator' in the stage's config"),
])
def test_save_model_refuses_what_the_readers_could_not_load(tmp_path, data_dir, what, message):
  c = tiny_config(data_dir, steps=1)
  c.stages = {"train": {"task": "train"},
              "bad": {"task": "_test_bad_save", "checkpoint": "artifact:train/checkpoint",
                      "what": what}}
  with pytest.raises(RegistryError, match=message):
    stages.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "bad" / "checkpoints" / "0")
