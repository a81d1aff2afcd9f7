"""Training streams as specs: data, population, sampler, label source.

Every training input -- the main ``train`` stream included -- is a stream spec
in ``config.streams.<name>``::

    data='digits', split='train', batch_size=64,
    pp='pad_crop(2)',                 # on-device augmentation (jaxrobust.data.pp)
    views=1,                          # >1: the pp chain is drawn that many times (SimCLR)
    perturb='',                       # e.g. 'fgsm(eps=8/255)' (jaxrobust.attacks)
    perturb_stats='update',           # the perturbation's train-mode passes update the
                                      #   BatchNorm statistics (PyTorch's model.train()
                                      #   attacks) or 'discard' them
    passes_by_group=(),               # e.g. (0, 1): the rows of each label-source group
                                      #   through the model in a pass of their own, in
                                      #   that order (GLC's silver, then gold rows)
    index='',                         # population: '' = the whole split, or
                                      #   'artifact:<stage>/<name>' / 'subset(indices=...)' /
                                      #   'per_class(num_per_class=20)'
    sampler='shuffle',                # how an epoch draws from it: shuffle,
                                      #   class_balanced, weighted(weights=...), sequential
    labels='dataset',                 # label source: dataset, unlabeled, 'artifact:<stage>/<name>'
    through_model=True,               # part of the module's forward pass

A stream of a dataset whose labels are not the task's classes (another label
space, or no labels) carries ``label = -1`` unless a label source says
otherwise.

The three data hooks are registries, so a method adds its own with one
decorated function:

* :data:`INDEX` -- ``fn(data: StreamData, **options) -> int64[N']`` dataset
  indices (repeats allowed), the stream's population.
* :data:`SAMPLERS` -- ``fn(data, population, **options) -> epoch_fn`` where
  ``epoch_fn(epoch) -> int64[L]`` lists the dataset indices of one epoch, the
  same length ``L`` every epoch, deterministic in ``(seed, epoch)``.
* :data:`LABELS` -- ``fn(data, **options) -> label_fn`` where
  ``label_fn(indices, dataset_labels) -> {field: array}`` gives ``label``
  (int32) and optionally ``soft_label`` (float32 ``[b, K]``), ``weight``
  (float32) and ``group`` (int32) for a batch.

**Global order.** A stream is one deterministic sequence of dataset indices
(epoch after epoch); global batch ``s`` is its positions ``[s·B, (s+1)·B)`` and
process ``p`` of ``P`` reads the slice ``[s·B + p·B/P, s·B + (p+1)·B/P)``. The
global batch is therefore the same for any number of processes. Every record
carries its dataset ``index``. The position is grain iterator state, saved in
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping

import grain
import numpy as np

from jaxrobust import artifacts as artifacts_lib
from jaxrobust.data import pipeline
from jaxrobust.registry import Registry, RegistryError

#: Index lists (a stream's ``index``: its population).
INDEX = Registry("index list")
#: Samplers (a stream's ``sampler``).
SAMPLERS = Registry("sampler")
#: Label sources (a stream's ``labels``).
LABELS = Registry("label source")

#: The type of what a sampler returns, ``epoch -> indices`` of that epoch.
EpochFn = Callable[[int], np.ndarray]
#: The type of what a label source returns, ``(indices, labels) -> {field: array}``.
LabelFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
LABEL_FIELDS = ("label", "soft_label", "weight", "group")
STREAM_KEYS = ("data", "split", "batch_size", "pp", "views", "perturb", "perturb_stats",
               "passes_by_group", "index", "sampler", "labels", "through_model")
PERTURB_STATS = ("update", "discard")


def stream_defaults() -> dict[str, Any]:
  """Every key a stream spec may set, with its default."""
  return {"data": "", "split": "train", "batch_size": 128, "pp": "", "views": 1, "perturb": "",
          "perturb_stats": "update", "passes_by_group": (), "index": "", "sampler": "shuffle",
          "labels": "dataset", "through_model": True}


# --- stream data -----------------------------------------------------------------

@dataclasses.dataclass
class StreamData:
  """What index lists, samplers and label sources see of a stream.

  Attributes:
    name: the stream's name (``train``, ``outliers``, ...).
    source: random-access records of the stream's split.
    num_classes: K of the task (None for a stream of unlabelled data).
    seed: the stream's seed (derived from ``config.seed`` and the name).
    artifacts: resolves ``artifact:`` references.
    where: the config key of the stream, for messages.
    population: the stream's dataset indices (its ``index`` spec), set once
      they are built -- what samplers and label sources draw from.
  """
  name: str
  source: Any
  num_classes: int | None
  seed: int
  artifacts: artifacts_lib.Artifacts
  where: str
  population: np.ndarray | None = None

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @functools.cached_property
  def labels(self) -> np.ndarray:
    return pipeline.all_labels(self.source)

  def array(self, value: Any, key: str, *, dtype: Any = None) -> np.ndarray:
    """A literal list or an ``artifact:`` reference, as an array."""
    return self.artifacts.load_array(value, f"{self.where}.{key}", dtype=dtype)


# --- index lists ----------------------------------------------------------------

@INDEX.register("all")
def all_examples(data: StreamData) -> np.ndarray:
  """Every example of the split, in order."""
  return np.arange(data.num_examples, dtype=np.int64)


@INDEX.register("subset")
def subset(data: StreamData, indices: Any) -> np.ndarray:
  """The given dataset indices (a list or ``'artifact:<stage>/<name>'``);
  repeats are kept (an index listed twice is drawn twice as often)."""
  idx = data.array(indices, "index", dtype=np.int64).reshape(-1)
  if idx.size == 0:
    raise RegistryError(f"{data.where}.index: the index list is empty.")
  if idx.min() < 0 or idx.max() >= data.num_examples:
    raise RegistryError(
        f"{data.where}.index: indices must be in [0, {data.num_examples}) (the size of "
        f"the split); found {int(idx.min())}..{int(idx.max())}.")
  return idx


@INDEX.register("per_class")
def per_class(data: StreamData, num_per_class: int, seed: int | None = None) -> np.ndarray:
  """A class-balanced labelled subset: ``num_per_class`` examples of every
  class drawn uniformly without replacement, sorted -- the "small labelled
  fraction" of transfer and semi-supervised experiments. ``seed`` defaults to
  the stream's (derived from ``config.seed``), so every stage of a recipe
  named ``train`` draws the same subset. A class with fewer examples keeps
  them all."""
  if isinstance(num_per_class, bool) or int(num_per_class) != num_per_class or num_per_class < 1:
    raise RegistryError(f"{data.where}.index: per_class needs num_per_class >= 1, got "
                        f"{num_per_class!r}.")
  if data.num_classes is None:
    raise RegistryError(f"{data.where}.index: per_class needs a labelled stream.")
  rng = np.random.default_rng(data.seed if seed is None else seed)
  keep = [rng.permutation(np.flatnonzero(data.labels == c))[:int(num_per_class)]
          for c in range(data.num_classes)]
  return np.sort(np.concatenate(keep)).astype(np.int64)


def build_index(spec: Any, data: StreamData) -> np.ndarray:
  """'' (all), a list of indices, ``'artifact:...'``, or an :data:`INDEX` spec."""
  if spec is None or (isinstance(spec, str) and not spec):
    return all_examples(data)
  if artifacts_lib.is_ref(spec) or isinstance(spec, (list, tuple, np.ndarray)):
    return subset(data, spec)
  return INDEX.build(spec, where=f"{data.where}.index", runtime=("data",))(data)


# --- samplers -------------------------------------------------------------------

def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(epoch)])


@SAMPLERS.register("shuffle")
def shuffle(data: StreamData, population: np.ndarray) -> EpochFn:
  """A new uniformly random permutation of the population every epoch."""
  return lambda epoch: population[epoch_rng(data.seed, epoch).permutation(len(population))]


@SAMPLERS.register("sequential")
def sequential(data: StreamData, population: np.ndarray) -> EpochFn:
  """The population in order, every epoch (no randomness)."""
  del data
  return lambda epoch: population


def _weighted(data: StreamData, population: np.ndarray, weights: np.ndarray,
              num_per_epoch: int) -> EpochFn:
  p = weights / weights.sum()
  n = num_per_epoch or len(population)
  return lambda epoch: population[epoch_rng(data.seed, epoch).choice(len(population), n, p=p)]


@SAMPLERS.register("class_balanced")
def class_balanced(data: StreamData, population: np.ndarray, num_per_epoch: int = 0) -> EpochFn:
  """Every class equally likely: each draw picks an example of the population
  with probability ∝ 1 / (its class's count in the population), with
  replacement (PyTorch's ``WeightedRandomSampler`` with inverse class
  frequencies). An epoch has ``num_per_epoch`` draws (default: the population
  size)."""
  labels = data.labels[population]
  if labels.min() < 0:
    raise RegistryError(f"{data.where}.sampler: class_balanced needs class labels; the "
                        "stream's data has unlabelled examples.")
  counts = np.bincount(labels)
  return _weighted(data, population, 1.0 / counts[labels], num_per_epoch)


@SAMPLERS.register("group_balanced")
def group_balanced(data: StreamData, population: np.ndarray, num_per_epoch: int = 0) -> EpochFn:
  """Every group equally likely: each draw picks an example of the
  population with probability ∝ 1 / (its group's count in the population),
  with replacement -- the group-balanced ("upweighted" / "upsampled")
  sampling of Sagawa et al. (2020) and Kirichenko et al. (2023). Needs a
  dataset with group annotations (``DatasetSpec.num_groups``); an epoch has
  ``num_per_epoch`` draws (default: the population size)."""
  try:
    groups = pipeline.all_groups(data.source, what=f"{data.where}: the stream's split")
  except ValueError as e:
    raise RegistryError(f"{data.where}.sampler: group_balanced: {e}") from None
  groups = groups[population]
  if groups.min() < 0:
    raise RegistryError(f"{data.where}.sampler: group_balanced needs a group for every "
                        "example; the stream's data has examples without one.")
  counts = np.bincount(groups)
  return _weighted(data, population, 1.0 / counts[groups], num_per_epoch)


@SAMPLERS.register("weighted")
def weighted(data: StreamData, population: np.ndarray, weights: Any,
             num_per_epoch: int = 0) -> EpochFn:
  """Draws with replacement with probability ∝ ``weights``: one weight per
  dataset example (``[N]``, indexed by dataset index) or per class (``[K]``),
  a list or an ``artifact:`` reference (importance resampling)."""
  w = data.array(weights, "sampler", dtype=np.float64).reshape(-1)
  if data.num_classes is not None and len(w) == data.num_classes != data.num_examples:
    w = w[data.labels[population]]
  elif len(w) == data.num_examples:
    w = w[population]
  else:
    raise RegistryError(
        f"{data.where}.sampler: weighted needs one weight per example ({data.num_examples}) "
        f"or per class ({data.num_classes}); got {len(w)}.")
  if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
    raise RegistryError(f"{data.where}.sampler: weights must be finite, >= 0 and not all 0.")
  return _weighted(data, population, w, num_per_epoch)


# --- label sources --------------------------------------------------------------

@LABELS.register("dataset")
def dataset_labels(data: StreamData) -> LabelFn:
  """The dataset's own labels."""
  del data
  return lambda idx, labels: {"label": labels}


@LABELS.register("unlabeled")
def unlabeled(data: StreamData) -> LabelFn:
  """No class labels (-1): outlier and unlabelled streams, and streams whose
  dataset has another label space than the task's."""
  del data
  return lambda idx, labels: {"label": np.full(len(idx), -1, np.int32)}


@LABELS.register("artifact")
def artifact_labels(data: StreamData, ref: str) -> LabelFn:
  """Labels from an artifact indexed by dataset index: ``int[N]`` class ids
  (hard; -1 = none) or ``float[N, K]`` rows that sum to 1 (soft; ``label`` is
  then their argmax). ``N`` must be the size of the stream's split."""
  where = f"{data.where}.labels"
  arr = data.array(ref, "labels")
  n, k = data.num_examples, data.num_classes
  if arr.shape[0] != n:
    raise RegistryError(f"{where}: {ref!r} has labels for {arr.shape[0]} examples; the "
                        f"stream's data ({data.source!r}) has {n}.")
  if arr.ndim == 1:
    if not np.issubdtype(arr.dtype, np.integer):
      raise RegistryError(f"{where}: {ref!r} holds {arr.dtype} values; hard labels are ints.")
    hard = arr.astype(np.int32)
    if k is not None and hard.max(initial=-1) >= k:
      raise RegistryError(f"{where}: {ref!r} has class ids up to {int(hard.max())}; the task "
                          f"has {k} classes.")
    return lambda idx, labels: {"label": hard[idx]}
  if arr.ndim != 2 or (k is not None and arr.shape[1] != k):
    raise RegistryError(f"{where}: {ref!r} has shape {arr.shape}; soft labels are [{n}, {k}].")
  soft = arr.astype(np.float32)
  if np.any(soft < 0) or not np.allclose(soft.sum(1), 1.0, atol=1e-3):
    raise RegistryError(f"{where}: {ref!r}: soft label rows must be >= 0 and sum to 1.")
  hard = soft.argmax(1).astype(np.int32)
  return lambda idx, labels: {"label": hard[idx], "soft_label": soft[idx]}


def build_labels(spec: str, data: StreamData) -> LabelFn:
  if artifacts_lib.is_ref(spec):
    return artifact_labels(data, spec)
  return LABELS.build(spec or "dataset", where=f"{data.where}.labels", runtime=("data",))(data)


# --- the stream -----------------------------------------------------------------

class Stream:
  """One infinite, deterministic training stream (this process's slices).

  Args:
    data: the stream's data (:class:`StreamData`).
    global_batch_size: examples per step over all processes.
    epoch_fn: the sampler's ``epoch -> dataset indices``.
    label_fn: the label source.
  """

  def __init__(self, data: StreamData, *, global_batch_size: int, epoch_fn: EpochFn,
               label_fn: LabelFn):
    self.data = data
    self.name = data.name
    self.global_batch_size = global_batch_size
    self._epoch_fn = epoch_fn
    self._label_fn = label_fn
    self.check_batches = False  # set when labels could not be checked up front
    self._cache: dict[int, np.ndarray] = {}
    first = self.epoch(0)
    self.examples_per_epoch = len(first)
    if self.examples_per_epoch < 1:
      raise RegistryError(f"{data.where}: the sampler gives an empty epoch.")
    if global_batch_size > self.examples_per_epoch:
      raise ValueError(f"{data.where}.batch_size={global_batch_size} is larger than the "
                       f"{self.examples_per_epoch} examples of an epoch; lower it.")
    self.local = pipeline.local_batch_size(global_batch_size, f"{data.where}.batch_size")
    self._load(0)  # a bad label source fails now, not in the first step
    ds = grain.MapDataset.range(0, 2**50).map(self._load)
    self._iter = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

  def epoch(self, e: int) -> np.ndarray:
    if e not in self._cache:
      idx = np.asarray(self._epoch_fn(e), np.int64)
      if e and len(idx) != self.examples_per_epoch:
        raise RegistryError(f"{self.data.where}.sampler: epoch {e} has {len(idx)} examples, "
                            f"epoch 0 had {self.examples_per_epoch}; it must not change.")
      if len(self._cache) > 2:
        self._cache.pop(min(self._cache))
      self._cache[e] = idx
    return self._cache[e]

  def positions(self, step: int) -> np.ndarray:
    """Dataset indices of this process's slice of global batch ``step``."""
    p, _ = pipeline.process_shard()
    start = step * self.global_batch_size + p * self.local
    pos = np.arange(start, start + self.local)
    epochs, offsets = np.divmod(pos, self.examples_per_epoch)
    out = np.empty(self.local, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.epoch(int(e))[offsets[sel]]
    return out

  def _load(self, step: int) -> dict[str, np.ndarray]:
    idx = self.positions(int(step))
    batch = pipeline.read(self.data.source, idx)
    fields = self._label_fn(idx, batch["label"])
    unknown = set(fields) - set(LABEL_FIELDS)
    if unknown:
      raise RegistryError(f"{self.data.where}.labels: the label source gives unknown fields "
                          f"{sorted(unknown)}; allowed: {LABEL_FIELDS}.")
    batch.update({k: np.asarray(v) for k, v in fields.items()})
    batch["label"] = batch["label"].astype(np.int32)
    batch["index"] = idx.astype(np.int32)
    batch["mask"] = np.ones(self.local, dtype=bool)
    return batch

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iter)
    if self.check_batches:
      pipeline.check_labels(batch["label"], self.data.num_classes, f"stream {self.name!r}")
    return batch

  @property
  def iterator(self) -> Any:
    """The grain iterator (its state goes into checkpoints)."""
    return self._iter


def build_stream(name: str, spec: Mapping[str, Any], source: Any, *, num_classes: int | None,
                 seed: int, artifacts: artifacts_lib.Artifacts) -> Stream:
  """A :class:`Stream` from its config spec; every hook is resolved and its
  options checked now, before any compilation."""
  where = f"config.streams.{name}"
  data = StreamData(name, source, num_classes, seed, artifacts, where)
  population = build_index(spec.get("index", ""), data)
  data.population = population
  sampler = SAMPLERS.build(spec.get("sampler") or "shuffle", where=f"{where}.sampler",
                           runtime=("data", "population"))
  label_fn = build_labels(spec.get("labels", "dataset"), data)
  own_labels = spec.get("labels", "dataset") in ("", "dataset")
  in_memory = isinstance(source, pipeline.InMemorySource)
  if num_classes is not None and own_labels and in_memory:
    pipeline.check_labels(data.labels[population], num_classes, f"stream {name!r}")
  stream = Stream(data, global_batch_size=int(spec["batch_size"]),
                  epoch_fn=sampler(data, population), label_fn=label_fn)
  stream.check_batches = num_classes is not None and own_labels and not in_memory
  return stream


class TrainInput:
  """All training streams zipped: ``next()`` -> {stream: batch}."""

  def __init__(self, streams: Mapping[str, Stream]):
    self.streams = dict(streams)

  def __iter__(self) -> Iterator[dict[str, dict[str, np.ndarray]]]:
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    return {name: next(s) for name, s in self.streams.items()}

  def checkpoint_args(self) -> dict[str, Any]:
    return {f"data_{n}": grain.checkpoint.CheckpointSave(s.iterator)
            for n, s in self.streams.items()}

  def restore_args(self) -> dict[str, Any]:
    return {f"data_{n}": grain.checkpoint.CheckpointRestore(s.iterator)
            for n, s in self.streams.items()}

  def seek(self, step: int) -> None:
    """Every stream to the position after ``step`` steps. Element ``k`` of a
    stream's iterator is global batch ``k`` (this process's slice), so the
    position is the step whatever the number of processes: a checkpoint
    saved by another number of processes resumes with this."""
    for s in self.streams.values():
      state = s.iterator.get_state()
      state["next_index"] = int(step)
      s.iterator.set_state(state)


def steps_per_epoch(stream: Stream) -> float:
  return stream.examples_per_epoch / stream.global_batch_size


def num_steps(config_num_steps: int, num_epochs: float, stream: Stream) -> int:
  if config_num_steps > 0:
    return int(config_num_steps)
  return max(1, math.ceil(num_epochs * steps_per_epoch(stream)))
