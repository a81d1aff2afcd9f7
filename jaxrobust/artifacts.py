"""Artifacts: what one stage of a recipe hands to the next.

A stage writes arrays (``.npz``) or JSON into ``<workdir>/<stage>/artifacts/``;
a later stage refers to them as ``"artifact:<stage>/<name>"`` anywhere a config
takes an array, an index list, labels or a checkpoint:

* ``artifact:teacher/predictions`` -- the npz ``predictions.npz`` (a dict of
  arrays; when it holds a single array, that array);
* ``artifact:teacher/predictions:logits`` -- one array of it;
* ``artifact:glc/matrix`` -- ``matrix.json`` when there is no npz of that name;
* ``artifact:pretrain/checkpoint`` -- the stage's checkpoint directory
  (``<workdir>/pretrain/checkpoints``), e.g. for ``init_from.path``.

Arrays are loaded with ``allow_pickle=False``: no pickle anywhere. Writes are
atomic (:mod:`jaxrobust.files`) and made by process 0 only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxrobust import files

PREFIX = "artifact:"
CHECKPOINT = "checkpoint"


class ArtifactError(ValueError):
  """A reference to a stage or artifact that does not exist or does not fit."""


def is_ref(value: Any) -> bool:
  return isinstance(value, str) and value.startswith(PREFIX)


def parse_ref(ref: str, where: str = "") -> tuple[str, str, str | None]:
  """``'artifact:stage/name:key'`` -> ``('stage', 'name', 'key')``."""
  body = ref[len(PREFIX):] if is_ref(ref) else ref
  stage, sep, rest = body.partition("/")
  name, _, key = rest.partition(":")
  if not sep or not stage or not name:
    at = f"{where}: " if where else ""
    raise ArtifactError(f"{at}{ref!r} is not of the form 'artifact:<stage>/<name>[:<key>]'.")
  return stage, name, key or None


def find_refs(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
  """Every ``(config key, 'artifact:...')`` string in a (nested) config,
  including inside spec strings such as ``"subset(indices='artifact:a/b')"``."""
  out = []
  if hasattr(tree, "items"):
    for k, v in tree.items():
      out += find_refs(v, f"{prefix}.{k}" if prefix else str(k))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out += find_refs(v, f"{prefix}[{i}]")
  elif isinstance(tree, str) and PREFIX in tree:
    import re
    for m in re.finditer(r"artifact:[^'\"\s,()]+", tree):
      out.append((prefix, m.group(0)))
  return out


class Artifacts:
  """Resolves and writes artifacts of a recipe run.

  Args:
    root: the recipe's workdir (``None`` for a plain one-stage run: every
      reference is then an error).
    stages: the recipe's stage names, in order.
    current: the stage now running (it may refer only to earlier stages and
      write only its own artifacts).
  """

  def __init__(self, root: str | None = None, stages: Sequence[str] = (),
               current: str | None = None):
    self.root = os.path.abspath(root) if root else None
    self.stages = list(stages)
    self.current = current

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.root, stage)

  def _check_stage(self, stage: str, ref: str, where: str) -> None:
    at = f"{where}: " if where else ""
    if self.root is None:
      raise ArtifactError(f"{at}{ref!r} refers to an artifact, but this run has no stages "
                          "(artifacts pass between the stages of a recipe: config.stages).")
    if stage not in self.stages:
      from jaxrobust.registry import suggest
      raise ArtifactError(f"{at}{ref!r} refers to stage {stage!r}, which is not in the recipe"
                          f"{suggest(stage, self.stages)}; stages: {', '.join(self.stages)}.")
    if self.current is not None and self.stages.index(stage) >= self.stages.index(self.current):
      raise ArtifactError(f"{at}{ref!r}: stage {self.current!r} can only use artifacts of "
                          f"earlier stages, and {stage!r} does not run before it.")

  def available(self, stage: str) -> list[str]:
    d = os.path.join(self.stage_dir(stage), "artifacts")
    names = sorted({os.path.splitext(f)[0] for f in os.listdir(d)
                    if f.endswith((".npz", ".json"))}) if os.path.isdir(d) else []
    if os.path.isdir(os.path.join(self.stage_dir(stage), "checkpoints")):
      names.append(CHECKPOINT)
    return names

  def path(self, ref: str, where: str = "") -> str:
    """The file (or checkpoint directory) a reference points to."""
    stage, name, _ = parse_ref(ref, where)
    self._check_stage(stage, ref, where)
    if name == CHECKPOINT:
      path = os.path.join(self.stage_dir(stage), "checkpoints")
      if os.path.isdir(path):
        return path
    else:
      for ext in (".npz", ".json"):
        path = os.path.join(self.stage_dir(stage), "artifacts", name + ext)
        if os.path.exists(path):
          return path
    at = f"{where}: " if where else ""
    have = self.available(stage)
    raise ArtifactError(
        f"{at}{ref!r}: stage {stage!r} has no artifact {name!r}"
        + (f"; it has: {', '.join(have)}." if have else
           " (it has written none yet: has it run?)."))

  def load(self, ref: str, where: str = "") -> Any:
    """An array (npz with one array, or ``:key``), a dict of arrays, or JSON."""
    stage, name, key = parse_ref(ref, where)
    path = self.path(ref, where)
    at = f"{where}: " if where else ""
    if path.endswith(".json"):
      with open(path, encoding="utf-8") as f:
        obj = json.load(f)
      if key is not None:
        if not isinstance(obj, dict) or key not in obj:
          raise ArtifactError(f"{at}{ref!r}: {path} has no entry {key!r}.")
        obj = obj[key]
      return obj
    if name == CHECKPOINT:
      return path
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    if key is not None:
      if key not in arrays:
        raise ArtifactError(f"{at}{ref!r}: {path} has arrays {sorted(arrays)}, not {key!r}.")
      return arrays[key]
    return next(iter(arrays.values())) if len(arrays) == 1 else arrays

  def load_array(self, value: Any, where: str = "", *, dtype: Any = None) -> np.ndarray:
    """A reference or a literal (list/tuple/array) -> a numpy array."""
    arr = self.load(value, where) if is_ref(value) else value
    if isinstance(arr, dict):
      raise ArtifactError(f"{where}: {value!r} holds several arrays {sorted(arr)}; name one "
                          f"with '{value}:<key>'.")
    return np.asarray(arr, dtype=dtype)

  def save(self, name: str, value: Mapping[str, Any] | np.ndarray | Any) -> str:
    """Writes an artifact of the current stage: a dict of arrays or an array
    (npz), anything else as JSON. Returns its reference."""
    if self.root is None or self.current is None:
      raise ArtifactError("only a stage of a recipe can write artifacts.")
    d = os.path.join(self.stage_dir(self.current), "artifacts")
    ref = f"{PREFIX}{self.current}/{name}"
    if jax.process_index() != 0:
      return ref
    if isinstance(value, np.ndarray) or (isinstance(value, Mapping) and value and all(
        isinstance(v, (np.ndarray, jax.Array)) for v in value.values())):
      arrays = {"array": np.asarray(value)} if not isinstance(value, Mapping) else value
      files.write_npz(os.path.join(d, name + ".npz"), arrays)
    else:
      files.write_json(os.path.join(d, name + ".json"), value, what="artifact", indent=1)
    return ref
