"""Evaluators by type and predict: dataset index order on several processes,
the OOD protocol (draws), score specs, robust accuracy <= clean accuracy, and
errors raised when the evaluators are built (before any compilation)."""

import functools

import jax
import numpy as np
import pytest

import processes
import traces
from configs import default
from jaxrobust import evaluators as ev
from jaxrobust import predict as predict_lib
from jaxrobust import build, sharding
from jaxrobust import scores as scores_lib
from jaxrobust import train_state as state_lib
from jaxrobust.data import pipeline
from jaxrobust.metrics import ood as ood_metrics
from jaxrobust.registry import RegistryError


def _config(data_dir):
  c = default.get_config("smoke")
  c.data.data_dir = str(data_dir)
  c.model.kwargs.stage_widths = ((8,), (16,))
  c.evaluators.ood.sets = {}
  c.evaluators.classification.splits = ("test",)
  c.eval_batch_size = 64
  return c


@functools.lru_cache(maxsize=None)
def _setup(data_dir):
  c = _config(data_dir)
  modules = build.build_modules(c, num_classes=10, image_shape=(32, 32, 1), total_steps=1,
                                steps_per_epoch=1.0)
  state = state_lib.create_state(modules, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh((("data", -1),))
  return c, modules, state, sharding.data_sharding(mesh, ("data",))


def _build(data_dir, **evaluators):
  c, modules, state, batch_sharding = _setup(data_dir)
  c = _config(data_dir)
  c.evaluators = evaluators
  return ev.build_evaluators(c, modules, num_classes=10, image_shape=(32, 32, 1),
                             batch_sharding=batch_sharding), state


@pytest.mark.slow
def test_predict_returns_dataset_index_order_under_process_interleaving(data_dir):
  """With two processes, global batch b is [process 0's batch b; process 1's
  batch b]: rows arrive interleaved. predict puts them back by index."""
  _, modules, state, batch_sharding = _setup(data_dir)
  src = pipeline.load_split("digits", "validation", data_dir=str(data_dir))
  predictor = predict_lib.Predictor(modules["classifier"], batch_size=64,
                                    batch_sharding=batch_sharding)
  single = predictor(state.classifier.variables, src, fields=("logits", "label"))

  with processes.two_processes():
    out = predictor(state.classifier.variables, src, fields=("logits", "label"))
  np.testing.assert_array_equal(out["label"], src.labels)
  np.testing.assert_allclose(out["logits"], single["logits"], rtol=1e-5, atol=1e-6)
  arrival = np.concatenate([b["index"][b["mask"]]
                            for b in processes.two_process_batches()(src, 64)])
  assert not np.array_equal(arrival, np.arange(len(src)))  # the reordering mattered


def test_predictor_compiles_once_per_fields_and_scores(data_dir):
  """Predictions of three evaluations, each with new variables, reuse the
  compiled function of their (fields, scores) request: each request's
  function is traced once (chex.assert_max_traces)."""
  _, modules, state, batch_sharding = _setup(data_dir)
  src = pipeline.load_split("digits", "validation", data_dir=str(data_dir))
  predictor = predict_lib.Predictor(modules["classifier"], batch_size=64,
                                    batch_sharding=batch_sharding)
  energy = scores_lib.build("energy")
  logits = []
  with traces.each_traced_at_most(predict_lib, "_per_batch", 1,
                                  traces.predictor_request) as made:
    for i in range(3):
      variables = jax.tree.map(lambda a: a * (1.0 + 0.25 * i), state.classifier.variables)
      logits.append(predictor(variables, src, fields=("logits", "label"))["logits"])
      out = predictor(variables, src, fields=("logits", "energy"), scores={"energy": energy})
      np.testing.assert_allclose(out["logits"], logits[-1], rtol=1e-6)
  assert [n for _, n in made] == [1, 1]
  assert not np.allclose(logits[0], logits[1])  # each evaluation used its own variables


def test_a_plain_score_function_keeps_its_compiled_entry_to_itself(data_dir):
  """A plain logit function names its compiled function by its id: the
  predictor keeps the function alive, so no later function can take that id
  (and the first one's compiled scores); two functions give their own."""
  import gc
  import weakref
  _, modules, state, batch_sharding = _setup(data_dir)
  src = pipeline.load_split("digits", "validation", data_dir=str(data_dir))
  predictor = predict_lib.Predictor(modules["classifier"], batch_size=64,
                                    batch_sharding=batch_sharding)
  variables = state.classifier.variables
  first = lambda z: z.max(-1)  # noqa: E731
  a = predictor(variables, src, fields=("s",), scores={"s": first})["s"]
  alive = weakref.ref(first)
  del first
  gc.collect()
  assert alive() is not None
  b = predictor(variables, src, fields=("s",), scores={"s": lambda z: -z.max(-1)})["s"]
  np.testing.assert_allclose(b, -a, rtol=1e-6)


@pytest.mark.slow
def test_evaluators_of_one_round_share_predictions_and_compile_once(data_dir):
  """A classification evaluator and two OOD evaluators with the same scores
  (one fitted: Mahalanobis), over three rounds: the second OOD evaluator reuses
  the first one's predictions of the round, and each prediction request is
  traced once over all rounds (refits are arguments, not recompilations)."""
  from unittest import mock
  ood = {"type": "ood", "sets": {"blobs": "blobs/gray:validation"}, "fraction": 0.0,
         "scores": ("msp", "energy", "mahalanobis")}
  evs, state = _build(data_dir, classification={"type": "classification", "splits": ("test",)},
                      a={**ood, "prefix": "a"}, b={**ood, "prefix": "b"})
  passes = []
  call = predict_lib.Predictor.__call__

  def counted(self, variables, source, **kwargs):
    passes.append((len(source), tuple(kwargs["fields"])))
    return call(self, variables, source, **kwargs)

  with traces.each_traced_at_most(predict_lib, "_per_batch", 1,
                                  traces.predictor_request) as made, \
       mock.patch.object(predict_lib.Predictor, "__call__", counted):
    rounds = [ev.run(evs, state) for _ in range(3)]
  # Per round (evaluators in key order): the three scores of the test split and
  # of blobs, once for both OOD evaluators, then the test split's logits.
  scored = ("msp", "energy", "mahalanobis")
  assert passes == 3 * [(360, scored), (2000, scored), (360, ("logits", "label"))]
  assert [n for _, n in made] == [1, 1]
  for results in rounds:
    assert results == rounds[0]
    for score in scored:
      assert results[f"a/{score}/blobs/auroc"] == results[f"b/{score}/blobs/auroc"]


@pytest.mark.slow
def test_ood_protocol_draws_and_keys(data_dir):
  sets = {"blobs": "blobs/gray:validation"}
  evs, state = _build(data_dir, ood={
      "type": "ood", "sets": sets, "fraction": 0.2, "draws": 3,
      "scores": {"msp": "msp", "msp_t10": "msp(temperature=10)", "energy": "energy"}},
      all={"type": "ood", "sets": sets, "fraction": 0.0, "scores": ("energy",),
           "prefix": "all"})
  results = ev.run(evs, state)
  assert {f"ood/{s}/{k}/auroc" for s in ("msp", "msp_t10", "energy") for k in ("blobs", "mean")
          } <= set(results)
  assert {"all/energy/blobs/auroc", "all/energy/mean/fpr95"} <= set(results)
  # Only the drawn examples were scored: at most 3 draws of 72 = 360 / 5.
  assert len(evs["ood"].sets["blobs"]) <= 216 and len(evs["all"].sets["blobs"]) == 2000
  # The reported numbers are the mean over the 3 seeded draws of 72 OOD scores.
  e = evs["all"]
  s_in = e._scores(state, e.in_source)["energy"]
  s_out = e._scores(state, e.sets["blobs"])["energy"]
  import zlib
  rng = np.random.default_rng([0, zlib.crc32(b"blobs")])
  draws = [s_out[rng.permutation(len(s_out))[:72]] for _ in range(3)]
  per_draw = [ood_metrics.ood_metrics(s_in, d, preset="hendrycks") for d in draws]
  for metric in ("auroc", "aupr_out", "fpr95"):
    np.testing.assert_allclose(results[f"ood/energy/blobs/{metric}"],
                               np.mean([float(m[metric]) for m in per_draw]), rtol=1e-6)
  # All examples once differs from the subsampled protocol in AUPR (ratio-dependent).
  assert abs(results["all/energy/blobs/aupr_out"] - results["ood/energy/blobs/aupr_out"]) > 1e-3


def test_robust_accuracy_is_at_most_clean_accuracy(data_dir):
  evs, state = _build(
      data_dir, classification={"type": "classification", "splits": ("test",)},
      robust={"type": "robust", "attacks": {"fgsm": "fgsm(eps=8/255)", "none": "fgsm(eps=0)"}})
  results = ev.run(evs, state)
  assert results["robust/fgsm/accuracy"] <= results["test/accuracy"]
  assert results["robust/none/accuracy"] == pytest.approx(results["test/accuracy"])
  assert results["robust/fgsm/num_examples"] == 360


@pytest.mark.parametrize("evaluators, match", [
    ({"x": {"type": "odd"}}, r"config.evaluators.x: unknown evaluator 'odd' \(did you mean 'ood'"),
    ({"x": {"type": "ood", "sets": {"b": "blobs/gray:tset"}}},
     r"evaluators.x.sets.b: dataset 'blobs/gray' has no split 'tset'"),
    ({"x": {"type": "ood", "sets": {"b": "blobs/rgb:test"}}},
     r"has images of shape \(32, 32, 3\); the model takes \(32, 32, 1\)"),
    ({"x": {"type": "ood", "scores": ("msp", "enrgy")}}, "unknown OOD score 'enrgy'"),
    ({"x": {"type": "ood", "sets": {"b": "blobs/gray:test"}, "preset": "hendriks"}},
     "preset='hendriks'"),
    ({"x": {"type": "robust", "attacks": {"a": "fgsm(eps=-1)"}}}, "eps must be >= 0"),
    ({"x": {"type": "classification", "splits": ("tets",)}}, "has no split 'tets'"),
    ({"x": {"type": "classification", "module": "probe"}}, "module='probe': no such module"),
])
def test_bad_evaluator_configs_are_named(data_dir, evaluators, match):
  with pytest.raises((RegistryError, ValueError), match=match):
    _build(data_dir, **evaluators)
