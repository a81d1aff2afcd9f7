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
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

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
