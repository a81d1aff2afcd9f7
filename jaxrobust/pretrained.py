"""Initialising a model from a pre-trained checkpoint (pre-train -> fine-tune).

Hendrycks et al. (2019) fine-tune a network pre-trained on (Downsampled)
ImageNet by replacing its classifier with a fresh ``Linear(features, K)`` and
training all layers. Every jaxrobust model names its classifier ``head``, so
the rule is: copy every parameter whose path and shape match; the ``head``
subtree keeps its fresh initialisation when its shapes differ (new number of
classes) or when ``reset_head='always'``. Parameters matching ``skip`` (a
regex over the full '/'-joined path, e.g. a SimCLR projection head) also keep
their fresh values. Any other difference is an error that names the parameter,
never a silent partial load.

:func:`from_torch` reads the papers' released PyTorch checkpoints (a
``state_dict``, or a ``.pt``/``.pth``, ``.npz`` or ``.safetensors`` file of
one) into the variables of a jaxrobust model: the WRN-40-2 of
``hendrycks/pre-training``, ``hendrycks/outlier-exposure`` and
``wetliu/energy_ood`` (``models/wrn.py``) and torchvision's ResNet-50, through
:mod:`jaxrobust.convert`. ``config.init_from.path`` (and every reader of
:func:`jaxrobust.checkpoint.load_pretrained`) also takes such a file directly;
the ``import_torch`` stage task (:mod:`jaxrobust.tasks`) writes one as a
jaxrobust checkpoint. The released checkpoints, their input normalisation and
the papers' numbers are in ``docs/pretrained-checkpoints.md``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxrobust import convert
from jaxrobust.checkpoint import CheckpointMismatchError

HEAD = "head"


def _flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def _is_head(path: str) -> bool:
  return path == HEAD or path.startswith(HEAD + "/")


def merge_pretrained(params: Any, batch_stats: Any, src_params: Any, src_stats: Any,
                     *, reset_head: str = "auto", load_batch_stats: bool = True,
                     skip: str = "") -> tuple[Any, Any, list[str]]:
  """Returns ``(params, batch_stats, reset)``: the model's fresh variables with
  the pre-trained values copied in, and the list of paths left fresh."""
  skipped = re.compile(skip).fullmatch if skip else (lambda p: False)
  new, src = _flat(params), _flat(src_params)
  head_shapes_differ = any(
      _is_head(p) and (p not in src or np.shape(src[p]) != np.shape(v)) for p, v in new.items())
  fresh_head = reset_head == "always" or (reset_head == "auto" and head_shapes_differ)
  if reset_head == "never" and head_shapes_differ:
    raise CheckpointMismatchError(
        "config.init_from.reset_head='never' but the pre-trained head does not fit: "
        + ", ".join(f"{p}: {np.shape(src.get(p))} vs {np.shape(new[p])}"
                    for p in new if _is_head(p)))
  problems, reset = [], []
  for path, value in new.items():
    if (_is_head(path) and fresh_head) or skipped(path):
      reset.append(path)
      continue
    if path not in src:
      problems.append(f"{path}: missing from the checkpoint")
    elif np.shape(src[path]) != np.shape(value):
      problems.append(f"{path}: checkpoint {np.shape(src[path])}, model {np.shape(value)}")
    else:
      new[path] = jnp.asarray(src[path], dtype=value.dtype)
  extra = [p for p in src if p not in new and not (_is_head(p) and fresh_head)
           and not skipped(p)]
  problems += [f"{p}: in the checkpoint but not in the model" for p in extra]
  if problems:
    raise CheckpointMismatchError(
        "the pre-trained checkpoint does not fit the model (config.init_from):\n  "
        + "\n  ".join(problems[:12]) + ("\n  ..." if len(problems) > 12 else ""))
  stats = _flat(batch_stats)
  if load_batch_stats and stats:
    src_s = _flat(src_stats)
    for path, value in stats.items():
      if (_is_head(path) and fresh_head) or skipped(path):
        continue
      if path not in src_s or np.shape(src_s[path]) != np.shape(value):
        raise CheckpointMismatchError(
            f"batch_stats {path}: checkpoint {np.shape(src_s.get(path))}, model {np.shape(value)}")
      stats[path] = jnp.asarray(src_s[path], dtype=value.dtype)
  out_stats = traverse_util.unflatten_dict(stats, sep="/") if stats else batch_stats
  return traverse_util.unflatten_dict(new, sep="/"), out_stats, reset


def torch_arch(model: Any) -> str:
  """The :mod:`jaxrobust.convert` architecture of a jaxrobust model (a flax
  module, or a :class:`jaxrobust.modules.Module` holding one)."""
  from jaxrobust.models.resnet import ResNet50
  from jaxrobust.models.vgg import VGG
  from jaxrobust.models.wide_resnet import WideResNet
  flax_model = getattr(model, "model", model)
  for cls, arch in ((WideResNet, "wrn"), (ResNet50, "resnet50"), (VGG, "vgg13")):
    if isinstance(flax_model, cls):
      return arch
  raise ValueError(f"from_torch: no PyTorch layout for a {type(flax_model).__name__}; "
                   "known: WideResNet ('wrn', hendrycks' wrn.py), ResNet50 (torchvision "
                   "resnet50), VGG (vgg13/vgg13_bn).")


def _abstract_variables(model: Any, input_shape: tuple[int, ...] | None) -> tuple[Any, Any]:
  if hasattr(model, "input_shape") and hasattr(model, "model"):  # a jaxrobust Module
    params, stats = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    return params, stats
  shape = tuple(input_shape or (32, 32, 3))
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape),
                                        train=False))
  return v["params"], v.get("batch_stats", {})


def from_torch(state_dict: Mapping[str, Any] | str | os.PathLike, *, model: Any,
               input_shape: tuple[int, ...] | None = None, where: str = "from_torch"
               ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(params, batch_stats)`` (numpy, the model's dtypes) of ``model`` from a
  PyTorch ``state_dict`` of its reference architecture.

  Args:
    state_dict: a mapping ``name -> tensor/array`` (a ``module.`` prefix is
      dropped), or a path to a ``.pt``/``.pth`` (read with
      ``torch.load(weights_only=True)``), ``.npz`` or ``.safetensors`` file.
    model: a jaxrobust model (``get_model('wrn_40_2', num_classes=10)``,
      ``get_model('resnet50', num_classes=1000)``) or a
      :class:`jaxrobust.modules.Module`; the state_dict must give exactly its
      parameters with their shapes.
    input_shape: one example's shape for a flax model (default 32x32x3; the
      converted variables do not depend on it beyond its channels).
    where: the config key or caller named in errors.

  Raises ``ValueError`` naming every missing, unexpected or mis-shaped key
  (e.g. a CIFAR-100 head for a 10-class model, or a ResNet-50 state_dict for
  a WRN), before anything is compiled.
  """
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = convert.read_state_dict(state_dict, where=where)
  arch = torch_arch(model)
  try:
    found = convert.detect_arch(state_dict)
  except ValueError:
    found = arch  # unknown keys: the comparison below names them
  if found != arch:
    raise ValueError(f"{where}: the state_dict is a {found!r} model (its first key "
                     f"{next(iter(state_dict))!r}), the model a {arch!r} "
                     f"({type(getattr(model, 'model', model)).__name__}).")
  params_t, stats_t = _abstract_variables(model, input_shape)
  try:
    params, stats = convert.from_torch(state_dict, arch=arch, params_template=params_t)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  want = {k: v.shape for k, v in _flat(stats_t).items()}
  got = {k: np.shape(v) for k, v in _flat(stats).items()}
  if want != got:  # the layout is derived from the params: only a model bug lands here
    raise ValueError(f"{where}: batch_stats {sorted(set(want) ^ set(got))[:6]} do not fit.")
  dtypes = {k: v.dtype for k, v in _flat(stats_t).items()}
  stats = traverse_util.unflatten_dict(
      {k: np.asarray(v, dtypes[k]) for k, v in _flat(stats).items()}, sep="/") if got else {}
  return params, stats
