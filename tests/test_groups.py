"""Group annotations: the ``group`` field of records, batches and predictions,
the ``spurious_glyphs`` benchmark, CelebA's derived groups (mock data), and the
``groups`` evaluator against a numpy computation."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from jaxrobust import build, sharding
from jaxrobust import evaluators as ev
from jaxrobust import predict as predict_lib
from jaxrobust import train_state as state_lib
from jaxrobust.data import pipeline, sources
from jaxrobust.data.builders import spurious, waterbirds
from jaxrobust.evaluators import groups as groups_ev


def _raw(name, split, data_dir):
  """Every record of a split with all its features (tfds data source)."""
  sources.get_source(name, split, data_dir=data_dir)  # prepares it
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  return src.__getitems__(list(range(len(src))))


# ------------------------------------------------------------ spurious_glyphs

def test_spurious_glyphs_spec_and_group_sizes(data_dir):
  spec = sources.get_spec("spurious_glyphs", data_dir=str(data_dir))
  assert (spec.num_classes, spec.num_groups, spec.image_shape) == (2, 4, (32, 32, 3))
  assert spec.has_groups and spec.splits == {"train": 4800, "validation": 1200, "test": 2400}
  for split, sizes in spurious.GROUP_SIZES.items():
    recs = _raw("spurious_glyphs", split, str(data_dir))
    label, group, spur, digit = (np.array([r[k] for r in recs])
                                 for k in ("label", "group", "spurious", "digit"))
    np.testing.assert_array_equal(np.bincount(group, minlength=4), sizes)
    np.testing.assert_array_equal(group, 2 * label + spur)
    np.testing.assert_array_equal(label, digit // 5)
    agree = np.mean(label == spur)
    if split == "train":  # Waterbirds' confounder strength
      assert agree == pytest.approx(0.95, abs=1e-3)
      assert np.mean(spur[label == 0] == 0) == pytest.approx(0.95, abs=2e-3)
      assert np.mean(spur[label == 1] == 1) == pytest.approx(0.95, abs=2e-3)
      assert np.argmin(sizes) == 2  # the minority: label 1 on the label-0 background
    else:  # background independent of the label
      for y in (0, 1):
        assert np.mean(spur[label == y]) == pytest.approx(0.5, abs=1e-9)
      assert min(sizes) >= 134 and (split != "test" or min(sizes) >= 150)


def test_spurious_glyphs_background_is_the_easy_cue(data_dir):
  """The mean colour alone predicts the background almost perfectly on the
  test split, but not the label (the shape is the core feature)."""
  src = pipeline.load_split("spurious_glyphs", "test", data_dir=str(data_dir))
  recs = _raw("spurious_glyphs", "test", str(data_dir))
  spur = np.array([r["spurious"] for r in recs])
  x = src.images.reshape(len(src), -1, 3).mean(1)
  from sklearn.linear_model import LogisticRegression
  half = len(x) // 2
  bg = LogisticRegression(max_iter=1000).fit(x[:half], spur[:half]).score(x[half:], spur[half:])
  y = LogisticRegression(max_iter=1000).fit(x[:half], src.labels[:half]).score(
      x[half:], src.labels[half:])
  majority = max(np.mean(src.labels[half:]), 1 - np.mean(src.labels[half:]))
  assert bg > 0.9 and y < majority + 0.03


def test_group_field_in_records_batches_and_cache(data_dir):
  rec = sources.get_source("spurious_glyphs", "validation", data_dir=str(data_dir))[0]
  assert set(rec) == {"image", "label", "group"} and isinstance(rec["group"], np.int64)
  src = pipeline.load_split("spurious_glyphs", "validation", data_dir=str(data_dir))
  raw = _raw("spurious_glyphs", "validation", str(data_dir))
  np.testing.assert_array_equal(src.groups, [r["group"] for r in raw])
  batches = list(pipeline.eval_batches(src, 512))  # 1200 = 2 x 512 + 176, padded
  last = batches[-1]
  assert last["group"].dtype == np.int32 and last["mask"].sum() == 1200 - 1024
  np.testing.assert_array_equal(last["group"][last["mask"]], src.groups[1024:])
  # Not in RAM, through a subset: the same groups.
  sub = pipeline.subset(sources.get_source("spurious_glyphs", "validation",
                                           data_dir=str(data_dir)), np.array([5, 3]))
  np.testing.assert_array_equal(pipeline.read(sub, np.array([0, 1]))["group"],
                                src.groups[[5, 3]])


def test_datasets_without_groups_say_so(data_dir):
  assert sources.get_spec("digits", data_dir=str(data_dir)).num_groups is None
  src = pipeline.load_split("digits", "test", data_dir=str(data_dir))
  assert "group" not in pipeline.read(src, np.arange(3))  # unchanged batches
  with pytest.raises(ValueError, match=r"digits:test has no group labels"):
    pipeline.all_groups(src, what="digits:test")


def test_absent_group_is_named():
  src = pipeline.InMemorySource(np.zeros((4, 2, 2, 1), np.uint8), np.array([0, 0, 1, 1]),
                                np.array([0, 1, 3, 3]))
  with pytest.raises(ValueError, match=r"spurious_glyphs:test: group\(s\) \[2\] have no"):
    pipeline.group_counts(src, 4, what="spurious_glyphs:test")


# -------------------------------------------------------------------- celeb_a

def test_celeb_a_groups_through_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    spec = sources.get_spec("celeb_a", data_dir=str(tmp_path))
    assert (spec.num_classes, spec.num_groups, spec.image_shape) == (2, 4, (218, 178, 3))
    assert sources.class_names("celeb_a", data_dir=str(tmp_path)) == ["not_blond", "blond"]
    src = sources.get_source("celeb_a", "train", data_dir=str(tmp_path))
    assert src.has_groups and len(src) == 12
    recs = src.__getitems__(list(range(12)))
    raws = [src.source[i] for i in range(12)]
  blond = np.array([r["attributes"]["Blond_Hair"] for r in raws], np.int64)
  male = np.array([r["attributes"]["Male"] for r in raws], np.int64)
  assert len(set(2 * blond + male)) > 1  # the mock varies both attributes
  np.testing.assert_array_equal([r["label"] for r in recs], blond)
  np.testing.assert_array_equal([r["group"] for r in recs], 2 * blond + male)
  assert all(r["image"].shape == (218, 178, 3) for r in recs)


# ------------------------------------------------------------ groups evaluator

def _numpy_results(pred, labels, groups, weights):
  acc = np.array([np.mean(pred[groups == g] == labels[groups == g]) for g in range(4)])
  w = np.asarray(weights, np.float64) / np.sum(weights)
  out = {f"group_{g}/accuracy": acc[g] for g in range(4)}
  out.update(worst_group_accuracy=acc.min(), mean_accuracy=np.mean(pred == labels),
             group_weighted_accuracy=np.sum(w * acc), group_mean_accuracy=acc.mean())
  return out


def test_group_results_match_numpy_and_differ_from_each_other():
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(4), [50, 10, 5, 35])
  labels = groups // 2
  logits = rng.normal(size=(100, 2)) + 1.5 * np.eye(2)[np.where(groups % 3 == 0, labels, 0)]
  weights = (3498, 184, 56, 1057)
  got = groups_ev.group_results(logits, labels, groups, 4, weights)
  want = _numpy_results(logits.argmax(1), labels, groups, weights)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-6), k
  means = [got[k] for k in ("mean_accuracy", "group_weighted_accuracy", "group_mean_accuracy")]
  assert len(set(np.round(means, 6))) == 3  # three different numbers, three names


@functools.lru_cache(maxsize=None)
def _setup(data_dir):
  c = default.get_config("smoke")
  c.data.name = "spurious_glyphs"
  c.data.data_dir = str(data_dir)
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.eval_batch_size = 64  # the 2,400 test images end in a padded batch of 32
  modules = build.build_modules(c, num_classes=2, image_shape=(32, 32, 3), total_steps=1,
                                steps_per_epoch=1.0)
  state = state_lib.create_state(modules, jax.random.PRNGKey(1))
  mesh = sharding.make_mesh((("data", -1),))
  return c, modules, state, sharding.data_sharding(mesh, ("data",))


@pytest.mark.slow
def test_groups_evaluator_matches_numpy_on_a_padded_split(data_dir):
  c, modules, state, batch_sharding = _setup(data_dir)
  c.evaluators = {"groups": dict(type="groups", splits=("test",))}
  evs = ev.build_evaluators(c, modules, num_classes=2, image_shape=(32, 32, 3),
                            batch_sharding=batch_sharding)
  results = ev.run(evs, state)
  # Independent of the evaluator: logits from the predictor, labels and
  # groups from the raw records.
  predictor = predict_lib.Predictor(modules["classifier"], batch_size=64,
                                    batch_sharding=batch_sharding)
  src = pipeline.load_split("spurious_glyphs", "test", data_dir=str(data_dir))
  out = predictor(state.classifier.variables, src, fields=("logits", "group"))
  raw = _raw("spurious_glyphs", "test", str(data_dir))
  groups = np.array([r["group"] for r in raw])
  np.testing.assert_array_equal(out["group"], groups)
  want = _numpy_results(out["logits"].argmax(1), groups // 2, groups,
                        spurious.GROUP_SIZES["train"])
  assert set(results) == {f"test/{k}" for k in want}
  for k, v in want.items():
    assert results[f"test/{k}"] == pytest.approx(v, abs=1e-6), k


def test_groups_evaluator_errors_before_compiling(data_dir):
  c, modules, _, batch_sharding = _setup(data_dir)
  c.evaluators = {"wga": dict(type="groups")}
  c.data.name = "digits"
  try:
    with pytest.raises(ValueError, match=r"config\.evaluators\.wga: .*'digits' has none"):
      ev.build_evaluators(c, modules, num_classes=2, image_shape=(32, 32, 3),
                          batch_sharding=batch_sharding)
  finally:
    c.data.name = "spurious_glyphs"
  c.evaluators = {"wga": dict(type="groups", weights_split="nope")}
  with pytest.raises(ValueError, match=r"config\.evaluators\.wga\.weights_split: .*'nope'"):
    ev.build_evaluators(c, modules, num_classes=2, image_shape=(32, 32, 3),
                        batch_sharding=batch_sharding)


# ----------------------------------------------------------------- waterbirds

SPECIES = ("black_footed_albatross", "american_crow", "western_gull", "blue_jay",
           "pacific_loon", "cardinal", "horned_grebe", "house_sparrow")


def _fake_sources(names):
  """``as_data_source`` for tfds.testing.mock_data: CUB records with species
  names (every 8th pattern) and a square mask, Places records of the four
  target categories and others."""
  target = [names.index(c) for kinds in waterbirds.TARGET_PLACES for c in kinds]

  def cub(split, i):
    rng = np.random.default_rng([i, split == "test"])
    h, w = 30 + i % 7, 40 + i % 5
    mask = np.zeros((h, w, 1), np.uint8)
    mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "segmentation_mask": mask, "label": i % 200,
            "label_name": SPECIES[i % len(SPECIES)].encode()}

  def place(i):
    label = target[i % 4] if i % 5 else 0  # every 5th: another category
    return {"image": np.full((48, 48, 3), 10 * (i % 4) + 100, np.uint8), "label": label}

  def as_data_source(self, split, decoders=None, **kwargs):
    del decoders, kwargs
    if self.name == waterbirds.CUB:
      return [cub(split, i) for i in range(80 if split == "train" else 40)]
    assert self.name == waterbirds.PLACES and split == "train"
    return [place(i) for i in range(400)]
  return as_data_source


def test_waterbirds_composed_from_mocked_cub_and_places(tmp_path):
  names = tfds.builder(waterbirds.PLACES, data_dir=str(tmp_path)).info.features["label"].names
  with tfds.testing.mock_data(as_data_source_fn=_fake_sources(names)):
    builder = tfds.builder("waterbirds/64", data_dir=str(tmp_path))
    gens = builder._split_generators(None)
    examples = {s: [ex for _, ex in gens[s]] for s in waterbirds.SPLITS}
  assert builder.split_sizes() == {"train": 64, "validation": 16, "test": 40}
  spec = sources.get_spec("waterbirds/64", data_dir=str(tmp_path))
  assert (spec.num_classes, spec.num_groups, spec.image_shape) == (2, 4, (64, 64, 3))
  plan = builder._plan
  for split, exs in examples.items():
    label, group, place, species = (np.array([e[k] for e in exs])
                                    for k in ("label", "group", "place", "species"))
    assert all(e["image"].shape == (64, 64, 3) and e["image"].dtype == np.uint8 for e in exs)
    np.testing.assert_array_equal(group, 2 * label + place)
    np.testing.assert_array_equal(label, [waterbirds.is_waterbird(SPECIES[s % 8])
                                          for s in species])
    for y in (0, 1):
      p = {"train": 0.95 if y else 0.05}.get(split, 0.5)
      assert np.sum(place[label == y]) == np.round(p * np.sum(label == y))
    # Backgrounds: places of the right kind, each used once over all splits.
    kinds = np.array([(plan[split]["place_index"] % 5 != 0)
                      & (plan[split]["place_index"] % 4 >= 2 * place)
                      & (plan[split]["place_index"] % 4 < 2 * place + 2)])
    assert kinds.all()
  used = np.concatenate([plan[s]["place_index"] for s in waterbirds.SPLITS])
  assert len(np.unique(used)) == len(used)
  # Validation is drawn from CUB train, test is CUB test.
  assert set(plan["validation"]["cub_index"]).isdisjoint(plan["train"]["cub_index"])
  assert plan["test"]["cub_split"].all() and len(plan["test"]["cub_index"]) == 40


def test_waterbirds_composite_keeps_the_bird_and_replaces_the_background():
  image = np.full((20, 30, 3), 200, np.uint8)
  mask = np.zeros((20, 30, 1), np.uint8)
  mask[5:15, 10:20] = 255
  place = np.full((64, 64, 3), 7, np.uint8)
  out = waterbirds.composite(image, mask, place)
  assert out.shape == (20, 30, 3)
  assert (out[5:15, 10:20] == 200).all() and (out[:5] == 7).all() and (out[:, :10] == 7).all()
  assert waterbirds.to_stored_size(out, 16).shape == (16, 16, 3)
  assert waterbirds.is_waterbird(b"laysan_albatross") and not waterbirds.is_waterbird("blue_jay")
