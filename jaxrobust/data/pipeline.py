"""Reading splits: random-access sources, RAM caching, padded eval batches.

* :func:`load_split` gives a random-access source of a split (tfds
  ``data_source``); small splits (the embedded datasets, CIFAR) are decoded
  once into RAM (``config.data.cache='auto'``).
* Each process reads only its part of the data and produces its slice of the
  global batch; the trainer assembles the global, sharded ``jax.Array`` with
  ``jax.make_array_from_process_local_data`` (:func:`to_global`).
* :func:`eval_batches` iterates a split once and pads the last batch; every
  batch carries a boolean ``mask`` and the dataset ``index`` of each row, so
  metrics are exact and predictions can be put back in dataset order.
* Training streams (infinite, sampled, resumable) are in
  :mod:`jaxrobust.data.streams`.

Batches are dicts of numpy arrays: ``image`` uint8 [b, H, W, C], ``label`` int32
[b] (-1 for unlabelled data), ``index`` int32 [b], ``mask`` bool [b], and, for
datasets with group annotations (``DatasetSpec.num_groups``), ``group`` int32
[b] (padded and masked like ``label``). Batches of datasets without groups
have no ``group`` key (a label source may still set one, e.g. GLC's trusted
rows).
"""

from __future__ import annotations

import collections
import functools
import math
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from jaxrobust.data import sources

CACHE_LIMIT_BYTES = 2 << 30


class InMemorySource:
  """A decoded split as numpy arrays, with the random-access source protocol
  (``groups``: int32 [N] for datasets with group annotations, else None)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               groups: np.ndarray | None = None):
    self.images = images
    self.labels = labels
    self.groups = groups

  @property
  def has_groups(self) -> bool:
    return self.groups is not None

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    out = {"image": self.images[i], "label": self.labels[i]}
    if self.groups is not None:
      out["group"] = self.groups[i]
    return out

  def __getitems__(self, idx) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in idx]

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    out = {"image": self.images[idx], "label": self.labels[idx]}
    if self.groups is not None:
      out["group"] = self.groups[idx]
    return out


def record(rec: Mapping[str, Any]) -> tuple[np.ndarray, int]:
  """(image with a channel axis, int label) of a source record."""
  image = np.asarray(rec["image"])
  if image.ndim == 2:
    image = image[..., None]
  return image, int(rec.get("label", sources.UNLABELED))


def has_groups(source: Any) -> bool:
  """Whether a source's records carry ``group`` (a dataset with group
  annotations); wrappers (resized, subsets) answer for what they wrap."""
  while not hasattr(source, "has_groups") and hasattr(source, "source"):
    source = source.source
  return bool(getattr(source, "has_groups", False))


def read(source: Any, idx: np.ndarray) -> dict[str, np.ndarray]:
  """``{'image': uint8 [b, H, W, C], 'label': int32 [b]}`` for dataset indices,
  and ``'group': int32 [b]`` when the records have one."""
  groups = None
  if isinstance(source, InMemorySource):
    out = source.take(idx)
    images, labels, groups = out["image"], out["label"], out.get("group")
  else:
    getitems = getattr(source, "__getitems__", None)
    recs = getitems([int(i) for i in idx]) if getitems else [source[int(i)] for i in idx]
    pairs = [record(r) for r in recs]
    images = np.stack([p[0] for p in pairs])
    labels = np.asarray([p[1] for p in pairs])
    if recs and "group" in recs[0]:
      groups = np.asarray([r["group"] for r in recs])
  if images.ndim == 3:
    images = images[..., None]
  batch = {"image": images, "label": np.asarray(labels, np.int32)}
  if groups is not None:
    batch["group"] = np.asarray(groups, np.int32)
  return batch


def all_labels(source: Any) -> np.ndarray:
  """The label of every example (int32; read once for sources not in RAM)."""
  if isinstance(source, InMemorySource):
    return np.asarray(source.labels, np.int32)
  return _read_field(source, "label")


def _read_field(source: Any, key: str) -> np.ndarray:
  """One int32 field of every record, read in chunks of 4,096."""
  out = np.empty(len(source), np.int32)
  for start in range(0, len(source), 4096):
    idx = np.arange(start, min(start + 4096, len(source)))
    out[idx] = read(source, idx)[key]
  return out


def all_groups(source: Any, *, what: str) -> np.ndarray:
  """The group of every example (int32), read once for sources not in RAM.

  Raises a ValueError naming ``what`` (the dataset and split) when the
  source's dataset has no group annotations.
  """
  if not has_groups(source):
    raise ValueError(
        f"{what} has no group labels: group metrics need a dataset with group annotations "
        f"({', '.join(sources.GROUPED_EXAMPLES)}, or a dataset with a 'group' ClassLabel "
        "feature; see jaxrobust.data.sources.DERIVED_LABELS).")
  if isinstance(source, InMemorySource):
    return np.asarray(source.groups, np.int32)
  return _read_field(source, "group")


def group_counts(source: Any, num_groups: int, *, what: str) -> np.ndarray:
  """Examples per group (int64 [num_groups]) of a split; raises a ValueError
  naming ``what`` when the split has no group labels, a group outside
  [0, num_groups), or a group without examples."""
  groups = all_groups(source, what=what)
  if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
    raise ValueError(f"{what}: group labels outside [0, {num_groups}): "
                     f"{np.unique(groups[(groups < 0) | (groups >= num_groups)])[:10].tolist()}.")
  counts = np.bincount(groups, minlength=num_groups).astype(np.int64)
  if np.any(counts == 0):
    raise ValueError(f"{what}: group(s) {np.flatnonzero(counts == 0).tolist()} have no "
                     f"examples (group sizes {counts.tolist()}); every one of the "
                     f"{num_groups} groups must be present.")
  return counts


class SubsetSource:
  """Examples ``indices`` of a source, as a source of its own (position i is
  ``source[indices[i]]``)."""

  def __init__(self, source: Any, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  @property
  def has_groups(self) -> bool:
    return has_groups(self.source)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Any:
    return self.source[int(self.indices[i])]

  def __getitems__(self, idx) -> list[Any]:
    return [self[i] for i in idx]


def subset(source: Any, indices: np.ndarray) -> Any:
  """A source of the examples ``indices`` of ``source`` (in RAM if it is)."""
  indices = np.asarray(indices, np.int64)
  if isinstance(source, InMemorySource):
    return InMemorySource(source.images[indices], source.labels[indices],
                          None if source.groups is None else source.groups[indices])
  return SubsetSource(source, indices)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises if any label is outside [0, num_classes)."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])[:10]
    raise ValueError(
        f"{where}: labels outside [0, {num_classes}): found {bad.tolist()}. "
        "Check config.data.num_classes and the dataset.")


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of the shorter side to ``size``, then a central
  ``size x size`` crop (the usual eval transform; also used to feed datasets of
  varying image size, e.g. imagenet2012, to a fixed-size model)."""
  from PIL import Image
  h, w = image.shape[:2]
  if (h, w) != (size, size):
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    image = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
    if squeeze:
      image = image[..., None]
    top, left = (nh - size) // 2, (nw - size) // 2
    image = image[top:top + size, left:left + size]
  return image


class MappedSource:
  """Wraps a source so every record's image goes through ``fn`` (labels,
  groups and every other field unchanged)."""

  def __init__(self, source: Any, fn: Callable[[np.ndarray], np.ndarray]):
    self.source, self.fn = source, fn

  @property
  def has_groups(self) -> bool:
    return has_groups(self.source)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    rec = dict(self.source[i])
    image, _ = record(rec)
    rec["image"] = self.fn(image)
    return rec

  def __getitems__(self, idx) -> list[dict[str, Any]]:
    return [self[i] for i in idx]


class ResizedSource(MappedSource):
  """Wraps a source so every image is :func:`resize_and_center_crop`-ed."""

  def __init__(self, source: Any, size: int):
    super().__init__(source, functools.partial(resize_and_center_crop, size=size))
    self.size = size


def _repeat_gray(image: np.ndarray) -> np.ndarray:
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


class RGBSource(MappedSource):
  """Wraps a source so a one-channel image is repeated into three (PIL's
  ``convert('RGB')``, as OpenOOD's image-list loader does for MNIST)."""

  def __init__(self, source: Any):
    super().__init__(source, _repeat_gray)


def to_rgb(source: Any) -> Any:
  """``source`` with one-channel images repeated into three (in RAM if it is)."""
  if isinstance(source, InMemorySource):
    images = source.images
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    return InMemorySource(images, source.labels, source.groups)
  return RGBSource(source)


def image_shape(spec: sources.DatasetSpec, image_size: int) -> tuple[int, int, int]:
  """The (H, W, C) the model sees for ``spec`` with ``config.data.image_size``."""
  h, w, c = spec.image_shape
  if image_size:
    return (image_size, image_size, c)
  if h is None or w is None:
    raise ValueError(f"dataset {spec.name!r} has images of varying size; set "
                     "config.data.image_size (shorter side resized, then center-cropped).")
  return (h, w, c)


_DECODED: collections.OrderedDict = collections.OrderedDict()
_DECODED_MAX = 16


def load_split(name: str, split: str, *, data_dir: str | None = None,
               cache: str = "auto", image_size: int = 0) -> Any:
  """A random-access source for ``name``/``split``; in RAM when small.

  With ``image_size`` > 0 images are resized and center-cropped to it. Splits
  decoded into RAM are kept for the process (the last 16), so the stages of a
  recipe and its evaluators decode each split once.
  """
  key = (name, split, os.path.abspath(data_dir or sources.default_data_dir()), image_size)
  if cache != "none" and key in _DECODED:
    _DECODED.move_to_end(key)
    return _DECODED[key]
  try:
    return _load_split(key, name, split, data_dir=data_dir, cache=cache, image_size=image_size)
  except (RuntimeError, OSError) as e:
    text = str(e)
    if not any(w in text for w in ("Riegeli", "array_record", "orrupt", "Failed to read")):
      raise
    where = os.path.join(key[2], sources.base_name(name))
    raise sources.DatasetDamagedError(
        f"dataset {name!r} (split {split!r}) in {where} is damaged: "
        f"{text.splitlines()[0][:160]}. Delete {where} and run again: embedded datasets are "
        f"rebuilt on first use; others with `python -m jaxrobust.data.prepare {name} "
        f"--data_dir {key[2]}`.") from None


def _load_split(key, name: str, split: str, *, data_dir: str | None, cache: str,
                image_size: int) -> Any:
  src = sources.get_source(name, split, data_dir=data_dir)
  if image_size:
    src = ResizedSource(src, image_size)
  n = len(src)
  if n == 0:
    raise ValueError(f"dataset {name!r} split {split!r} is empty.")
  if cache == "none":
    return src
  first, _ = record(src[0])
  if cache == "auto" and first.nbytes * n > CACHE_LIMIT_BYTES:
    return src
  images = np.empty((n,) + first.shape, dtype=first.dtype)
  labels = np.empty((n,), dtype=np.int32)
  groups = np.empty((n,), dtype=np.int32) if has_groups(src) else None
  getitems = getattr(src, "__getitems__", None)
  for start in range(0, n, 4096):
    idx = list(range(start, min(start + 4096, n)))
    records = getitems(idx) if getitems else [src[i] for i in idx]
    for i, rec in zip(idx, records):
      images[i], labels[i] = record(rec)
      if groups is not None:
        groups[i] = rec["group"]
  decoded = InMemorySource(images, labels, groups)
  _DECODED[key] = decoded
  if len(_DECODED) > _DECODED_MAX:
    _DECODED.popitem(last=False)
  return decoded


def process_shard() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def local_batch_size(global_batch_size: int, what: str = "batch_size") -> int:
  _, count = process_shard()
  if global_batch_size % count:
    raise ValueError(f"{what}={global_batch_size} is not divisible by the {count} processes.")
  return global_batch_size // count


def eval_batches(source: Any, global_batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over this process's shard, padded to full batches.

  Every process yields the same number of batches (padding with masked
  copies of its first example), as collective programs require. Each batch
  carries the dataset ``index`` of its rows.
  """
  index, count = process_shard()
  local = local_batch_size(global_batch_size, "eval_batch_size")
  n = len(source)
  shard = np.array_split(np.arange(n), count)[index]
  num_batches = max(1, math.ceil(math.ceil(n / count) / local))
  for b in range(num_batches):
    idx = shard[b * local:(b + 1) * local]
    valid = len(idx)
    padded = np.concatenate([idx, np.full(local - valid, shard[0] if len(shard) else 0)])
    batch = read(source, padded)
    batch["index"] = padded.astype(np.int32)
    batch["mask"] = np.arange(local) < valid
    yield batch


def to_global(batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Process-local numpy batch -> global jax.Array sharded on the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def to_pmap(batch: Any, num_devices: int) -> Any:
  """Process-local batch -> [local devices, per-device batch, ...] for pmap."""
  def split(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"batch of {x.shape[0]} is not divisible by {num_devices} devices.")
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])
  return jax.tree.map(split, batch)
