"""Dataset sources: one TF-free, random-access way to read every dataset.

``get_source(name, split)`` returns a grain-compatible random-access source
(``len``, ``__getitem__``, ``__getitems__``) of records
``{'image': uint8 [H, W, C], 'label': int64}``; ``label`` is ``UNLABELED`` (-1)
when the dataset has no class label (the out-of-distribution sets). Datasets
with group annotations (spurious-correlation benchmarks: ``spurious_glyphs``,
``waterbirds``, ``celeb_a``) also carry ``'group': int64``, with the
Sagawa et al./DFR convention ``group = label * n_spurious + spurious``
(``DatasetSpec.num_groups``); records of other datasets have no ``group`` key
(batches and predictions then say -1 where they need a value).
``get_spec(name)`` describes a dataset without reading (or preparing) it.

Names are tfds names with optional config and version: ``'digits'``,
``'glyphs/small'``, ``'gaussian_noise/gray'``, ``'cifar10'``,
``'cifar10:3.0.2'``, and ``'validation_ood/<kind>/<dataset>'``: a validation
OOD set made from ``<dataset>``'s images (:mod:`jaxrobust.data.validation_ood`).
Two kinds:

* **Embedded** (`EMBEDDED`): generated offline from files that scikit-learn and
  matplotlib ship (`jaxrobust.data.builders`). They are prepared automatically
  on first use into ``data_dir`` (seconds), under a file lock so concurrent
  processes (pytest-xdist workers, the hosts of a pod sharing a POSIX file
  system) do not race.
* **Any other tfds dataset** (cifar10, cifar100, svhn_cropped, imagenet2012,
  ...) must already be prepared in ``data_dir`` as ``array_record``, e.g. on a
  machine with internet: ``tfds build cifar10 --file_format=array_record
  --data_dir=DIR`` or ``python -m jaxrobust.data.prepare cifar10 --data_dir
  DIR``. Nothing is downloaded implicitly.

``data_dir`` defaults to ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``, as
in tfds. Importing this module registers the embedded builders with tfds, so
``tfds.data_source('digits', ...)`` also works afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxrobust.data import builders, validation_ood
from jaxrobust.registry import suggest

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; prepare once before going parallel.
  fcntl = None

EMBEDDED: tuple[str, ...] = builders.NAMES
# Builders composed from other tfds datasets in data_dir (no download): prepared
# on first use like the embedded ones, from the user's copies of their sources.
COMPOSED: tuple[str, ...] = builders.COMPOSED
UNLABELED = builders.UNLABELED  # defined once, with the builders that write it

# (image key, label key) of tfds datasets that `_feature_keys`'s rule gets
# wrong. The rule: 'image', else the only Image feature; 'label', else the only
# top-level ClassLabel, else no label (e.g. lsun, downsampled_imagenet). A label
# key of None marks a dataset without class labels.
KEY_OVERRIDES: dict[str, tuple[str, str | None]] = {
    "smallnorb": ("image", "label_category"),  # has five ClassLabels
}


# The group feature of datasets that store one: a top-level ClassLabel named
# 'group' (the embedded spurious_glyphs, the composed waterbirds).
GROUP_KEY = "group"


@dataclasses.dataclass(frozen=True)
class DerivedLabels:
  """Class label and group of a tfds dataset computed from other features.

  ``label = features[label]`` and ``group = label * num_spurious +
  features[spurious]`` (Sagawa et al. 2020 / DFR: group = y * n_confounders +
  confounder), both from boolean or integer features given by their nested
  path (``('attributes', 'Blond_Hair')``).
  """
  label: tuple[str, ...]
  spurious: tuple[str, ...]
  class_names: tuple[str, ...]
  num_spurious: int = 2

  @property
  def num_groups(self) -> int:
    return len(self.class_names) * self.num_spurious

  def __call__(self, raw: Mapping[str, Any]) -> tuple[int, int]:
    label, spurious = int(_get(raw, self.label)), int(_get(raw, self.spurious))
    return label, label * self.num_spurious + spurious


def _get(raw: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    raw = raw[key]
  return np.asarray(raw)


#: Datasets with group annotations, for messages.
GROUPED_EXAMPLES = ("spurious_glyphs", "waterbirds", "celeb_a")

# tfds datasets whose class label and group come from other features. CelebA as
# in Sagawa et al. 2020 and DFR: label = Blond_Hair, spurious = Male, so groups
# 0 non-blond woman, 1 non-blond man, 2 blond woman, 3 blond man (the minority).
DERIVED_LABELS: dict[str, DerivedLabels] = {
    "celeb_a": DerivedLabels(label=("attributes", "Blond_Hair"), spurious=("attributes", "Male"),
                             class_names=("not_blond", "blond")),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a consumer needs to know about a dataset before reading it.

  Attributes:
    name: the name as given (tfds name, optional ``/config`` and ``:version``).
    num_classes: number of classes, or None for unlabelled (OOD) data.
    image_shape: (H, W, C) of the stored images; H/W are None when they vary
      (e.g. imagenet2012), and the pipeline must resize.
    splits: split name -> number of examples. Empty when unknown, i.e. for a
      catalog dataset that is not prepared in ``data_dir``.
    has_labels: whether ``label`` holds class labels (else it is always -1).
    num_groups: number of annotated groups (``group = label * n_spurious +
      spurious``), or None when the dataset has no group labels.
  """
  name: str
  num_classes: int | None
  image_shape: tuple[int | None, int | None, int]
  splits: dict[str, int]
  has_labels: bool
  num_groups: int | None = None

  @property
  def has_groups(self) -> bool:
    return self.num_groups is not None


class RecordSource:
  """Random-access records ``{'image', 'label'[, 'group']}`` over a tfds data source.

  Keeps only the image and label features (others, e.g. string ids, would not
  batch), gives 2-D images a channel axis and returns labels as ``np.int64``
  (``UNLABELED`` when the dataset has no label). Datasets with groups (a
  ``group_key`` feature, or ``derived`` labels) also give ``group`` (int64).
  Picklable if the wrapped source is (tfds array_record sources are), so grain
  worker processes can use it.
  """

  def __init__(self, source: Any, image_key: str, label_key: str | None, name: str = "",
               group_key: str | None = None, derived: DerivedLabels | None = None):
    self.source = source
    self.image_key = image_key
    self.label_key = label_key
    self.name = name
    self.group_key = group_key
    self.derived = derived

  @property
  def has_groups(self) -> bool:
    return self.group_key is not None or self.derived is not None

  def __len__(self) -> int:
    return len(self.source)

  def _record(self, raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(raw[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    if self.derived is not None:
      label, group = self.derived(raw)
      return {"image": image, "label": np.int64(label), "group": np.int64(group)}
    label = UNLABELED if self.label_key is None else raw[self.label_key]
    rec = {"image": image, "label": np.int64(label)}
    if self.group_key is not None:
      rec["group"] = np.int64(raw[self.group_key])
    return rec

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._record(self.source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    try:  # batched reads: 2-3x faster than one by one on array_record
      raws = self.source.__getitems__(indices)
    except (AttributeError, TypeError):
      # No batched read, or tfds.testing.mock_data's broken fake (tfds 4.9.10);
      # a genuine error is raised again by __getitem__.
      raws = [self.source[i] for i in indices]
    return [self._record(raw) for raw in raws]

  def __repr__(self) -> str:
    return (f"RecordSource({self.name!r}, len={len(self)}, image={self.image_key!r}, "
            f"label={self.label_key!r}" + (", groups" if self.has_groups else "") + ")")


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (the tfds default)."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


class DatasetDamagedError(ValueError):
  """A prepared dataset's files cannot be read back."""


def base_name(name: str) -> str:
  """``'glyphs/small:1.0.0'`` -> ``'glyphs'`` (the dataset's directory name)."""
  return name.split(":", 1)[0].split("/", 1)[0]


def _unknown_name_error(name: str) -> ValueError:
  base = base_name(name)
  known = sorted(set(EMBEDDED) | set(COMPOSED)
                 | set(tfds.list_builders(with_community_datasets=False)))
  hint = suggest(base, known, n=5)
  return ValueError(
      f"Unknown dataset {name!r}{hint}. Embedded (offline) datasets: {', '.join(EMBEDDED)}. "
      "Any tfds catalog dataset (https://www.tensorflow.org/datasets/catalog) prepared as "
      "array_record in data_dir also works.")


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  if not isinstance(name, str) or not name:
    raise TypeError(f"dataset name must be a non-empty string, got {name!r}.")
  base = base_name(name)
  try:
    return tfds.builder(name, data_dir=data_dir or default_data_dir())
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_name_error(name) from None
  except ValueError as e:
    if (base in EMBEDDED or base in COMPOSED) and "BuilderConfig" in str(e):
      configs = sorted(tfds.builder_cls(base).builder_configs)
      raise ValueError(
          f"Unknown config in {name!r}; {base} has configs: {', '.join(configs)}.") from None
    raise


def _known_splits(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
  splits = {k: int(v.num_examples) for k, v in builder.info.splits.items()}
  if not splits and builder.name in EMBEDDED:
    splits = builder.split_sizes()
  return splits


def _check_split(name: str, split: str, splits: Mapping[str, int]) -> None:
  """Raises if a split (tfds syntax: 'train', 'train[:10%]', 'train+test') is unknown."""
  if not isinstance(split, str) or not split:
    raise TypeError(f"split must be a non-empty string, got {split!r}.")
  if not splits:  # unknown until the dataset is prepared; tfds will check
    return
  for part in split.split("+"):
    base = re.sub(r"\[.*\]$", "", part.strip())
    if base not in splits:
      raise ValueError(
          f"Unknown split {split!r} for {name!r}; available splits: {', '.join(splits)}.")


def _feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str | None]:
  """(image key, ClassLabel key or None) of a builder's top-level features."""
  if builder.name in KEY_OVERRIDES:
    return KEY_OVERRIDES[builder.name]
  features = builder.info.features
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  if "image" in features:
    image_key = "image"
  elif len(images) == 1:
    image_key = images[0]
  else:
    raise ValueError(
        f"Cannot tell which feature of {builder.name!r} is the image (features: "
        f"{', '.join(features)}); add it to jaxrobust.data.sources.KEY_OVERRIDES.")
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if "label" in labels:
    return image_key, "label"
  return image_key, labels[0] if len(labels) == 1 else None


def _group_labels(builder: tfds.core.DatasetBuilder
                  ) -> tuple[str | None, DerivedLabels | None, int | None]:
  """(group feature key, derived labels, number of groups) of a builder; all
  None when it has no group annotations."""
  if builder.name in DERIVED_LABELS:
    derived = DERIVED_LABELS[builder.name]
    return None, derived, derived.num_groups
  features = builder.info.features
  feature = features[GROUP_KEY] if GROUP_KEY in features.keys() else None
  if isinstance(feature, tfds.features.ClassLabel):
    return GROUP_KEY, None, int(feature.num_classes)
  return None, None, None


def _random_access_formats(builder: tfds.core.DatasetBuilder) -> set[Any]:
  available = builder.info.available_file_formats()
  return available & set(tfds.core.file_adapters.FileFormat.with_random_access())


def _how_to_prepare(name: str, data_dir: str) -> str:
  return (
      f"On a machine with internet access run\n"
      f"  tfds build {base_name(name)} --file_format=array_record --data_dir={data_dir}\n"
      f"or\n"
      f"  python -m jaxrobust.data.prepare {name} --data_dir {data_dir}\n"
      f"(i.e. tfds.builder({name!r}, data_dir=...).download_and_prepare("
      f"file_format='array_record')), then copy {data_dir}/{base_name(name)} here. "
      f"Datasets that only exist as tfrecord need TensorFlow: pip install 'jaxrobust[tf]'.")


def _check_readable(name: str, builder: tfds.core.DatasetBuilder) -> None:
  """Raises if a prepared dataset has no random-access (array_record) copy."""
  if not _random_access_formats(builder):
    formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
    raise ValueError(
        f"{name!r} is prepared in {builder.data_dir} as {formats} only, which cannot be read "
        "without TensorFlow. Convert it: tfds convert_format --dataset_version_dir="
        f"{builder.data_dir} --out_file_format=array_record (needs TensorFlow: pip install "
        "'jaxrobust[tf]'), or prepare it again as array_record in another data_dir.\n"
        + _how_to_prepare(name, str(builder.data_dir_root)))


def _catalog_source(name: str, split: str, builder: tfds.core.DatasetBuilder) -> Sequence[Any]:
  if builder.is_prepared():
    _check_readable(name, builder)
    return builder.as_data_source(split=split)
  # Not prepared: tfds raises, unless tfds.testing.mock_data serves fake records.
  try:
    return builder.as_data_source(split=split)
  except (NotImplementedError, ValueError, AssertionError, FileNotFoundError) as e:
    data_dir = str(builder.data_dir_root)
    raise ValueError(
        f"Dataset {name!r} is not prepared in {data_dir} (jaxrobust never downloads "
        f"implicitly).\n{_how_to_prepare(name, data_dir)}") from e


@contextlib.contextmanager
def _file_lock(data_dir: str, key: str) -> Iterator[None]:
  """Exclusive advisory lock on ``data_dir/.jaxrobust-{key}.lock`` (POSIX file systems).

  The holder deletes the lock file before releasing it, so no lock files are
  left behind; a waiter that then wakes up on the deleted file locks the
  current one instead. On remote paths (``gs://...``) or without fcntl this
  does not lock: prepare once (``python -m jaxrobust.data.prepare``) before
  starting parallel jobs there.
  """
  if fcntl is None or "://" in data_dir:
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, f".jaxrobust-{key.replace('/', '-')}.lock")
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
      current = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      current = False
    if current:
      break
    os.close(fd)
  try:
    yield
  finally:
    os.unlink(path)
    os.close(fd)  # releases the lock


def _prepare_embedded(name: str, data_dir: str | None) -> tuple[tfds.core.DatasetBuilder, bool]:
  """(builder of the prepared dataset, whether this call generated it)."""
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return builder, False
  root = str(builder.data_dir_root)
  with _file_lock(root, builder.info.full_name):
    builder = _builder(name, root)  # re-read: another process may have finished
    if builder.is_prepared():
      return builder, False
    builder.download_and_prepare()
  return _builder(name, root), True


def get_source(name: str, split: str, *, data_dir: str | None = None) -> RecordSource:
  """Random-access records ``{'image': uint8 [H, W, C], 'label': int64}`` of a split.

  Args:
    name: tfds name with optional config/version, e.g. ``'digits'``,
      ``'glyphs/small'``, ``'blobs/gray'``, ``'cifar10:3.0.2'``.
    split: a split name, or tfds split syntax (``'train[:90%]'``,
      ``'train+validation'``).
    data_dir: tfds data directory (default: `default_data_dir()`).

  Embedded datasets are prepared on first use (under a file lock). Others must
  be prepared as array_record in ``data_dir``; otherwise a ValueError says how.
  Unknown names or splits raise a ValueError listing the alternatives.
  """
  if validation_ood.is_validation_ood(name):  # 'validation_ood/<kind>/<dataset>'
    return _validation_ood_source(name, split, data_dir)
  base = base_name(name)
  builder = _builder(name, data_dir)
  _check_split(name, split, _known_splits(builder))
  if base in EMBEDDED or base in COMPOSED:
    builder, _ = _prepare_embedded(name, data_dir)
    source = builder.as_data_source(split=split)
  else:
    source = _catalog_source(name, split, builder)
  image_key, label_key = _feature_keys(builder)
  group_key, derived, _ = _group_labels(builder)
  return RecordSource(source, image_key, label_key, name=f"{name}[{split}]",
                      group_key=group_key, derived=derived)


def get_spec(name: str, *, data_dir: str | None = None) -> DatasetSpec:
  """Classes, image shape and split sizes of a dataset; prepares nothing."""
  if validation_ood.is_validation_ood(name):
    return _validation_ood_spec(name, data_dir)
  builder = _builder(name, data_dir)
  image_key, label_key = _feature_keys(builder)
  _, derived, num_groups = _group_labels(builder)
  features = builder.info.features
  if derived is not None:
    num_classes = len(derived.class_names)
  else:
    num_classes = None if label_key is None else int(features[label_key].num_classes)
  return DatasetSpec(
      name=name,
      num_classes=num_classes,
      image_shape=tuple(features[image_key].shape),
      splits=_known_splits(builder),
      has_labels=num_classes is not None,
      num_groups=num_groups,
  )


def class_names(name: str, *, data_dir: str | None = None) -> list[str]:
  """The dataset's class names (tfds ``ClassLabel`` names; ids as strings
  when it has none, ``[]`` for unlabelled data)."""
  if validation_ood.is_validation_ood(name):
    return []
  builder = _builder(name, data_dir)
  if builder.name in DERIVED_LABELS:
    return list(DERIVED_LABELS[builder.name].class_names)
  _, label_key = _feature_keys(builder)
  if label_key is None:
    return []
  label = builder.info.features[label_key]
  return [str(n) for n in label.names] if label.names else [
      str(i) for i in range(label.num_classes)]


def prepare(name: str, *, data_dir: str | None = None) -> str:
  """Prepares a dataset in ``data_dir`` as array_record; returns its directory.

  Embedded datasets are generated offline (no-op when already prepared). Any
  other tfds dataset is downloaded and prepared with
  ``download_and_prepare(file_format='array_record')``: that needs internet
  access (and, for some datasets, TensorFlow or manual downloads); failures
  are re-raised as a RuntimeError that says so.
  """
  if validation_ood.is_validation_ood(name):  # made on read from its source dataset
    return prepare(validation_ood.parse_name(name)[1], data_dir=data_dir)
  if base_name(name) in EMBEDDED or base_name(name) in COMPOSED:
    builder, _ = _prepare_embedded(name, data_dir)
    return str(builder.data_dir)
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    _check_readable(name, builder)
    return str(builder.data_dir)
  root = str(builder.data_dir_root)
  with _file_lock(root, builder.info.full_name):
    try:
      builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"Could not prepare {name!r} in {root}: {type(e).__name__}: {e}\n"
          "Preparing a catalog dataset downloads it (internet access needed); some "
          "datasets also need TensorFlow (pip install 'jaxrobust[tf]') or files you "
          "download by hand (see https://www.tensorflow.org/datasets/catalog/"
          f"{base_name(name)}).") from e
  return str(builder.data_dir)


def _validation_ood_source(name: str, split: str, data_dir: str | None
                           ) -> validation_ood.ValidationOODSource:
  """The ``kind`` images of ``dataset``'s ``split``
  (:mod:`jaxrobust.data.validation_ood`); built here so that module does not
  import this one."""
  kind, dataset = validation_ood.parse_name(name)
  src = get_source(dataset, split, data_dir=data_dir)
  if len(src) == 0:
    raise ValueError(f"dataset {name!r}: split {split!r} of {dataset!r} is empty.")
  records = (src.__getitems__(range(len(src))) if hasattr(src, "__getitems__")
             else [src[i] for i in range(len(src))])
  images = np.stack([r["image"] for r in records])
  out = validation_ood.transform(kind, images, validation_ood.seed_of(kind, dataset, split,
                                                                      validation_ood.SEED))
  return validation_ood.ValidationOODSource(out, name=f"{name}[{split}]")


def _validation_ood_spec(name: str, data_dir: str | None) -> "DatasetSpec":
  """The source dataset's spec, unlabelled (its splits and image shape)."""
  _, dataset = validation_ood.parse_name(name)
  spec = get_spec(dataset, data_dir=data_dir)
  h, w, c = spec.image_shape
  if h is None or w is None:
    raise ValueError(f"dataset {name!r}: {dataset!r} has images of varying size; validation "
                     "OOD sets need a fixed image size.")
  return DatasetSpec(name=name, num_classes=None, image_shape=(h, w, c),
                     splits=dict(spec.splits), has_labels=False)
