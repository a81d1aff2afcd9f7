"""The OpenOOD v1.5 protocol: the ``openood`` preset against a numpy port of
OpenOOD's ``compute_all_metrics`` (OOD positive, ties, padding), the
evaluator's near/far group averages, convention-named keys and ID accuracy,
gray OOD sets for RGB models, and the ``configs/recipes/openood.py`` recipe."""

from __future__ import annotations

import numpy as np
import pytest

import reference_openood as ref
from jaxrobust.metrics import ood as ood_metrics
from jaxrobust.registry import RegistryError


PAD = 512  # every case padded to one shape: one compilation


def _compare(xi, xo, rng):
  """The preset on ``xi``/``xo`` padded (wild values, masked out, shuffled)
  to PAD entries per side, against the port on the unpadded scores."""
  sides = []
  for x, fill in ((xi, 1e9), (xo, -1e9)):
    x = np.asarray(x, np.float32)
    padded = np.r_[x, np.full(PAD - len(x), fill, np.float32)]
    mask = np.arange(PAD) < len(x)
    perm = rng.permutation(PAD)
    sides.append((padded[perm], mask[perm]))
  (pi, mi), (po, mo) = sides
  got = ood_metrics.ood_metrics(pi, po, "openood", in_mask=mi, out_mask=mo)
  want = ref.openood_metrics(xi, xo)
  for k in ("fpr95", "auroc", "aupr_in", "aupr_out"):
    np.testing.assert_allclose(float(got[k]), want[k], atol=2e-6, err_msg=k)
  return want


def test_openood_preset_matches_compute_all_metrics_with_ties_and_padding():
  rng = np.random.default_rng(0)
  seen_fpr = set()
  for trial in range(12):
    n_in, n_out = rng.integers(5, 200, 2)
    levels = int(rng.integers(2, 12))  # few distinct values: heavy ties across sides
    xi = rng.integers(0, levels, n_in).astype(np.float32) + (trial % 3)
    xo = rng.integers(0, levels, n_out).astype(np.float32)
    seen_fpr.add(round(_compare(xi, xo, rng)["fpr95"], 6))
  assert len(seen_fpr) > 3  # the cases are not all degenerate
  # Continuous scores, and a collinear ROC run (sklearn drops its middle points).
  _compare(rng.normal(1, 1, 300), rng.normal(0, 1, 500), rng)
  _compare(np.arange(40), np.arange(0, 80, 2) - 0.5, rng)
  # Unpadded inputs give the same numbers as their padded copies.
  xi, xo = rng.integers(0, 5, 50).astype(np.float32), rng.integers(0, 5, 70).astype(np.float32)
  want = ref.openood_metrics(xi, xo)
  got = ood_metrics.ood_metrics(xi, xo, "openood")
  assert float(got["fpr95"]) == pytest.approx(want["fpr95"], abs=1e-6)
  assert float(got["aupr_out"]) == pytest.approx(want["aupr_out"], abs=1e-6)


def test_port_agrees_with_sklearn_and_ood_is_positive():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 300)
  s = rng.integers(0, 9, 300).astype(float)
  f, t, _ = metrics.roc_curve(y, s)
  pf, pt, _ = ref.roc_curve(y, s)
  np.testing.assert_allclose(np.c_[f, t], np.c_[pf, pt])
  p, r, _ = metrics.precision_recall_curve(y, s)
  pp, pr, _ = ref.precision_recall_curve(y, s)
  assert metrics.auc(r, p) == pytest.approx(ref.auc(pr, pp), abs=1e-12)
  # OOD positive: ID scores all above OOD but 10% of OOD above every ID score
  # -> to flag 95% of OOD every ID example must be flagged... except when OOD
  # is positive, FPR counts ID images: here 1.0; with ID positive it would be 0.1.
  xi = np.linspace(1, 2, 100)
  xo = np.r_[np.linspace(-1, 0, 90), np.linspace(3, 4, 10)]
  assert ref.openood_metrics(xi, xo)["fpr95"] == 1.0
  assert float(ood_metrics.ood_metrics(xi, xo, "openood")["fpr95"]) == 1.0
  assert float(ood_metrics.ood_metrics(xi, xo, "energy")["fpr95"]) == pytest.approx(0.1)


def _evaluators(data_dir, **ood):
  from test_evaluators import _build
  return _build(data_dir, classification={"type": "classification", "splits": ("test",)},
                ood={"type": "ood", "preset": "openood", "scores": ("msp", "energy"), **ood})


@pytest.mark.slow
def test_group_averages_keys_and_id_accuracy(data_dir):
  from jaxrobust import evaluators as ev
  from jaxrobust.evaluators import ood as ood_eval
  sets = {"blobs": "blobs/gray:validation", "gauss": "gaussian_noise/gray:validation",
          "letters": "glyphs/lower:test"}
  evs, state = _evaluators(data_dir, sets=sets,
                           groups={"near": ("letters",), "far": ("blobs", "gauss")})
  results = ev.run(evs, state)
  names = ood_eval.METRICS["openood"]
  for score in ("msp", "energy"):
    got = {k.rsplit("/", 1)[1] for k in results if k.startswith(f"ood/{score}/blobs/")}
    assert got == set(names) and "fpr95" not in got
    for m in names:
      per = {s: results[f"ood/{score}/{s}/{m}"] for s in sets}
      assert results[f"ood/{score}/near/{m}"] == pytest.approx(per["letters"])
      assert results[f"ood/{score}/far/{m}"] == pytest.approx((per["blobs"] + per["gauss"]) / 2)
      assert results[f"ood/{score}/mean/{m}"] == pytest.approx(np.mean(list(per.values())))
  # The per-set numbers are OpenOOD's on the evaluator's own scores.
  e = evs["ood"]
  s_in = e._scores(state, e.in_source)["energy"]
  s_out = e._scores(state, e.sets["letters"])["energy"]
  want = ref.openood_metrics(s_in, s_out)
  assert results["ood/energy/letters/fpr95_ood_positive"] == pytest.approx(want["fpr95"],
                                                                          abs=1e-6)
  assert results["ood/energy/letters/aupr_in"] == pytest.approx(want["aupr_in"], abs=1e-6)
  assert results["ood/id_accuracy"] == pytest.approx(results["test/accuracy"], abs=1e-7)


@pytest.mark.parametrize("groups, match", [
    ({"near": ("blob",)}, r"ood.groups.near: unknown set\(s\) \['blob'\]"),
    ({"mean": ("blobs",)}, r"ood.groups.mean: a group name"),
    ({"blobs": ("blobs",)}, r"ood.groups.blobs: a group name"),
    ({"far": ()}, r"ood.groups.far: no sets"),
])
def test_bad_groups_raise_naming_the_key(data_dir, groups, match):
  with pytest.raises(RegistryError, match=match):
    _evaluators(data_dir, sets={"blobs": "blobs/gray:validation"}, groups=groups)


def test_gray_sets_are_repeated_into_rgb_for_rgb_models(data_dir):
  from jaxrobust.data.settings import DataSettings
  from jaxrobust.evaluators import EvalContext
  ctx = EvalContext(data=DataSettings(name="digits", data_dir=str(data_dir)), modules={},
                    module="classifier", predictor=None, num_classes=10,
                    image_shape=(32, 32, 3), where="config.evaluators.ood")
  with pytest.raises(ValueError, match=r"ood.sets.b: blobs/gray:validation has images of shape"):
    ctx.load("blobs/gray", "validation", key="sets.b")
  src = ctx.load("blobs/gray", "validation", key="sets.b", rgb=True)
  gray = ctx.data.load("blobs/gray", "validation")
  image = np.asarray(src[5]["image"])
  assert image.shape == (32, 32, 3)
  for ch in range(3):
    np.testing.assert_array_equal(image[..., ch], np.asarray(gray[5]["image"])[..., 0])


def test_recipe_variants_build_and_validate():
  from configs.recipes import openood
  from jaxrobust import stages
  for variant in openood.VARIANTS:
    c = openood.get_config(variant)
    plan = stages.stage_configs(c)
    assert list(plan)[0] == "baseline" and list(plan)[-1] == "evaluate"
    ood = plan["evaluate"][2].evaluators.ood
    assert ood.preset == "openood"
    assert set(ood.groups.near) | set(ood.groups.far) == set(ood.sets)
    for s in openood.TUNED:
      task, options, _ = plan[f"tune_{s}"]
      assert (task, options["preset"], options["metric"]) == ("tune_score", "openood", "auroc")
  c = openood.get_config("cifar10,tin=tiny_imagenet:validation,tin_val=tiny_imagenet:train")
  assert tuple(c.evaluators.ood.groups.near) == ("cifar100", "tin")
  assert tuple(c.evaluators.ood.groups.far) == ("mnist", "svhn", "texture", "places365")
  assert dict(c.stages.tune_odin.ood) == {"tin": "tiny_imagenet:train"}
  assert c.data.image_size == 32 and c.evaluators.ood.gray_to_rgb
  assert tuple(openood.get_config("cifar100").evaluators.ood.groups.near) == ("cifar10",)
  emb = openood.get_config("embedded").evaluators.ood.groups
  assert tuple(emb.near) == ("letters",) and "photo" in emb.far
  with pytest.raises(ValueError, match="tin='tiny'"):
    openood.get_config("cifar10,tin=tiny")
  with pytest.raises(ValueError, match="for the CIFAR variants"):
    openood.get_config("embedded,tin=a:b")


def test_sliced_splits_keep_their_colons():
  from jaxrobust.evaluators import parse_set
  assert parse_set("cifar10:train[49000:]", "x") == ("cifar10", "train[49000:]")
  assert parse_set("validation_ood/jigsaw/cifar10:train[:5%]+test", "x") == (
      "validation_ood/jigsaw/cifar10", "train[:5%]+test")
  assert parse_set("cifar10:3.0.2:test", "x") == ("cifar10:3.0.2", "test")


def test_tune_score_metric_must_be_one_of_the_presets_results():
  import types
  from jaxrobust.methods import tuning
  ctx = types.SimpleNamespace(name="tune_odin")
  with pytest.raises(RegistryError, match=r"stages.tune_odin.metric='fpr95': the openood preset's"
                                          r" metrics are auroc, aupr_in, aupr_out, "
                                          r"fpr95_ood_positive"):
    tuning.tune_score(ctx, checkpoint="x", preset="openood", metric="fpr95")
  assert "fpr95_ood_positive" in tuning.LOWER_IS_BETTER
