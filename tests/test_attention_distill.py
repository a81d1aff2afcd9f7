"""A-SKD and distillation baselines: against torch ports of the reference code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import losses as losses_lib
from jaxrobust.data import pp
from jaxrobust.methods import attention_distill as ad
from jaxrobust.pretrained import merge_pretrained
from jaxrobust.registry import RegistryError
from tests import reference_arcface as ref


def test_downsample_matches_reference():
  x = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  for f in (2, 4, 8):
    np.testing.assert_allclose(np.asarray(ad.down_up(jnp.asarray(x), f)),
                               ref.nearest_down_up_torch(x, f), atol=1e-6)
  got = pp.build("downsample(4)")(jax.random.PRNGKey(0), jnp.asarray(x))
  want = ref.gaussian_blur_torch(ref.nearest_down_up_torch(x, 4))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  plain = pp.build("downsample(4, blur=False)")(jax.random.PRNGKey(0), jnp.asarray(x))
  assert not np.allclose(np.asarray(plain), want, atol=1e-3)


def test_downsample_factor_must_divide():
  chain = pp.build("downsample(3)", where="config.streams.train.pp")
  with pytest.raises(RegistryError, match=r"downsample\(factor=3\).*32x32"):
    chain(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(RegistryError, match="config.streams.train.pp.*factor"):
    pp.build("downsample(0)", where="config.streams.train.pp")


def _inputs(student_out, teacher_out, b):
  def call(name, x, *, train=False, stats="update"):
    if name != "teacher":
      raise KeyError(f"no module {name!r}; modules: ['classifier'].")
    return teacher_out
  return losses_lib.LossInputs(
      outputs={"train": student_out},
      batch={"train": {"image": jnp.zeros((b, 8, 8, 3), jnp.uint8),
                       "label": jnp.zeros(b, jnp.int32), "mask": jnp.ones(b, bool)}},
      num_classes=3, params={}, rng=jax.random.PRNGKey(0), step=jnp.zeros((), jnp.int32),
      call=call)


def _maps(rng, b, blocks=("b1", "b2"), hw=(8, 4), c=(16, 32)):
  out = {}
  for name, s, ch in zip(blocks, hw, c):
    out[f"attention/{name}/channel"] = rng.normal(size=(b, ch)).astype(np.float32)
    out[f"attention/{name}/spatial"] = rng.normal(size=(b, s, s, 1)).astype(np.float32)
    out[f"activation/{name}"] = rng.normal(size=(b, s, s, ch)).astype(np.float32)
  out["logits"] = rng.normal(size=(b, 3)).astype(np.float32)
  out["features"] = rng.normal(size=(b, 5)).astype(np.float32)
  return out


def test_attention_similarity_matches_reference():
  rng = np.random.default_rng(1)
  s, t = _maps(rng, 4), _maps(rng, 4)
  terms = losses_lib.build_terms({"askd": dict(name="attention_similarity", weight=ad.LAMBDA)})
  value, metrics = losses_lib.compose(terms)(_inputs(s, t, 4))
  keys = [k for k in s if k.startswith("attention/")]
  # the reference's order: channel, spatial of each block (the sum does not depend on it)
  nchw = lambda a: a.transpose(0, 3, 1, 2) if a.ndim == 4 else a
  want = ref.askd_loss_torch([nchw(s[k]) for k in keys], [nchw(t[k]) for k in keys])
  assert float(value) == pytest.approx(want, rel=1e-5)
  assert set(metrics) >= {"train/attention_distance/channel", "train/attention_distance/spatial"}
  same, _ = losses_lib.compose(terms)(_inputs(s, s, 4))
  assert abs(float(same)) < 1e-5


def test_attention_similarity_errors():
  rng = np.random.default_rng(2)
  s, t = _maps(rng, 2), _maps(rng, 2, hw=(4, 2))
  term = losses_lib.compose(losses_lib.build_terms({"attention_similarity": {}}))
  with pytest.raises(RegistryError, match="resize"):
    term(_inputs(s, t, 2))
  resized = losses_lib.compose(losses_lib.build_terms(
      {"attention_similarity": dict(resize="bilinear")}))
  assert np.isfinite(float(resized(_inputs(s, t, 2))[0]))
  plain = {k: v for k, v in t.items() if not k.startswith(("attention", "activation"))}
  with pytest.raises(RegistryError, match="teacher has no map"):
    term(_inputs(s, plain, 2))
  with pytest.raises(RegistryError, match="config.modules.nope"):
    losses_lib.compose(losses_lib.build_terms({"attention_similarity": dict(
        teacher="nope")}))(_inputs(s, t, 2))
  with pytest.raises(RegistryError, match="kinds"):
    losses_lib.build_terms({"attention_similarity": dict(kinds=("depth",))})
  with pytest.raises(RegistryError, match="resize"):
    losses_lib.build_terms({"attention_similarity": dict(resize="cubic")})


def test_baselines_match_reference():
  rng = np.random.default_rng(3)
  s, t = _maps(rng, 4), _maps(rng, 4)
  inputs = _inputs(s, t, 4)
  kd = losses_lib.compose(losses_lib.build_terms({"logit_kd": dict(temperature=4.0)}))(inputs)[0]
  assert float(kd) == pytest.approx(ref.kd_torch(s["logits"], t["logits"], 4.0), rel=1e-5)
  fd = losses_lib.compose(losses_lib.build_terms({"feature_distill": {}}))(inputs)[0]
  assert float(fd) == pytest.approx(float(np.mean((s["features"] - t["features"]) ** 2)),
                                    rel=1e-5)
  at = losses_lib.compose(losses_lib.build_terms({"attention_transfer": {}}))(inputs)[0]
  acts = [k for k in s if k.startswith("activation/")]
  nchw = lambda a: a.transpose(0, 3, 1, 2)
  want = ref.at_loss_torch([nchw(s[k]) for k in acts], [nchw(t[k]) for k in acts])
  assert float(at) == pytest.approx(want, rel=1e-5)
  with pytest.raises(RegistryError, match="temperature"):
    losses_lib.build_terms({"logit_kd": dict(temperature=0.0)})


@pytest.mark.slow
def test_teacher_checkpoint_of_another_architecture_fails():
  from jaxrobust.models import get_model
  x = jnp.zeros((1, 8, 8, 3))
  student = get_model("wrn", num_classes=3, depth=10, width=1, cbam=True)
  other = get_model("wrn", num_classes=3, depth=10, width=1)
  vs = student.init(jax.random.PRNGKey(0), x, train=False)
  vo = other.init(jax.random.PRNGKey(0), x, train=False)
  spec = ad.student_modules("ckpt", {"name": "wrn", "kwargs": {"cbam": True}})
  with pytest.raises(Exception, match=r"(?s)config\.init_from.*cbam"):
    merge_pretrained(vs["params"], vs["batch_stats"], vo["params"], vo["batch_stats"],
                     reset_head=spec["teacher"]["init_from"]["reset_head"])
