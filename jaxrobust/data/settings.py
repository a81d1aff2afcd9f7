"""The data settings of a run: how its splits are read.

Evaluators, the fits of OOD scores and stage tasks read datasets through a
:class:`DataSettings` (built once from ``config.data``), never through the
whole config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrobust.data import pipeline
from jaxrobust.data import sources


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """What evaluators, scores' fits and stage tasks read of ``config.data``
  (and the run's seed), instead of the whole config.

  Attributes:
    name: the task's dataset (``config.data.name``).
    data_dir: where splits are read from (``config.data.data_dir``).
    cache: how splits are cached (``config.data.cache``).
    image_size: the size images are resized to (``config.data.image_size``).
    train_split: the split of the main training stream (fits over training
      data use it).
    seed: the run's seed (seeded OOD draws).
  """
  name: str
  data_dir: str | None = None
  cache: str = "auto"
  image_size: int = 0
  train_split: str = "train"
  seed: int = 0
  _specs: dict[str, sources.DatasetSpec] = dataclasses.field(
      default_factory=dict, compare=False, hash=False, repr=False)

  @classmethod
  def from_config(cls, config: Any) -> "DataSettings":
    return cls(name=config.data.name, data_dir=config.data.data_dir, cache=config.data.cache,
               image_size=int(config.data.image_size), train_split=config.streams.train.split,
               seed=int(config.seed))

  def spec(self, name: str | None = None) -> sources.DatasetSpec:
    """A dataset's spec (default: the task's), read once per settings."""
    name = name or self.name
    if name not in self._specs:
      self._specs[name] = sources.get_spec(name, data_dir=self.data_dir)
    return self._specs[name]

  def image_shape(self, name: str | None = None) -> tuple[int, int, int]:
    """The shape a dataset's images have once read (after ``image_size``)."""
    return pipeline.image_shape(self.spec(name), self.image_size)

  def load(self, name: str, split: str) -> Any:
    """A split as a random-access source (cached in RAM when small)."""
    return pipeline.load_split(name, split, data_dir=self.data_dir, cache=self.cache,
                               image_size=self.image_size)
