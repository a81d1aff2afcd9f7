"""Every command and code block of README.md and docs/ is checked.

The pages' fenced blocks are collected and each is checked by its kind:

* ```` ```python ```` blocks need a marker, an HTML comment on the line right
  before the fence, saying how (``<!-- check: MODE -->``):

  - ``run`` -- executed as written, in a fresh namespace;
    ``run setup=NAME`` first defines the inputs a fragment uses (``SETUPS``);
  - ``config`` -- executed with ``c`` bound to ``configs/default.py``'s
    config; the config must then validate, and a recipe's stages too
    (``stages.stage_configs``);
  - ``compile`` -- compiled, and every ``jaxrobust`` import and attribute it
    uses resolved (for fragments too costly to run);
  - ``method-file`` / ``method-config`` -- the "Writing a method" example,
    run by :func:`test_writing_a_method_example_runs` (one of each).

  A python block without a marker, or with an unknown one, fails.
* ```` ```bash ```` blocks: every command is classified and checked (the
  config file and its ``:args`` of ``launch.train`` load and validate, its
  ``--config.x=...`` overrides name existing keys and apply; a module or
  script exists and takes the flags given; ``pip install`` extras exist in
  pyproject.toml; ...). A command the checker cannot classify fails.
* ```` ```toml ```` blocks parse (an entry-point group is jaxrobust's);
  ```` ```bibtex ```` entries have their fields; ```` ```text ```` blocks are
  output and exempt; MyST directives (```` ```{toctree} ````) are Sphinx's
  to check (``python -m sphinx -W``). Any other fence fails.

Nothing here trains except the "Writing a method" example, on a tiny model.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import re
import shlex
import tomllib

import numpy as np
import pytest

from configs import default
from jaxrobust import config as config_lib
from jaxrobust import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def doc_files() -> list[str]:
  """README.md and every page of docs/ (not the build or generated API pages)."""
  pages = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
  pages = [p for p in pages if not re.search(r"docs/(_build|api/generated)/", p)]
  return [README] + sorted(pages)


# ----------------------------------------------------------------------------- blocks

MARKER = re.compile(r"^\s*<!--\s*check:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


@dataclasses.dataclass
class Block:
  path: str
  line: int  # 1-based line of the opening fence
  info: str  # the fence's info string
  marker: str | None  # the check marker right before the fence, if any
  text: str

  @property
  def lang(self) -> str:
    return self.info.split()[0] if self.info.split() else ""

  @property
  def id(self) -> str:
    return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def blocks_of(path: str) -> list[Block]:
  lines = open(path, encoding="utf-8").read().split("\n")
  out, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
    prev = MARKER.match(lines[i - 1]) if i > 0 else None
    body, j = [], i + 1
    while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$",
                                          lines[j]):
      body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
      j += 1
    out.append(Block(path, i + 1, info, prev.group(1) if prev else None, "\n".join(body) + "\n"))
    i = j + 1
  return out


def all_blocks() -> list[Block]:
  return [b for p in doc_files() for b in blocks_of(p)]


BLOCKS = all_blocks()
PYTHON_MODES = ("run", "config", "compile", "method-file", "method-config")


def _of(lang: str, exclude_modes: tuple[str, ...] = ()) -> list:
  return [pytest.param(b, id=b.id) for b in BLOCKS if b.lang == lang
          and (b.marker or "").split(" ")[0] not in exclude_modes]


def test_every_block_is_of_a_checked_kind():
  """No fence escapes the checks: a python block says how it is checked, the
  other kinds are known, and a marker stands only before a python block."""
  problems = []
  for b in BLOCKS:
    if b.lang.startswith("{"):
      continue  # a MyST directive: checked by the Sphinx build
    if b.lang not in ("python", "bash", "toml", "bibtex", "text"):
      problems.append(f"{b.id}: a ```{b.info or '(no language)'} block: use python (with a "
                      "marker), bash, toml, bibtex or text")
    elif b.lang == "python":
      mode = (b.marker or "").split(" ")[0]
      if mode not in PYTHON_MODES:
        problems.append(f"{b.id}: a python block needs <!-- check: MODE --> right before it, "
                        f"MODE one of {PYTHON_MODES} (got {b.marker!r})")
    elif b.marker is not None:
      problems.append(f"{b.id}: a check marker before a ```{b.lang} block (only python blocks "
                      "take one)")
  assert not problems, "\n".join(problems)
  assert len(BLOCKS) >= 30


# ----------------------------------------------------------------------------- python

def _ood_scores(**_):
  rng = np.random.default_rng(0)
  return {"msp_id": rng.uniform(0.5, 1.0, 500).astype(np.float32),
          "msp_ood": rng.uniform(0.1, 0.9, 100).astype(np.float32)}


def _classifier_outputs(**_):
  rng = np.random.default_rng(0)
  n, k = 400, 10
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k)).astype(np.float32)
  logits[np.arange(n), labels] += 2.0
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return {"logits": logits, "labels": labels, "probs": probs.astype(np.float32),
          "valid": np.arange(n) < 380, "groups": rng.integers(0, 4, n),
          "val_logits": logits[:200], "val_labels": labels[:200]}


def _tfds_data_dir(*, data_dir, monkeypatch, **_):
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  return {}


#: What ``run setup=NAME`` defines before a block runs.
SETUPS = {"ood_scores": _ood_scores, "classifier_outputs": _classifier_outputs,
          "data_dir": _tfds_data_dir}


def _resolve_jaxrobust_names(tree: ast.AST, where: str) -> int:
  """Imports every ``jaxrobust`` module a block imports and resolves every
  name it takes from one, and the attributes it reads of them."""
  bound, resolved = {}, 0
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jaxrobust":
          module = importlib.import_module(a.name)
          bound[a.asname or a.name.split(".")[0]] = (
              module if a.asname else importlib.import_module("jaxrobust"))
          resolved += 1
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jaxrobust":
      module = importlib.import_module(node.module)
      for a in node.names:
        if hasattr(module, a.name):
          bound[a.asname or a.name] = getattr(module, a.name)
        else:  # a submodule
          bound[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}")
        resolved += 1
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      chain, base = [], node
      while isinstance(base, ast.Attribute):
        chain.insert(0, base.attr)
        base = base.value
      if isinstance(base, ast.Name) and base.id in bound:
        obj = bound[base.id]
        for attr in chain:
          if not hasattr(obj, attr) and hasattr(obj, "__path__"):
            obj = importlib.import_module(f"{obj.__name__}.{attr}")
            continue
          assert hasattr(obj, attr), f"{where}: {base.id}.{'.'.join(chain)}: no {attr!r}"
          obj = getattr(obj, attr)
          resolved += 1
  return resolved


def _validate(c) -> None:
  config_lib.validate(c)
  if len(c.stages):
    stages.stage_configs(c)


@pytest.mark.parametrize("block", _of("python", exclude_modes=("method-file", "method-config")))
def test_python_block(block, data_dir, monkeypatch):
  mode, *options = block.marker.split()
  code = compile(block.text, block.id, "exec")
  if mode == "compile":
    assert _resolve_jaxrobust_names(ast.parse(block.text), block.id) > 0
  elif mode == "run":
    namespace = {"__name__": "docs_block"}
    for option in options:
      key, _, name = option.partition("=")
      assert key == "setup" and name in SETUPS, f"{block.id}: unknown option {option!r}"
      namespace.update(SETUPS[name](data_dir=data_dir, monkeypatch=monkeypatch))
    exec(code, namespace)
  elif mode == "config":
    assert not options, f"{block.id}: 'config' takes no options"
    c = default.get_config()
    exec(code, {"c": c})
    _validate(c)


def test_compile_mode_resolves_jaxrobust_names():
  """What a ``compile`` block gets: its jaxrobust imports and attributes
  looked up, a misspelt one refused (no page uses the mode today)."""
  good = ("from jaxrobust.metrics import ood\nimport jaxrobust.attacks\n"
          "ood.auroc\njaxrobust.attacks.pgd\n")
  assert _resolve_jaxrobust_names(ast.parse(good), "good") >= 4
  for bad in ("from jaxrobust.metrics import ood\nood.aurocc\n",
              "from jaxrobust.tasks import TASK\n", "import jaxrobust.nope\n"):
    with pytest.raises((AssertionError, ImportError)):
      _resolve_jaxrobust_names(ast.parse(bad), "bad")


def _method_blocks() -> tuple[Block, Block]:
  files = [b for b in BLOCKS if b.marker == "method-file"]
  configs = [b for b in BLOCKS if b.marker == "method-config"]
  assert len(files) == 1 and len(configs) == 1, "one method-file and one method-config block"
  return files[0], configs[0]


@pytest.mark.slow
def test_writing_a_method_example_runs(tmp_path, data_dir):
  """The method file registers a loss term, a score and two stage tasks (one
  writes a model with ``StageContext.save_model``); the config uses them in a
  recipe, run on a tiny model."""
  method, config_lines = _method_blocks()
  from jaxrobust.tasks import TASKS
  if "fold_temperature" not in TASKS:
    exec(compile(method.text, method.id, "exec"), {"__name__": "docs_logit_norm"})
  c = default.get_config("smoke")
  c.data.data_dir = str(data_dir)
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.progress_bar = False
  c.plots = False
  c.evaluators.ood.sets = {"blobs": "blobs/gray:validation"}
  exec(compile(config_lines.text, config_lines.id, "exec"), {"c": c})
  results = stages.run(c, str(tmp_path))
  # Fixed-seed value, measured 2026-12-06 on the pinned versions (CPU, 8 host devices;
  # a mean of rank counts, abs=1e-6 is the same ranking); a change means the run changed.
  auroc = results["train/ood/neg_logit_norm/blobs/auroc"]
  assert auroc == pytest.approx(0.570802462, abs=1e-6)
  assert results["norms/mean_logit_norm"] > 0
  metrics = [json.loads(l) for l in open(tmp_path / "train" / "metrics.jsonl")]
  assert any("train/loss/logit_norm_penalty" in m for m in metrics)
  norms = np.load(tmp_path / "norms" / "artifacts" / "norms.npz")["norms"]
  assert norms.shape == (180,)
  # The task's norms are those of the dump's logits; its result is their mean.
  dumped = np.load(tmp_path / "dump" / "artifacts" / "predictions.npz")["logits"]
  np.testing.assert_allclose(norms, np.linalg.norm(dumped, axis=-1), rtol=1e-5)
  assert results["norms/mean_logit_norm"] == pytest.approx(float(norms.mean()), rel=1e-5)
  # The model fold_temperature wrote is read back by `evaluate`: the same
  # predictions (a positive scale keeps the argmax), scaled probabilities.
  assert results["calibrated/temperature"] > 0
  assert results["scaled/test/accuracy"] == pytest.approx(results["train/test/accuracy"],
                                                          abs=1 / 360)
  # ... and the same ranking of logit norms (an OOD AUROC unchanged by the scale).
  assert results["scaled/ood/neg_logit_norm/blobs/auroc"] == pytest.approx(auroc, abs=1e-6)
  # The scaled model's NLL is the trained model's, its test logits divided by T.
  import recompute
  want = recompute.classification(stages.stage_configs(c)["train"][2], tmp_path / "train",
                                  temperature=results["calibrated/temperature"])
  assert results["scaled/test/nll"] == pytest.approx(want["nll"], rel=1e-4)
  # The temperature minimises the validation NLL (T = 1 is among the candidates).
  assert results["scaled/validation/nll"] <= results["train/validation/nll"] + 1e-6


# ----------------------------------------------------------------------------- commands

def _commands(text: str) -> list[list[str]]:
  """A bash block's commands: continuation lines joined, comments dropped,
  split at ``&&``; each a list of words."""
  out = []
  for line in text.replace("\\\n", " ").split("\n"):
    words = shlex.split(line, comments=True)
    command: list[str] = []
    for w in words + ["&&"]:
      if w == "&&":
        if command:
          out.append(command)
        command = []
      else:
        command.append(w)
  return out


def _flags_of(path: str) -> dict[str, bool]:
  """``{flag: takes_a_value}`` of a script's absl ``DEFINE_*`` and argparse
  ``add_argument`` calls (read from its source, not imported)."""
  flags = {}
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      continue
    name = node.args[0].value
    if node.func.attr.startswith("DEFINE_"):
      is_bool = node.func.attr == "DEFINE_bool" or node.func.attr == "DEFINE_boolean"
      flags[name] = not is_bool
      if is_bool:
        flags[f"no{name}"] = False
    elif node.func.attr == "add_argument" and name.startswith("--"):
      action = next((k.value.value for k in node.keywords if k.arg == "action"), None)
      flags[name[2:]] = action not in ("store_true", "store_false")
  return flags


ABSL_FLAGS = {"verbosity": True, "v": True, "alsologtostderr": False, "logtostderr": False,
              "help": False, "helpfull": False}


def _parse_flags(args: list[str], known: dict[str, bool], where: str) -> tuple[dict, list[str]]:
  """``--flag value``, ``--flag=value`` and ``--[no]bool`` against
  ``known``; returns the flags given and the positional arguments."""
  given, positional, i = {}, [], 0
  while i < len(args):
    a = args[i]
    if a.startswith("[") and a.endswith("]"):  # an optional flag written [--quick]
      a = a[1:-1]
    if a.startswith("--"):
      name, eq, value = a[2:].partition("=")
      assert name in known, f"{where}: unknown flag --{name} (known: {sorted(known)})"
      if known[name] and not eq:
        assert i + 1 < len(args), f"{where}: --{name} needs a value"
        value, i = args[i + 1], i + 1
      given[name] = value
    else:
      positional.append(a)
    i += 1
  return given, positional


def load_config(spec: str):
  """``get_config(arg)`` of ``FILE[:ARG]``, as ``launch.train`` loads it."""
  from jaxrobust import config as config_lib
  path, _, arg = spec.partition(":")
  full = os.path.join(ROOT, path)
  assert os.path.isfile(full), f"--config {spec}: no config file {path}"
  return config_lib.load_file(full + (f":{arg}" if arg else ""))


def _apply_override(c, path: str, raw: str, where: str) -> None:
  """``--config.<path>=<raw>`` as ``launch.train`` applies it: an existing
  key, or a new entry of a free-form sub-dict; the value typed like the
  field (ConfigDict refuses a value of another type)."""
  import ml_collections
  free = any(path.startswith(f + ".") for f in config_lib.FREE_FORM)
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    if p not in node:
      assert free, f"{where}: --config.{path}: the config has no key {p!r}"
      node[p] = ml_collections.ConfigDict()
    node = node[p]
    assert isinstance(node, ml_collections.ConfigDict), (
        f"{where}: --config.{path}: {p!r} is a value")
  assert free or leaf in node, f"{where}: --config.{path}: the config has no key {leaf!r}"
  old = node[leaf] if leaf in node else None
  if isinstance(old, str):
    value = raw
  elif isinstance(old, bool):
    assert raw.lower() in ("true", "false"), f"{where}: --config.{path}={raw}: not a bool"
    value = raw.lower() == "true"
  else:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
  node[leaf] = value


TRAIN_FLAGS = _flags_of(os.path.join(ROOT, "launch", "train.py"))


def check_train(args: list[str], where: str, *, workdir_given_by_script: bool = False) -> None:
  """``python -m launch.train ARGS``: flags exist; the config file and its
  ``:args`` load; every override names a key and applies; the config (and a
  recipe's stages) validates."""
  spec, rest, i = "configs/default.py", [], 0
  while i < len(args):
    if args[i] == "--config":
      spec, i = args[i + 1], i + 2
      continue
    if args[i].startswith("--config="):
      spec = args[i][len("--config="):]
    else:
      rest.append(args[i])
    i += 1
  overrides = [a for a in rest if a.startswith("--config.")]
  given, positional = _parse_flags([a for a in rest if not a.startswith("--config.")],
                                   {**TRAIN_FLAGS, **ABSL_FLAGS}, where)
  assert not positional, f"{where}: launch.train takes no positional arguments: {positional}"
  assert ("workdir" in given) != workdir_given_by_script, f"{where}: --workdir"
  c = load_config(spec)
  for o in overrides:
    flag, eq, raw = o.partition("=")
    assert eq, f"{where}: {o}: an override needs =value"
    _apply_override(c, flag[len("--config."):], raw, where)
  _validate(c)


def check_reproduce(args: list[str], where: str) -> None:
  from launch import papers
  known = {**_flags_of(os.path.join(ROOT, "launch", "reproduce.py")), **ABSL_FLAGS}
  given, positional = _parse_flags(args, known, where)
  assert len(positional) == 1, f"{where}: launch.reproduce takes one paper, got {positional}"
  assert positional[0] in papers.papers(), f"{where}: no paper {positional[0]!r}"
  paper = papers.load_paper(positional[0])
  assert "workdir" in given, f"{where}: --workdir is required"
  if "claims" in given:  # names claims of that paper
    papers.select_claims(paper, given["claims"])


def check_local_cluster(args: list[str], where: str) -> None:
  assert "--" in args, f"{where}: launch.train's arguments follow --"
  cut = args.index("--")
  known = {**_flags_of(os.path.join(ROOT, "launch", "local_cluster.py")), **ABSL_FLAGS}
  _, positional = _parse_flags(args[:cut], known, where)
  assert not positional, f"{where}: {positional}"
  check_train(args[cut + 1:], where)


def check_script(args: list[str], where: str) -> None:
  """``python benchmarks/x.py`` and the like: the file exists and takes the flags."""
  path = os.path.join(ROOT, args[0])
  assert os.path.isfile(path), f"{where}: no file {args[0]}"
  _parse_flags(args[1:], {**_flags_of(path), "help": False}, where)


def check_module(args: list[str], where: str) -> None:
  """``python -m jaxrobust.data.prepare NAME --data_dir DIR``: a module of
  the repository or of jaxrobust that takes the flags."""
  module = args[0]
  spec = importlib.util.find_spec(module)
  assert spec is not None and spec.origin, f"{where}: no module {module}"
  _parse_flags(args[1:], {**_flags_of(spec.origin), **ABSL_FLAGS}, where)


def check_pytest(args: list[str], where: str) -> None:
  markers = {m.split(":")[0].strip() for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
  i = 0
  while i < len(args):
    a = args[i]
    if a in ("-n", "-m", "-k"):
      value, i = args[i + 1], i + 1
      if a == "-m":
        unknown = set(re.findall(r"\w+", value)) - {"and", "or", "not"} - markers
        assert not unknown, f"{where}: -m {value!r}: undeclared markers {unknown}"
    elif re.fullmatch(r"--durations=\d+|-q|-x|-v", a):
      pass
    else:
      assert not a.startswith("-"), f"{where}: pytest option {a} is not one the docs use"
      assert os.path.exists(os.path.join(ROOT, a.split("::")[0])), f"{where}: no {a}"
    i += 1


def check_sphinx(args: list[str], where: str) -> None:
  given, positional, i = [], [], 0
  while i < len(args):
    if args[i] == "-b":
      assert args[i + 1] == "html", where
      i += 1
    elif args[i].startswith("-"):
      assert args[i] in ("-W", "--keep-going", "-E", "-q", "-n"), f"{where}: {args[i]}"
      given.append(args[i])
    else:
      positional.append(args[i])
    i += 1
  assert "-W" in given, f"{where}: the docs build treats warnings as errors"
  assert len(positional) == 2, f"{where}: sphinx SOURCEDIR OUTPUTDIR"
  assert os.path.isfile(os.path.join(ROOT, positional[0], "conf.py")), f"{where}: no conf.py"


def check_pip(args: list[str], where: str) -> None:
  assert args[0] == "install", f"{where}: pip {args[0]}"
  targets = [a for a in args[1:] if a not in ("-e", "-q")]
  assert args[1:].count("-e") == 1 and len(targets) == 1, (
      f"{where}: pip install -e <this repository>")
  m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", targets[0])
  assert m, f"{where}: pip install -e {targets[0]}: not this repository"
  extras = set(PYPROJECT["project"]["optional-dependencies"])
  for extra in (m.group(1) or "").split(",") if m.group(1) else []:
    assert extra in extras, f"{where}: no extra {extra!r} in pyproject.toml ({sorted(extras)})"


#: launch/ scripts: how many positional arguments come before launch.train's
#: flags (the script adds --workdir from them). Their dry runs are tested in
#: tests/test_launch_scripts.py.
LAUNCH_SCRIPTS = {"launch/tpu_pod.sh": 3, "launch/gpu_multinode.sh": 1, "launch/slurm.sbatch": 1}


def check_launch_script(args: list[str], where: str) -> None:
  script = args[0]
  assert script in LAUNCH_SCRIPTS, f"{where}: {script} is not a launch script"
  assert os.access(os.path.join(ROOT, script), os.X_OK), f"{where}: {script} is not executable"
  dry_runs = open(os.path.join(ROOT, "tests", "test_launch_scripts.py"), encoding="utf-8").read()
  assert os.path.basename(script) in dry_runs, f"{where}: no dry-run test of {script}"
  n = LAUNCH_SCRIPTS[script]
  assert len(args) > n, f"{where}: {script} takes {n} positional arguments first"
  check_train(args[1 + n:], where, workdir_given_by_script=True)


def check_command(words: list[str], where: str) -> None:
  """One command: classified by its first words, then checked."""
  while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
    words = words[1:]  # environment assignments (COORDINATOR=... launch/gpu_multinode.sh)
  head, args = words[0], words[1:]
  where = f"{where}: {shlex.join(words)[:120]}"
  if head in ("python", "python3") and args[:1] == ["-m"]:
    module, rest = args[1], args[2:]
    checks = {"launch.train": check_train, "launch.reproduce": check_reproduce,
              "launch.local_cluster": check_local_cluster, "pytest": check_pytest,
              "sphinx": check_sphinx}
    if module == "venv":
      assert len(rest) == 1, where
    elif module in checks:
      checks[module](rest, where)
    elif module.startswith("jaxrobust."):
      check_module([module, *rest], where)
    else:
      pytest.fail(f"{where}: no check for python -m {module}")
  elif head in ("python", "python3") and args and args[0].startswith("benchmarks/"):
    check_script(args, where)
  elif head in (".", "source"):
    assert args == [".venv/bin/activate"], where
  elif head == "pip":
    check_pip(args, where)
  elif head == ".ci/run":
    assert not args and os.access(os.path.join(ROOT, ".ci", "run"), os.X_OK), where
  elif head == "sbatch":
    script = next(a for a in args if not a.startswith("-"))
    check_launch_script(args[args.index(script):], where)
  elif head.startswith("launch/"):
    check_launch_script(words, where)
  else:
    pytest.fail(f"{where}: a command the docs checker cannot classify")


@pytest.mark.parametrize("block", _of("bash"))
def test_bash_block(block):
  commands = _commands(block.text)
  assert commands, f"{block.id}: an empty bash block"
  for words in commands:
    check_command(words, block.id)


def test_the_command_checker_refuses_what_it_should():
  """Mistakes in a command fail (the checker is not a rubber stamp)."""
  bad = [
      "python -m launch.train --config configs/default.py --config.optimizer.learning_rat=0.1 "
      "--workdir x",
      "python -m launch.train --config configs/default.py:variant=cifar1000 --workdir x",
      "python -m launch.train --config configs/nope.py --workdir x",
      "python -m launch.train --wrokdir x",
      "python -m launch.reproduce hendrycks2018 --workdir x",
      "python -m launch.reproduce zoph2020 --workdir x --fast",
      "python -m launch.local_cluster --procs 2 -- --workdir x",
      "python benchmarks/scaling.py --repeat 3",
      'pip install -e ".[tests]"',
      'python -m pytest -n auto -m "not slowly"',
      "launch/tpu_pod.sh my-tpu zone gs://b/r --config configs/default.py --config.nope=1",
      "python -m launch.train --config configs/default.py --config.num_epochs=abc --workdir x",
      "rm -rf runs",
  ]
  for command in bad:
    with pytest.raises((AssertionError, pytest.fail.Exception, ValueError, KeyError,
                        AttributeError, TypeError)):
      for words in _commands(command):
        check_command(words, "test")


# ----------------------------------------------------------------------------- other kinds

@pytest.mark.parametrize("block", _of("toml"))
def test_toml_block(block):
  from jaxrobust import registry
  data = tomllib.loads(block.text)
  groups = data.get("project", {}).get("entry-points", {})
  assert set(groups) <= {registry.ENTRY_POINT_GROUP}, (
      f"{block.id}: entry-point groups {set(groups)}")


@pytest.mark.parametrize("block", _of("bibtex"))
def test_bibtex_block(block):
  entries = re.findall(r"@(\w+)\{([\w:-]+),(.*?)\n\}", block.text, flags=re.S)
  assert entries and block.text.count("{") == block.text.count("}"), block.id
  for kind, key, body in entries:
    fields = set(re.findall(r"^\s*(\w+)\s*=", body, flags=re.M))
    venue = {"inproceedings": "booktitle", "article": "journal"}[kind.lower()]
    missing = {"author", "title", "year", venue} - fields
    assert not missing, f"{block.id}: {key} lacks {missing}"


# ----------------------------------------------------------------------------- text

def test_every_config_the_docs_name_builds_and_validates():
  """Each `--config configs/...py[:args]` of the README and the pages, in a
  block or in the text, loads; a recipe's stages (tasks, options, merged
  configs, artifact references) validate."""
  specs = set()
  for path in doc_files():
    text = open(path, encoding="utf-8").read()
    specs |= set(re.findall(r"--config (configs/[\w/]+\.py(?::[^\s`]*)?)", text))
  assert len(specs) >= 8
  for spec in sorted(specs):
    _validate(load_config(spec))


def test_relative_links_of_the_readme_and_pages_exist():
  """A link to a file of the repository (``[Datasets](docs/datasets.md)``)
  points at one; Sphinx checks the links between pages, the README has no
  such build."""
  for path in doc_files():
    text = open(path, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      file = target.split("#")[0]
      assert os.path.exists(os.path.join(os.path.dirname(path), file)), f"{path}: {target}"
