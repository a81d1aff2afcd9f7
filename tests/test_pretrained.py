"""Fine-tuning initialisation: copy the trunk, fresh head on class-count change,
clear errors on anything else."""

import numpy as np
import pytest

from jaxrobust.checkpoint import CheckpointMismatchError
from jaxrobust.pretrained import merge_pretrained


def _params(k, d=4, fill=0.0):
  return {"conv": {"kernel": np.full((3, 3, 1, d), fill, np.float32)},
          "head": {"kernel": np.full((d, k), fill, np.float32), "bias": np.full((k,), fill, np.float32)}}


def _stats(d=4, fill=0.0):
  return {"bn": {"mean": np.full((d,), fill, np.float32), "var": np.full((d,), 1 + fill, np.float32)}}


def test_new_head_when_classes_differ():
  params, stats, reset = merge_pretrained(_params(10), _stats(), _params(62, fill=1.0), _stats(fill=2.0))
  np.testing.assert_array_equal(params["conv"]["kernel"], 1.0)
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)  # fresh init kept
  np.testing.assert_array_equal(stats["bn"]["mean"], 2.0)
  assert sorted(reset) == ["head/bias", "head/kernel"]


def test_same_classes_copies_head_unless_always():
  params, _, reset = merge_pretrained(_params(10), _stats(), _params(10, fill=1.0), _stats())
  np.testing.assert_array_equal(params["head"]["kernel"], 1.0)
  assert not reset
  params, _, reset = merge_pretrained(_params(10), _stats(), _params(10, fill=1.0), _stats(),
                                      reset_head="always")
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
  assert reset


def test_trunk_mismatch_is_named():
  with pytest.raises(CheckpointMismatchError, match=r"conv/kernel: checkpoint \(3, 3, 1, 8\), model \(3, 3, 1, 4\)"):
    merge_pretrained(_params(10), _stats(), _params(10, d=8), _stats())
  with pytest.raises(CheckpointMismatchError, match="reset_head='never'"):
    merge_pretrained(_params(10), _stats(), _params(62), _stats(), reset_head="never")
  src = _params(10)
  src["extra"] = {"w": np.zeros(3)}
  with pytest.raises(CheckpointMismatchError, match="extra/w: in the checkpoint but not in the model"):
    merge_pretrained(_params(10), _stats(), src, _stats())


def test_batch_stats_optional():
  _, stats, _ = merge_pretrained(_params(10), _stats(), _params(10), _stats(fill=3.0),
                                 load_batch_stats=False)
  np.testing.assert_array_equal(stats["bn"]["mean"], 0.0)


def test_skip_regex_keeps_fresh_values_of_matching_params():
  """e.g. a SimCLR projection head dropped when fine-tuning."""
  src = _params(10, fill=1.0)
  src["proj"] = {"kernel": np.ones((4, 8), np.float32)}
  new = _params(10)
  new["proj"] = {"kernel": np.zeros((4, 8), np.float32)}
  params, _, reset = merge_pretrained(new, _stats(), src, _stats(), skip="proj/.*")
  np.testing.assert_array_equal(params["proj"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["conv"]["kernel"], 1.0)
  assert reset == ["proj/kernel"]
  # A checkpoint head that the model lacks is dropped when skipped.
  del new["proj"]
  params, _, _ = merge_pretrained(new, _stats(), src, _stats(), skip="proj/.*")
  assert "proj" not in params
