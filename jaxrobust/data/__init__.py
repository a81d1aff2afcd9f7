"""Datasets for jaxrobust: TF-free tfds sources and the embedded offline datasets.

* `sources`: ``get_source(name, split)``, ``get_spec(name)`` and
  ``sources.prepare(name)`` for the embedded datasets (`EMBEDDED`, generated
  offline and prepared on first use) and any tfds dataset prepared as
  array_record. (``jaxrobust.data.prepare`` is the command-line module
  ``python -m jaxrobust.data.prepare NAME``, hence not re-exported here.)
* `builders`: the embedded tfds builders (registered with tfds on import).
* `pipeline`: reading splits (RAM cache, padded eval batches with indices).
* `streams`: training streams as specs (samplers, index lists, label sources;
  grain, resumable).
* `pp`: pixel-space augmentation ops, chained per stream, run in the step.
"""

from jaxrobust.data.sources import (
    EMBEDDED, UNLABELED, DatasetSpec, RecordSource, default_data_dir, get_source, get_spec)

__all__ = [
    "EMBEDDED", "UNLABELED", "DatasetSpec", "RecordSource", "default_data_dir", "get_source",
    "get_spec",
]
