"""Training streams: deterministic global order, per-process slices,
resumable position, samplers, index lists and label sources (incl. artifacts)."""

from unittest import mock

import numpy as np
import pytest

from jaxrobust import artifacts as artifacts_lib
from jaxrobust.data import pipeline, streams
from jaxrobust.registry import RegistryError


def _source(n=50, num_classes=5):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  return pipeline.InMemorySource(images, (np.arange(n) % num_classes).astype(np.int32))


def _ids(batch):
  return batch["image"][:, 0, 0, 0].astype(int).tolist()


def _stream(n=50, batch=8, seed=0, num_classes=5, artifacts=None, **spec):
  spec = {**streams.stream_defaults(), "batch_size": batch, **spec}
  return streams.build_stream("train", spec, _source(n, 5), num_classes=num_classes, seed=seed,
                              artifacts=artifacts or artifacts_lib.Artifacts())


def test_epochs_are_permutations_and_reshuffled():
  s = _stream(40, batch=10, seed=3)
  epoch1 = sum((_ids(next(s)) for _ in range(4)), [])
  epoch2 = sum((_ids(next(s)) for _ in range(4)), [])
  assert sorted(epoch1) == list(range(40)) and sorted(epoch2) == list(range(40))
  assert epoch1 != epoch2


def test_records_carry_their_dataset_index_and_mask():
  b = next(_stream())
  np.testing.assert_array_equal(b["index"], _ids(b))
  assert b["mask"].all() and b["label"].dtype == np.int32


def test_same_seed_same_order_other_seed_other_order():
  first = [_ids(next(s)) for s in [_stream(seed=0)] for _ in range(7)]
  again = [_ids(next(s)) for s in [_stream(seed=0)] for _ in range(7)]
  other = [_ids(next(s)) for s in [_stream(seed=1)] for _ in range(7)]
  assert first == again and first != other


def test_iterator_state_resumes_exactly_across_an_epoch_boundary():
  a = _stream()
  for _ in range(9):  # 50 / 8: batch 6 straddles epochs 0 and 1
    next(a)
  state = a.iterator.get_state()
  expected = [_ids(next(a)) for _ in range(5)]
  b = _stream()
  b.iterator.set_state(state)
  assert [_ids(next(b)) for _ in range(5)] == expected


@pytest.mark.parametrize("count", [2, 4])
def test_global_batch_is_the_same_for_any_number_of_processes(count):
  """Process p reads slice p of each global batch: concatenating the slices
  gives exactly the single-process global batch."""
  single = [_ids(next(s)) for s in [_stream(batch=8)] for _ in range(9)]
  per_process = []
  for p in range(count):
    with mock.patch.object(pipeline, "process_shard", return_value=(p, count)):
      s = _stream(batch=8)
      per_process.append([_ids(next(s)) for _ in range(9)])
  joined = [sum((per_process[p][i] for p in range(count)), []) for i in range(9)]
  assert joined == single


def test_batch_not_divisible_by_processes_is_an_error():
  with mock.patch.object(pipeline, "process_shard", return_value=(0, 3)):
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by the 3 processes"):
      _stream(batch=8)


def test_labels_out_of_range_are_an_error():
  with pytest.raises(ValueError, match=r"labels outside \[0, 3\): found \[3, 4\]"):
    _stream(num_classes=3)


def test_class_balanced_sampler_balances_an_imbalanced_population(tmp_path):
  # Population: 40 examples of class 0, 2 of each other class.
  labels = np.arange(50) % 5
  idx = np.concatenate([np.flatnonzero(labels == 0)[:10].repeat(4),
                        *[np.flatnonzero(labels == c)[:2] for c in range(1, 5)]])
  s = _stream(batch=10, index=list(map(int, idx)), sampler="class_balanced")
  drawn = np.concatenate([next(s)["label"] for _ in range(200)])
  freq = np.bincount(drawn, minlength=5) / len(drawn)
  np.testing.assert_allclose(freq, 0.2, atol=0.03)
  plain = _stream(batch=10, index=list(map(int, idx)))
  drawn = np.concatenate([next(plain)["label"] for _ in range(48)])
  assert np.bincount(drawn, minlength=5)[0] / len(drawn) > 0.7


def test_subset_index_from_an_artifact_with_repeats(tmp_path):
  arts = artifacts_lib.Artifacts(str(tmp_path), ["pick", "train"], "pick")
  arts.save("idx", {"indices": np.array([3, 3, 7, 11])})
  arts = artifacts_lib.Artifacts(str(tmp_path), ["pick", "train"], "train")
  s = _stream(batch=4, index="artifact:pick/idx", artifacts=arts)
  epoch = sorted(_ids(next(s)))
  assert epoch == [3, 3, 7, 11]
  s = _stream(batch=4, index="subset(indices=(1, 2, 3, 4))")
  assert sorted(_ids(next(s))) == [1, 2, 3, 4]
  with pytest.raises(RegistryError, match=r"indices must be in \[0, 50\)"):
    _stream(batch=4, index="subset(indices=(1, 50))")


def test_weighted_sampler_follows_class_weights():
  s = _stream(batch=10, sampler="weighted(weights=(1, 0, 0, 0, 3))")
  drawn = np.concatenate([next(s)["label"] for _ in range(100)])
  assert set(np.unique(drawn)) == {0, 4}
  np.testing.assert_allclose(np.mean(drawn == 4), 0.75, atol=0.05)


def test_sequential_sampler_is_in_order():
  s = _stream(10, batch=5, sampler="sequential")
  assert [_ids(next(s)) for _ in range(3)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


def _label_artifacts(tmp_path, value):
  arts = artifacts_lib.Artifacts(str(tmp_path), ["teacher", "student"], "teacher")
  arts.save("labels", {"labels": value})
  return artifacts_lib.Artifacts(str(tmp_path), ["teacher", "student"], "student")


def test_hard_labels_from_an_artifact(tmp_path):
  relabel = (np.arange(50) * 3 % 5).astype(np.int64)
  s = _stream(labels="artifact:teacher/labels", artifacts=_label_artifacts(tmp_path, relabel))
  b = next(s)
  np.testing.assert_array_equal(b["label"], relabel[b["index"]])
  assert "soft_label" not in b


def test_soft_labels_from_an_artifact(tmp_path):
  rng = np.random.default_rng(0)
  soft = rng.dirichlet(np.ones(5), size=50).astype(np.float32)
  s = _stream(labels="artifact:teacher/labels", artifacts=_label_artifacts(tmp_path, soft))
  b = next(s)
  np.testing.assert_allclose(b["soft_label"], soft[b["index"]])
  np.testing.assert_array_equal(b["label"], soft[b["index"]].argmax(1))


@pytest.mark.parametrize("value, match", [
    (np.zeros(49, np.int64), "labels for 49 examples; the stream's data"),
    (np.full((50, 4), 0.25, np.float32), r"shape \(50, 4\); soft labels are \[50, 5\]"),
    (np.full(50, 7, np.int64), "class ids up to 7; the task has 5 classes"),
])
def test_label_artifact_that_does_not_fit_is_named(tmp_path, value, match):
  with pytest.raises(RegistryError, match=match):
    _stream(labels="artifact:teacher/labels", artifacts=_label_artifacts(tmp_path, value))


def test_unknown_hooks_are_named_with_suggestions():
  with pytest.raises(RegistryError, match=r"config.streams.train.sampler: unknown sampler "
                                          r"'clas_balanced' \(did you mean 'class_balanced'"):
    _stream(sampler="clas_balanced")
  with pytest.raises(RegistryError, match="unknown label source"):
    _stream(labels="corupted(strength=0.2)")
  with pytest.raises(RegistryError, match="unknown option"):
    _stream(sampler="class_balanced(per_epoch=3)")
  with pytest.raises(artifacts_lib.ArtifactError, match="no stages"):
    _stream(labels="artifact:teacher/labels")
