"""Reading splits: padded eval batches with exact masks and dataset indices,
per-process shards, global arrays, resizing. (Training streams:
test_streams.py; augmentation: test_pp.py.)"""

from unittest import mock

import jax
import numpy as np

from jaxrobust.data import pipeline


def _source(n=50, num_classes=5):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  return pipeline.InMemorySource(images, (np.arange(n) % num_classes).astype(np.int32))


def _ids(batch):
  return batch["image"][:, 0, 0, 0].astype(int).tolist()


def test_eval_batches_cover_split_once_with_padding_mask_and_index():
  src = _source(23)
  batches = list(pipeline.eval_batches(src, global_batch_size=8))
  assert len(batches) == 3
  assert all(b["image"].shape[0] == 8 for b in batches)
  ids = [i for b in batches for i, m in zip(_ids(b), b["mask"]) if m]
  assert ids == list(range(23))
  index = [int(i) for b in batches for i, m in zip(b["index"], b["mask"]) if m]
  assert index == ids
  assert batches[-1]["mask"].sum() == 7


def test_eval_shards_agree_on_batch_count_and_cover_the_split():
  counts, seen = [], []
  for index in range(3):
    with mock.patch.object(pipeline, "process_shard", return_value=(index, 3)):
      batches = list(pipeline.eval_batches(_source(25), global_batch_size=6))
      counts.append(len(batches))
      seen += [int(i) for b in batches for i, m in zip(b["index"], b["mask"]) if m]
  assert len(set(counts)) == 1
  assert sorted(seen) == list(range(25))


def test_to_global_shards_the_batch_axis():
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = next(pipeline.eval_batches(_source(), global_batch_size=16))
  g = pipeline.to_global(batch, sharding)
  assert g["image"].shape == (16, 4, 4, 1) and g["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(g["label"]), batch["label"])


def test_all_labels_and_label_check():
  src = _source(10, num_classes=5)
  np.testing.assert_array_equal(pipeline.all_labels(src), np.arange(10) % 5)
  import pytest
  with pytest.raises(ValueError, match=r"labels outside \[0, 3\): found \[3, 4\]"):
    pipeline.check_labels(pipeline.all_labels(src), 3, "stream 'train'")


def test_resize_and_center_crop_any_size():
  rng = np.random.default_rng(0)
  for h, w, c in [(40, 60, 3), (32, 32, 1), (20, 50, 1)]:
    image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    out = pipeline.resize_and_center_crop(image, 32)
    assert out.shape == (32, 32, c) and out.dtype == np.uint8
  same = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(pipeline.resize_and_center_crop(same, 32), same)
  # A centered square stays centered: the middle of a bright square is bright.
  square = np.zeros((64, 96, 1), np.uint8)
  square[16:48, 32:64] = 255
  out = pipeline.resize_and_center_crop(square, 32)
  assert out[16, 16, 0] == 255 and out[0, 0, 0] == 0
