"""SimCLR: NT-Xent against a numpy port of the reference's
add_contrastive_loss, negatives gathered across devices under pmap equal the
global-batch loss, the augmentation ops, extra heads (paths, loading,
the `head` composition key), and a SimCLR pre-train -> fine-tune recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recompute
from jaxrobust import losses as losses_lib
from jaxrobust.methods import simclr
from jaxrobust.registry import RegistryError


def _reference_loss(z, temperature):
  """numpy port of google-research/simclr objective.add_contrastive_loss on
  one replica: hidden normalised, [ab, aa] and [ba, bb] logits with the
  diagonal of aa/bb masked by -1e9, softmax CE with the partner as label,
  loss_a + loss_b (each a batch mean)."""
  h = z / np.linalg.norm(z, axis=-1, keepdims=True)
  h1, h2 = h[0].astype(np.float64), h[1].astype(np.float64)
  n = len(h1)
  masks = np.eye(n)
  aa = h1 @ h1.T / temperature - masks * 1e9
  bb = h2 @ h2.T / temperature - masks * 1e9
  ab = h1 @ h2.T / temperature
  ba = h2 @ h1.T / temperature

  def ce(logits):
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(n), np.arange(n)].mean()

  return ce(np.concatenate([ab, aa], 1)) + ce(np.concatenate([ba, bb], 1))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_the_reference(temperature):
  z = np.random.default_rng(0).normal(size=(2, 12, 5)).astype(np.float32)
  got = float(simclr.nt_xent(jnp.asarray(z), temperature=temperature))
  assert got == pytest.approx(_reference_loss(z, temperature), rel=1e-5)


def test_padded_rows_are_neither_anchors_nor_negatives():
  z = np.random.default_rng(1).normal(size=(2, 10, 4)).astype(np.float32)
  mask = np.array([1] * 7 + [0] * 3, bool)
  got = float(simclr.nt_xent(jnp.asarray(z), mask=jnp.asarray(mask)))
  assert got == pytest.approx(_reference_loss(z[:, :7], 0.5), rel=1e-5)


def test_pmap_gathers_negatives_across_devices_like_the_global_batch():
  n_dev = jax.local_device_count()
  z = np.random.default_rng(2).normal(size=(2, 4 * n_dev, 6)).astype(np.float32)
  whole = float(simclr.nt_xent(jnp.asarray(z)))
  shards = z.reshape(2, n_dev, 4, 6).transpose(1, 0, 2, 3)
  per_device = jax.pmap(lambda s: simclr.nt_xent(s, axis_name="d"), axis_name="d")(shards)
  # every device's loss is over its own anchors against the whole batch; the
  # mean over devices (what pmean of the gradients averages) is the global loss
  assert float(np.mean(per_device)) == pytest.approx(whole, rel=1e-5)
  local_only = float(np.mean(jax.pmap(lambda s: simclr.nt_xent(s))(shards)))
  assert local_only != pytest.approx(whole, rel=1e-3)  # the gather mattered


@pytest.mark.slow
def test_augmentations_keep_shape_range_and_reduce_to_identity():
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(6, 16, 16, 3)).astype(np.float32))
  key = jax.random.PRNGKey(0)
  crop = simclr.random_resized_crop(key, x)
  assert crop.shape == x.shape and float(crop.min()) >= 0 and float(crop.max()) <= 1
  np.testing.assert_array_equal(crop, simclr.random_resized_crop(key, x))
  same = simclr.random_resized_crop(key, x, scale_min=1.0, ratio_min=1.0, ratio_max=1.0)
  np.testing.assert_allclose(same, x, atol=1e-5)  # the whole image, resized to itself
  np.testing.assert_allclose(simclr.color_jitter(key, x, strength=0.0), x, atol=1e-5)
  gray = simclr.random_grayscale(key, x, p=1.0)
  np.testing.assert_allclose(gray[..., 0], gray[..., 2])
  g1 = x[..., :1]
  np.testing.assert_array_equal(simclr.random_grayscale(key, g1, p=1.0), g1)
  jittered = simclr.color_jitter(key, g1, strength=1.0, p=1.0)
  assert jittered.shape == g1.shape and not np.allclose(jittered, g1)
  with pytest.raises(RegistryError, match="scale_min"):
    simclr.random_resized_crop(key, x, scale_min=0.0)


def test_heads_keep_the_model_paths_and_feed_terms_by_name():
  from jaxrobust import models
  from jaxrobust.models import heads
  base = models.get_model("small_cnn", num_classes=10, stage_widths=((8,), (16,)))
  specs = heads.build_specs({"proj": "mlp(features=7, layers=2)", "src": "linear(features=5)"})
  wrapped = heads.WithHeads(base, specs)
  x = jnp.zeros((2, 32, 32, 1))
  v0 = base.init(jax.random.PRNGKey(0), x, train=False)
  v1 = wrapped.init(jax.random.PRNGKey(0), x, train=False)
  p0 = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(
      v0["params"])}
  p1 = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(
      v1["params"])}
  assert p0 < p1 and all(p.startswith("heads/") for p in p1 - p0)
  logits, _, outs = wrapped.apply(v1, x, train=False, return_features=True)
  assert logits.shape == (2, 10) and outs["proj"].shape == (2, 7) and outs["src"].shape == (2, 5)
  with pytest.raises(RegistryError, match="features must be a positive integer"):
    heads.build_specs({"bad": "linear(features=0)"})

  # the `head` composition key: cross-entropy on the 5-way head, K taken from it
  rng = np.random.default_rng(0)
  out = {"logits": jnp.asarray(rng.normal(size=(4, 10)), jnp.float32),
         "features": jnp.zeros((4, 3)),
         "head:src": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}
  labels = jnp.asarray([0, 4, 2, 1])
  inputs = losses_lib.LossInputs(
      outputs=losses_lib._Outputs({"train": out}, "classifier", ("train",)),
      batch={"train": {"label": labels, "mask": jnp.ones(4, bool)}}, num_classes=10,
      params={}, rng=jax.random.PRNGKey(0), step=jnp.zeros((), jnp.int32))
  terms = losses_lib.build_terms({"src": {"name": "cross_entropy", "head": "src"}},
                                 heads=["src", "proj"])
  total, _ = losses_lib.compose(terms)(inputs)
  logp = jax.nn.log_softmax(out["head:src"])
  assert float(total) == pytest.approx(float(-logp[jnp.arange(4), labels].mean()), rel=1e-6)
  with pytest.raises(RegistryError, match="no such head"):
    losses_lib.build_terms({"x": {"name": "cross_entropy", "head": "nope"}}, heads=["src"])


@pytest.mark.slow
def test_simclr_pretrain_then_fine_tune_without_the_projection_head(tmp_path, data_dir):
  from jaxrobust import stages
  from jaxrobust.checkpoint import load_pretrained
  from tiny_config import tiny_config
  c = tiny_config(data_dir)
  c.stages = {
      "simclr": {"task": "train", "config": simclr.pretrain(
          {"evaluators": {"classification": {"splits": ()}}},
          projection="mlp(features=8, layers=2)", pp_chain="simclr_gray")},
      "finetune": {"task": "train", "config": {
          "init_from": {"path": "artifact:simclr/checkpoint", "skip": simclr.fine_tune_skip()}}},
  }
  results = stages.run(c, str(tmp_path))
  params, _ = load_pretrained(str(tmp_path / "simclr"))
  assert "proj" in params["heads"]
  # The fine-tuned model's reported numbers are its checkpoint's; its test NLL is a
  # fixed-seed value, measured 2026-12-06 on this repository's pinned versions (CPU, 8
  # host devices); a change means the computation changed.
  want = recompute.classification(stages.stage_configs(c)["finetune"][2], tmp_path / "finetune")
  assert results["finetune/test/accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
  assert results["finetune/test/nll"] == pytest.approx(want["nll"], rel=1e-6)
  assert results["finetune/test/nll"] == pytest.approx(2.30489173, rel=1e-4)
  metrics = [l for l in (tmp_path / "simclr" / "metrics.jsonl").read_text().splitlines()
             if "contrastive_accuracy" in l]
  assert metrics  # the NT-Xent term ran and logged
