"""Mesh and sharding rules as config data (the pjit / global-view engine).

A run describes its device mesh as ``config.mesh = (('data', -1),)`` and how each
array of the train state is laid out as regex rules over the array's path,
``config.sharding_rules = (('.*', 'replicate'),)``. Data-parallel training is
the default; FSDP is the one-line change ``(('.*', 'fsdp'),)``, or
``"fsdp(axis='data', min_size=2**18)"`` with arguments. The same rules apply to
the optimizer state, whose paths end with the parameter paths (e.g.
``opt_state/1/0/trace/conv1/kernel``), so momentum is sharded like its weight.

Rules (the first regex that matches the full path with ``re.search`` wins):

* ``replicate`` -- every device holds the whole array.
* ``fsdp(axis='data', min_size=0)`` -- shard the largest dimension that the
  axis size divides, over ``axis``; arrays with fewer than ``min_size``
  elements, or no divisible dimension, stay replicated (as big_vision's rule).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrobust.registry import Registry


def make_mesh(spec: Sequence[tuple[str, int]],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a Mesh from ``((axis, size), ...)``; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(str(name) for name, _ in spec)
  sizes = [int(size) for _, size in spec]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {tuple(spec)}: at most one axis may have size -1.")
  known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"config.mesh {tuple(spec)}: {len(devices)} devices are not divisible by {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    n = len(devices)
    raise ValueError(
        f"config.mesh {tuple(spec)} needs {int(np.prod(sizes))} devices; "
        f"{n} {'is' if n == 1 else 'are'} available.")
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), names,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))
  return Mesh(np.asarray(devices).reshape(sizes), names)


def data_sharding(mesh: Mesh, data_axes: Sequence[str]) -> NamedSharding:
  """Batch dimension sharded over ``data_axes``, the rest replicated."""
  unknown = [a for a in data_axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"config.data_axes {tuple(data_axes)} names axes not in the mesh "
                     f"{mesh.axis_names}: {unknown}.")
  return NamedSharding(mesh, P(tuple(data_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --- rules ------------------------------------------------------------------

RULES = Registry("sharding rule")


def _replicate(shape: tuple[int, ...], mesh: Mesh) -> P:
  del shape, mesh
  return P()


def _fsdp(shape: tuple[int, ...], mesh: Mesh, axis: str = "data",
          min_size: int = 0) -> P:
  if axis not in mesh.axis_names:
    raise ValueError(f"fsdp rule: axis {axis!r} is not in the mesh {mesh.axis_names}.")
  n = mesh.shape[axis]
  if int(np.prod(shape, dtype=np.int64)) < min_size or n == 1:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


RULES.register("replicate")(_replicate)
RULES.register("fsdp")(_fsdp)


def parse_rule(rule: str) -> Callable[[tuple[int, ...], Mesh], P]:
  """``"fsdp(axis='data', min_size=1024)"`` -> a function (shape, mesh) -> spec."""
  fn = RULES.build(rule, where="config.sharding_rules", runtime=("shape", "mesh"))
  return lambda shape, mesh: fn(tuple(shape), mesh)


def path_str(path) -> str:
  """A '/'-joined name for a pytree key path (dict keys, attributes, indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_shardings(tree: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, str]]) -> Any:
  """A NamedSharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  compiled = [(re.compile(pattern), parse_rule(rule)) for pattern, rule in rules]

  def leaf_sharding(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for pattern, rule in compiled:
      if pattern.search(name):
        return NamedSharding(mesh, rule(shape, mesh) if shape else P())
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)
