"""Tests of jaxrobust.data.sources and the prepare CLI."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxrobust.data
from jaxrobust.data import prepare as prepare_cli
from jaxrobust.data import sources
from jaxrobust.data.builders import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


def _check_record(rec, shape, num_classes):
  assert set(rec) == {"image", "label"}
  assert rec["image"].dtype == np.uint8 and rec["image"].shape == shape
  assert isinstance(rec["label"], np.int64)
  if num_classes is None:
    assert rec["label"] == sources.UNLABELED
  else:
    assert 0 <= rec["label"] < num_classes


def test_embedded_names_are_registered_and_do_not_collide_with_tfds():
  catalog = tfds.list_builders(with_community_datasets=False)
  assert jaxrobust.data.EMBEDDED == (
      "digits", "glyphs", "gaussian_noise", "rademacher_noise", "blobs", "uniform_noise",
      "photo_patches", "spurious_glyphs")
  for name in sources.EMBEDDED:
    assert catalog.count(name) == 1, name
    assert tfds.builder_cls(name).__module__.startswith("jaxrobust.data.builders."), name


def test_digits_source_records_and_spec(data_dir):
  spec = sources.get_spec("digits", data_dir=data_dir)
  assert spec == sources.DatasetSpec(
      name="digits", num_classes=10, image_shape=(32, 32, 1), splits=digits.SPLIT_SIZES,
      has_labels=True)
  src = sources.get_source("digits", "train", data_dir=data_dir)
  assert len(src) == spec.splits["train"] == 1257
  _check_record(src[0], (32, 32, 1), 10)
  batch = src.__getitems__([0, 5, 1256])
  for rec, i in zip(batch, [0, 5, 1256]):
    np.testing.assert_array_equal(rec["image"], src[i]["image"])
    assert rec["label"] == src[i]["label"]
  # Picklable (grain worker processes receive the source by pickle).
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[7]["image"], src[7]["image"])


def test_split_syntax(data_dir):
  assert len(sources.get_source("digits", "train[:10]", data_dir=data_dir)) == 10
  assert len(sources.get_source("digits", "train+validation", data_dir=data_dir)) == 1437


def test_ood_source_is_unlabelled(data_dir):
  spec = sources.get_spec("uniform_noise/gray", data_dir=data_dir)
  assert (spec.num_classes, spec.has_labels, spec.image_shape) == (None, False, (32, 32, 1))
  src = sources.get_source("uniform_noise/gray", "validation", data_dir=data_dir)
  assert len(src) == 2000
  for rec in src.__getitems__([0, 1999]):
    _check_record(rec, (32, 32, 1), None)


def test_get_spec_prepares_nothing(tmp_path):
  spec = sources.get_spec("glyphs", data_dir=str(tmp_path))
  assert spec.num_classes == 62 and spec.image_shape == (32, 32, 1)
  assert spec.splits == {"train": 24_800, "validation": 3_100, "test": 6_200}
  assert sources.get_spec("glyphs/small:1.0.0", data_dir=str(tmp_path)).splits["train"] == 1860
  assert not (tmp_path / "glyphs").exists()


def test_unknown_name_suggests_close_matches(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown dataset 'digitz' \(did you mean 'digits'") as e:
    sources.get_source("digitz", "train", data_dir=str(tmp_path))
  assert "glyphs" in str(e.value) and "photo_patches" in str(e.value)
  with pytest.raises(ValueError, match="did you mean .*'cifar10'"):
    sources.get_spec("cifar_10", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="glyphs has configs: full, lower, small, upper"):
    sources.get_spec("glyphs/tiny", data_dir=str(tmp_path))
  with pytest.raises(TypeError, match="non-empty string"):
    sources.get_spec("", data_dir=str(tmp_path))


def test_unknown_split_lists_splits_and_builds_nothing(tmp_path):
  with pytest.raises(ValueError, match="Unknown split 'tran'.*train, validation, test"):
    sources.get_source("glyphs", "tran", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown split 'train'.*test, validation"):
    sources.get_source("blobs/gray", "train", data_dir=str(tmp_path))
  assert not (tmp_path / "glyphs").exists() and not (tmp_path / "blobs").exists()


def test_unprepared_catalog_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match="not prepared") as e:
    sources.get_source("cifar10", "train", data_dir=str(tmp_path))
  msg = str(e.value)
  assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in msg
  assert "python -m jaxrobust.data.prepare cifar10" in msg and "jaxrobust[tf]" in msg
  # The spec of a catalog dataset is known without its data.
  spec = sources.get_spec("cifar10", data_dir=str(tmp_path))
  assert (spec.num_classes, spec.image_shape, spec.splits) == (10, (32, 32, 3), {})


@pytest.mark.parametrize("name, num_classes, shape", [
    ("imagenet2012", 1000, (None, None, 3)),  # variable size: the pipeline resizes
    ("smallnorb", 5, (96, 96, 1)),  # KEY_OVERRIDES: label_category of five ClassLabels
    ("lsun/classroom", None, (None, None, 3)),  # no ClassLabel: unlabelled
])
def test_catalog_feature_keys(name, num_classes, shape, tmp_path):
  spec = sources.get_spec(name, data_dir=str(tmp_path))
  assert (spec.num_classes, spec.image_shape, spec.has_labels) == (
      num_classes, shape, num_classes is not None)


def test_tfrecord_only_dataset_points_to_tf_extra(tmp_path, monkeypatch):
  # An unprepared builder's info reports tfrecord, as a tfrecord-only dataset would.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  with pytest.raises(ValueError, match="as tfrecord only") as e:
    sources.get_source("cifar10", "test", data_dir=str(tmp_path))
  assert "convert_format" in str(e.value) and "jaxrobust[tf]" in str(e.value)


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("svhn_cropped", 10)])
def test_catalog_dataset_through_mock_data(name, num_classes, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    spec = sources.get_spec(name, data_dir=str(tmp_path))
    assert (spec.num_classes, spec.image_shape, spec.has_labels) == (num_classes, (32, 32, 3), True)
    src = sources.get_source(name, "train", data_dir=str(tmp_path))
    assert len(src) == 6
    for i in range(6):  # extra features (cifar10's string 'id') are dropped
      _check_record(src[i], (32, 32, 3), num_classes)
    for rec in src.__getitems__([0, 5]):
      _check_record(rec, (32, 32, 3), num_classes)


def test_default_data_dir_follows_tfds(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert sources.default_data_dir() == str(tmp_path)
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert sources.default_data_dir() == os.path.expanduser("~/tensorflow_datasets")


def test_cli(data_dir, capsys):
  assert prepare_cli.main(["digits", "--data_dir", data_dir]) == 0
  assert os.path.join(data_dir, "digits", "1.0.0") in capsys.readouterr().out
  assert prepare_cli.main(["no_such_dataset", "--data_dir", data_dir]) == 1
  assert "Unknown dataset 'no_such_dataset'" in capsys.readouterr().err


_RACER = textwrap.dedent("""
    import os, sys, time
    from jaxrobust.data import sources
    data_dir, me, other = sys.argv[1:]
    open(os.path.join(data_dir, me), "w").close()
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(data_dir, other)):  # start together
      assert time.time() < deadline, "the other process never started"
      time.sleep(0.005)
    _, built = sources._prepare_embedded("digits", data_dir)
    print("BUILT" if built else "REUSED")
""")


def test_concurrent_prepare_is_serialised_by_the_file_lock(tmp_path, data_dir):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), me, other],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for me, other in [("a.ready", "b.ready"), ("b.ready", "a.ready")]]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  assert sorted(out.strip().splitlines()[-1] for out, _ in outs) == ["BUILT", "REUSED"]
  assert not list(tmp_path.glob(".jaxrobust-*.lock"))  # the lock file is cleaned up
  # The data is complete and identical to a build made alone.
  for split, size in digits.SPLIT_SIZES.items():
    raced = sources.get_source("digits", split, data_dir=str(tmp_path))
    alone = sources.get_source("digits", split, data_dir=data_dir)
    assert len(raced) == size
    idx = list(range(size))
    for a, b in zip(raced.__getitems__(idx), alone.__getitems__(idx)):
      np.testing.assert_array_equal(a["image"], b["image"])
      assert a["label"] == b["label"]
