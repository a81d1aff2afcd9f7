"""The configuration schema of a jaxrobust run, and its validation.

Every config file in ``configs/`` starts from :func:`base_config` and overrides
fields; :func:`validate` then rejects any key the schema does not know (with a
close-match suggestion), so a typo such as ``config.optimiser`` fails loudly
instead of being silently ignored, and checks values and cross-references
(streams, modules, updates, constants) before anything is read or compiled.
Free-form sub-dicts (``model.kwargs``, loss terms, streams, evaluators, stages)
are checked against the stream schema and the signatures of the registered
functions they name, when those are built (:mod:`jaxrobust.registry`).

Config files define ``get_config(arg=None)``; ``arg`` is the string after ``:``
on the command line (``--config configs/default.py:cifar10`` or
``--config configs/default.py:dataset=cifar10,model=wrn_40_2``) and is parsed by
:func:`parse_arg`.
"""

from __future__ import annotations

import ast
import copy
import graphlib
import importlib.util
import os
import types
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from jaxrobust import early_stopping
from jaxrobust import generated
from jaxrobust.data import streams
from jaxrobust.registry import suggest

# Sub-dicts whose keys are not fixed by the schema; each is checked where it
# is built (streams against the stream schema, loss terms, evaluators and
# stage tasks against their registered signatures).
FREE_FORM = ("model.kwargs", "model.heads", "modules", "losses", "updates", "streams", "constants",
             "evaluators", "stages")


def base_config() -> ml_collections.ConfigDict:
  """The full schema, with defaults. Keys not in here are rejected."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The task: the labelled dataset whose classes the classifier predicts, and
  # how its images are read. Training inputs are streams (below).
  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # tfds name; embedded sets are prepared offline
  c.data.data_dir = config_dict.placeholder(str)  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.num_classes = config_dict.placeholder(int)  # default: from the dataset
  c.data.image_size = 0  # > 0: resize shorter side + center crop (needed for varying sizes)
  # Per-channel normalisation of pixels in [0, 1], applied inside the model
  # call. (0.5, 0.5) maps to [-1, 1] as in Hendrycks et al. (2019).
  c.data.mean = (0.5,)
  c.data.std = (0.5,)
  c.data.cache = "auto"  # 'auto' | 'memory' | 'none': keep small splits in RAM

  # Training streams (jaxrobust.data.streams): name -> spec. `train` is the
  # main stream; methods add more (auxiliary outliers, unlabelled data).
  c.streams = ml_collections.ConfigDict()
  c.streams.train = ml_collections.ConfigDict(streams.stream_defaults())

  # The default module, `classifier` (jaxrobust.modules).
  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # computation dtype; params stay float32
  c.model.trainable = ".*"  # regex over parameter paths that train ('head/.*': last layer)
  c.model.freeze_bn = False  # True: eval-mode BatchNorm (running statistics kept) while training
  # extra heads on the features: {name: 'mlp(features=128)'} (jaxrobust/models/heads.py)
  c.model.heads = ml_collections.ConfigDict()
  # More modules: name -> {model: {name, kwargs, dtype, trainable, freeze_bn},
  # optimizer: {overrides of config.optimizer}, input_shape, num_classes}.
  c.modules = ml_collections.ConfigDict()

  # Loss terms: key -> options of the registered term (jaxrobust.losses),
  # plus weight / name / normalize_by.
  c.losses = ml_collections.ConfigDict()
  c.losses.cross_entropy = ml_collections.ConfigDict(
      {"weight": 1.0, "label_smoothing": 0.0,
       "class_weights": config_dict.placeholder(tuple)})
  # Updates of one step: name -> {module, losses (keys), streams, after}; an
  # update runs after those named in its `after`. Empty: one update of the
  # classifier on every loss term and stream.
  c.updates = ml_collections.ConfigDict()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # sgd | adam | adamw | rmsprop | lars
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_on = "all"  # 'all' (Hendrycks/PyTorch) | 'kernels'
  c.optimizer.schedule = "cosine"  # cosine | constant | linear | step
  c.optimizer.end_learning_rate = 0.0
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.step_epochs = ()  # for 'step': epochs at which lr *= step_factor
  c.optimizer.step_factor = 0.1
  c.optimizer.grad_clip_norm = 0.0  # 0 = off
  # Update t uses the schedule at t + schedule_offset: 1 = PyTorch code that calls
  # scheduler.step() before optimizer.step() (Hendrycks et al., OE, energy).
  c.optimizer.schedule_offset = 0

  c.eval_batch_size = 256
  c.num_epochs = 10.0  # epochs of the `train` stream
  c.num_steps = -1  # > 0 overrides num_epochs

  c.log_every_steps = 50
  c.eval_every_steps = -1  # <= 0: only at the end (default of every evaluator)
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True

  # Parallelism: a Mesh built from (axis name, size) pairs; -1 = the remaining
  # devices. The batch is sharded over `data_axes`; parameters (and the matching
  # optimizer state) follow the first regex rule that matches their path.
  c.parallelism = "jit"  # 'jit' (NamedSharding over the mesh) | 'pmap'
  c.mesh = (("data", -1),)
  c.data_axes = ("data",)
  c.sharding_rules = ((".*", "replicate"),)

  # Fine-tuning: load the classifier's params (and batch stats) from a run.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ""  # workdir, checkpoint directory, or 'artifact:<stage>/checkpoint'
  c.init_from.step = -1  # -1: latest
  c.init_from.reset_head = "auto"  # 'auto' (when shapes differ) | 'always' | 'never'
  c.init_from.skip = ""  # regex: parameters left freshly initialised (e.g. a projection head)
  c.init_from.load_batch_stats = True

  # Arrays from earlier stages for loss terms: name -> 'artifact:<stage>/<name>[:key]'.
  c.constants = ml_collections.ConfigDict()

  # Evaluators (jaxrobust.evaluators): key -> {type, every_steps, module, options}.
  c.evaluators = ml_collections.ConfigDict()
  c.evaluators.classification = ml_collections.ConfigDict(
      {"type": "classification", "splits": ("validation", "test"),
       "calibration_bin_size": 100, "ece_bins": 15})
  c.evaluators.ood = ml_collections.ConfigDict(
      {"type": "ood", "sets": ml_collections.ConfigDict(), "scores": ("msp", "energy"),
       "split": "test", "preset": "hendrycks",
       # None: the preset's protocol (hendrycks: 1 OOD per 5 test images, 5 draws).
       "fraction": config_dict.placeholder(float), "draws": config_dict.placeholder(int)})
  c.plots = True

  # Early stopping (jaxrobust.early_stopping): disabled while `metric` is empty.
  # At every evaluation round, training stops once `metric` has not improved by
  # more than `min_delta` for `patience` rounds; restore_best: the run ends on
  # (and its newest checkpoint is) the best round's step.
  c.early_stopping = ml_collections.ConfigDict()
  c.early_stopping.metric = ""  # an evaluator's result key, e.g. 'validation/accuracy'
  c.early_stopping.mode = "max"  # 'max' | 'min'
  c.early_stopping.patience = 3  # evaluation rounds without improvement
  c.early_stopping.min_delta = 0.0
  c.early_stopping.restore_best = True

  # A recipe: stage name -> {task, config (overrides of this config), after,
  # options}, run in <workdir>/<stage> after the stages it takes artifacts from
  # or names in `after` (jaxrobust.stages). Empty: one training run.
  c.stages = ml_collections.ConfigDict()

  c.progress_bar = True
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses the ``file.py:arg`` string of a config file.

  ``arg`` is a comma-separated list of ``key=value`` pairs or bare words. A bare
  word sets the first default whose value is a string ("variant" in practice):
  ``"cifar10"`` is ``"variant=cifar10"``. Values are Python literals when they
  parse as such, strings otherwise. Unknown keys raise.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  first_str = next((k for k, v in defaults.items() if isinstance(v, str)), None)
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    if "=" in item:
      key, value = item.split("=", 1)
    elif first_str is not None:
      key, value = first_str, item
    else:
      raise ValueError(f"config arg {item!r} is not key=value and there is no default variant.")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"unknown config arg {key!r}; known: {sorted(defaults)}"
          + suggest(key, defaults))
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    if isinstance(defaults[key], bool) and isinstance(parsed, str):
      parsed = parsed.lower() in ("1", "true", "yes")
    elif isinstance(defaults[key], str):
      parsed = value.strip()  # a string option stays a string ("sizes=300")
    out[key] = parsed
  return out


def config_module(path: str) -> types.ModuleType:
  """A config file (``configs/recipes/ood.py``), imported as a module (its
  ``get_config``, ``VARIANTS``, ``MODES``, ...)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path!r}.")
  name = "jaxrobust_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file ``FILE[:ARG]`` (the
  ``--config`` of ``launch.train``)."""
  path, _, arg = spec.partition(":")
  module = config_module(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config(arg=None).")
  return module.get_config(arg or None)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'optimizer.learning_rate': 0.1, ...}; free-form sub-dicts stay whole."""
  out = {}
  for k, v in d.items():
    path = f"{prefix}{k}"
    if path in FREE_FORM:
      out[path] = v
    elif isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(v, path + "."))
    else:
      out[path] = v
  return out


def _keys(d: Any) -> list[str]:
  return list(d.keys()) if hasattr(d, "keys") else []


def _check_keys(d: Any, allowed: Any, where: str) -> None:
  if not hasattr(d, "keys"):
    raise ValueError(f"{where} must be a mapping, got {d!r}.")
  bad = [k for k in d.keys() if k not in allowed]
  if bad:
    raise ValueError(f"{where} has unknown key(s) {bad}{suggest(bad[0], allowed)}; known: "
                     f"{', '.join(allowed)}.")


MODULE_KEYS = ("model", "optimizer", "input_shape", "num_classes", "init_from")
UPDATE_KEYS = ("module", "losses", "streams", "after", "fresh_noise", "share_pass")


def order(entries: Mapping[str, Any], where: str, *,
          implicit: Mapping[str, Any] | None = None, total: bool = False) -> list[str]:
  """The names of ``entries`` (updates, stages) in dependency order.

  ``ConfigDict`` sorts its keys, so order is never taken from how a config
  lists them: an entry runs after the names in its ``after`` tuple (and, for
  stages, after every stage it takes an artifact from: ``implicit``). Among
  the entries ready to run, the first by name goes first (the smallest
  topological order, so the order never depends on dict order). With
  ``total=True`` (the updates of one step) the order must be fully
  determined: any two entries must be ordered by ``after``.
  """
  names = list(entries.keys())
  sorter: graphlib.TopologicalSorter = graphlib.TopologicalSorter()
  for n in names:
    after = entries[n].get("after", ()) if hasattr(entries[n], "get") else ()
    after = (after,) if isinstance(after, str) else tuple(after or ())
    for a in after:
      if a not in names:
        raise ValueError(f"{where}.{n}.after: no {a!r}{suggest(a, names)}; "
                         f"known: {', '.join(names)}.")
    sorter.add(n, *after, *(implicit or {}).get(n, ()))
  try:
    sorter.prepare()
  except graphlib.CycleError as e:
    cycle = sorted(set(e.args[1]))
    raise ValueError(f"{where}: {', '.join(cycle)} depend on each other (a cycle in 'after' "
                     "or artifact references).") from None
  out: list[str] = []
  ready: list[str] = []
  while sorter.is_active():
    ready = sorted(set(ready) | set(sorter.get_ready()))
    if total and len(ready) > 1:
      raise ValueError(
          f"{where}: the order of {', '.join(repr(r) for r in ready)} is not determined "
          f"(config dicts are unordered); set e.g. {where}.{ready[1]}.after=({ready[0]!r},).")
    first = ready.pop(0)
    out.append(first)
    sorter.done(first)
  return out


def merge(base: Any, overrides: Mapping[str, Any] | None, where: str | None = None) -> Any:
  """A copy of ``base`` (a config or a dict of overrides) with ``overrides``
  applied: the one way configs and overrides are combined.

  Mappings are updated key by key, so an override can change one option of
  one stream; an empty mapping replaces (``evaluators={'ood': {'sets': {}}}``
  removes the OOD sets). On a config (``where`` given), ``None`` removes one
  entry of a free-form sub-dict (``losses={'cross_entropy': None}``) and an
  unknown key raises naming ``where``; in a dict of overrides ``None`` stays,
  to remove that entry when the overrides are applied to a config.
  """
  on_config = isinstance(base, ml_collections.ConfigDict)
  out = copy.deepcopy(base) if on_config else _plain_copy(base)
  if on_config:
    out.unlock()  # config_flags locks a recipe; free-form sub-dicts (evaluators, constants) grow

  def apply(target, upd, path):
    for k, v in upd.items():
      key = f"{path}.{k}"
      v = v.to_dict() if hasattr(v, "to_dict") else v
      if (isinstance(v, Mapping) and v and k in target
          and isinstance(target[k], (Mapping, ml_collections.ConfigDict))):
        apply(target[k], v, key)
        continue
      if not on_config:
        target[k] = _plain_copy(v)
        continue
      free = any(key.startswith(f"{where}.{f}") for f in FREE_FORM)
      if v is None and free:
        if k in target:
          del target[k]
        continue
      if k not in target and not free:
        raise ValueError(f"{key}: no such key in the config{suggest(k, target.keys())}.")
      value = ml_collections.ConfigDict(v) if isinstance(v, Mapping) else v
      try:
        target[k] = value
      except TypeError:  # another type than the default (a score list given as a mapping)
        del target[k]
        target[k] = value

  apply(out, dict(overrides or {}), where or "overrides")
  return out


def _plain_copy(x: Any) -> Any:
  """A deep copy with every mapping a dict (ConfigDicts included)."""
  x = x.to_dict() if hasattr(x, "to_dict") else x
  if isinstance(x, Mapping):
    return {k: _plain_copy(v) for k, v in x.items()}
  return copy.deepcopy(x)


def module_names(config: ml_collections.ConfigDict) -> list[str]:
  return ["classifier"] + _keys(config.modules)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on keys the schema does not know and on bad values,
  naming the config key; nothing is compiled or read before this passes."""
  base = base_config()
  known = _flatten(base)
  given = _flatten(config)
  unknown = [k for k in given if k not in known]
  if unknown:
    lines = [f"  {k}{suggest(k, known)}" for k in sorted(unknown)]
    raise ValueError("unknown config key(s):\n" + "\n".join(lines))
  if config.parallelism not in ("jit", "pmap"):
    raise ValueError(f"config.parallelism must be 'jit' or 'pmap', got {config.parallelism!r}.")
  if config.eval_batch_size <= 0:
    raise ValueError(f"config.eval_batch_size must be positive, got {config.eval_batch_size}.")
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_epochs > 0 or config.num_steps > 0.")
  if len(config.data.mean) != len(config.data.std):
    raise ValueError(
        f"config.data.mean {tuple(config.data.mean)} and config.data.std "
        f"{tuple(config.data.std)} must have the same length.")
  if any(s <= 0 for s in config.data.std):
    raise ValueError(f"config.data.std must be positive, got {tuple(config.data.std)}.")
  if config.init_from.reset_head not in ("auto", "always", "never"):
    raise ValueError(
        f"config.init_from.reset_head must be 'auto', 'always' or 'never', got "
        f"{config.init_from.reset_head!r}.")
  if config.data.cache not in ("auto", "memory", "none"):
    raise ValueError(f"config.data.cache must be 'auto', 'memory' or 'none', got {config.data.cache!r}.")
  _check_optimizer(config.optimizer, "config.optimizer")
  early_stopping.check_config(config)
  _check_streams(config)
  _check_modules_and_updates(config)
  for key, value in config.constants.items():
    if not (isinstance(value, str) and value.startswith("artifact:")):
      raise ValueError(f"config.constants.{key}={value!r}: constants are artifact references "
                       "'artifact:<stage>/<name>[:<key>]'.")
  for key, ev in config.evaluators.items():
    if not hasattr(ev, "keys") or "type" not in ev:
      raise ValueError(f"config.evaluators.{key} needs a 'type' (classification, ood, "
                       "robust, ...).")


def _check_optimizer(opt: Any, where: str) -> None:
  if opt.learning_rate < 0:
    raise ValueError(f"{where}.learning_rate must be >= 0, got {opt.learning_rate}.")
  if opt.weight_decay < 0:
    raise ValueError(f"{where}.weight_decay must be >= 0, got {opt.weight_decay}.")


def _check_streams(config: ml_collections.ConfigDict) -> None:
  defaults = streams.stream_defaults()
  if "train" not in config.streams:
    raise ValueError("config.streams.train (the main training stream) is missing.")
  modules = module_names(config)
  for name, stream in config.streams.items():
    where = f"config.streams.{name}"
    _check_keys(stream, list(defaults) + list(generated.GENERATED_KEYS), where)
    if generated.is_generated(stream):
      _check_generated_stream(name, stream, defaults, modules)
      continue
    for key in generated.GENERATED_KEYS:
      if key in stream:
        raise ValueError(f"{where}.{key}: only a generated stream (source='module:<name>') "
                         "has it.")
    if stream.get("batch_size", defaults["batch_size"]) <= 0:
      raise ValueError(f"{where}.batch_size must be positive, got {stream['batch_size']}.")
    if stream.get("views", 1) < 1:
      raise ValueError(f"{where}.views must be >= 1, got {stream['views']}.")
    if stream.get("perturb_stats", "update") not in streams.PERTURB_STATS:
      raise ValueError(f"{where}.perturb_stats must be one of {streams.PERTURB_STATS}, got "
                       f"{stream['perturb_stats']!r}.")
    if name != "train" and not stream.get("data"):
      raise ValueError(f"{where}.data: name the dataset of this stream.")


def _check_generated_stream(name: str, stream: Any, defaults: dict[str, Any],
                            modules: list[str]) -> None:
  where = f"config.streams.{name}"
  if name == "train":
    raise ValueError(f"{where}.source: the main training stream reads a dataset; give the "
                     "generated stream another name (e.g. config.streams.fake).")
  module = generated.generator_of(stream, where)
  if module not in modules:
    raise ValueError(f"{where}.source='module:{module}': no such module{suggest(module, modules)};"
                     f" modules: {', '.join(modules)} (add one in config.modules).")
  generated.parse_noise(stream.get("noise", ""), where)
  for key in ("data", "pp", "views", "perturb", "passes_by_group", "index", "sampler", "labels"):
    if key in stream and stream[key] != defaults[key]:
      raise ValueError(f"{where}.{key}: a generated stream reads no data and has no {key}; it "
                       "is the output of its module on fresh noise.")


def _check_modules_and_updates(config: ml_collections.ConfigDict) -> None:
  base = base_config()
  for name, m in config.modules.items():
    where = f"config.modules.{name}"
    if name == "classifier":
      raise ValueError(f"{where}: 'classifier' is the default module (config.model); give "
                       "extra modules other names.")
    _check_keys(m, MODULE_KEYS, where)
    if "model" not in m:
      raise ValueError(f"{where}.model is missing (model=dict(name=..., kwargs=...)).")
    _check_keys(m["model"], [k for k in base.model.keys()], f"{where}.model")
    if "optimizer" in m:
      _check_keys(m["optimizer"], list(base.optimizer.keys()), f"{where}.optimizer")
  modules = module_names(config)
  losses = _keys(config.losses)
  stream_names = _keys(config.streams)
  used = set()
  for name, u in config.updates.items():
    where = f"config.updates.{name}"
    _check_keys(u, UPDATE_KEYS, where)
    module = u.get("module", "classifier")
    if module not in modules:
      raise ValueError(f"{where}.module={module!r}: no such module{suggest(module, modules)}; "
                       f"modules: {', '.join(modules)} (add one in config.modules).")
    for key in u.get("losses", ()):
      if key not in losses:
        raise ValueError(f"{where}.losses: {key!r} is not a loss term of config.losses"
                         f"{suggest(key, losses)} ({', '.join(losses)}).")
      used.add(key)
    for s in u.get("streams", ()):
      if s not in stream_names:
        raise ValueError(f"{where}.streams: no stream {s!r}{suggest(s, stream_names)}; "
                         f"streams: {', '.join(stream_names)}.")
  if len(config.updates):
    order(config.updates, "config.updates", total=True)
    unused = [k for k in losses if k not in used]
    if unused:
      raise ValueError(f"config.losses {unused} are not used by any of config.updates "
                       f"({', '.join(config.updates.keys())}).")


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Flat ``{'optimizer.learning_rate': 0.1, ...}`` for TensorBoard hparams
  (free-form sub-dicts as one JSON-ish string each)."""
  return {k: v if isinstance(v, (int, float, str, bool)) else str(
      v.to_dict() if hasattr(v, "to_dict") else v) for k, v in _flatten(config).items()}
