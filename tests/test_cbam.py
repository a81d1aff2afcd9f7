"""CBAM: against a torch port of Jongchan/attention-module, and as an option of the residual models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.models import get_model
from jaxrobust.models.cbam import CBAM
from jaxrobust.modules import Module
from tests import reference_arcface as ref


@pytest.mark.parametrize("train,momentum", [(False, 0.99), (True, 0.99), (True, 0.9)])
def test_cbam_matches_torch_port(train, momentum):
  """Flax's decay ``momentum`` is PyTorch's ``1 - momentum`` (0.99: the reference's 0.01)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 6, 5, 32)).astype(np.float32)
  mod = CBAM(momentum=momentum)
  variables = mod.init(jax.random.PRNGKey(1), jnp.asarray(x), False)
  params = jax.tree.map(np.asarray, variables["params"])
  stats = {"mean": rng.normal(size=(1,)).astype(np.float32),
           "var": rng.uniform(0.5, 2, size=(1,)).astype(np.float32)}
  v = {"params": params, "batch_stats": {"spatial_bn": stats}}
  assert params["channel_fc1"]["kernel"].shape == (32, 2)  # reduction 16
  assert params["spatial_conv"]["kernel"].shape == (7, 7, 2, 1)
  if train:
    (y, maps), new = mod.apply(v, jnp.asarray(x), True, mutable=["batch_stats"])
  else:
    y, maps = mod.apply(v, jnp.asarray(x), False)
  want_y, want_c, want_s, run_mean, run_var = ref.cbam_torch(x, {**params, "stats": stats},
                                                             train=train, momentum=1 - momentum)
  np.testing.assert_allclose(np.asarray(y), want_y, atol=1e-5)
  np.testing.assert_allclose(np.asarray(maps["channel"]), want_c, atol=1e-5)
  np.testing.assert_allclose(np.asarray(maps["spatial"]), want_s, atol=1e-4)
  if train:  # BatchNorm2d(momentum=1 - momentum) running averages
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["spatial_bn"]["mean"]), run_mean,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["spatial_bn"]["var"]), run_var,
                               rtol=1e-5)


@pytest.mark.parametrize("name,kwargs,blocks", [
    ("wrn", dict(depth=10, width=1), ["group1_block1", "group2_block1", "group3_block1"]),
    pytest.param("preact_resnet18", {}, ["stage1_block1", "stage4_block2"],
                 marks=pytest.mark.slow),
])
@pytest.mark.slow
def test_cbam_option_keeps_default_tree_and_exposes_maps(name, kwargs, blocks):
  x = jnp.zeros((2, 16, 16, 3))
  plain = get_model(name, num_classes=3, **kwargs)
  with_cbam = get_model(name, num_classes=3, cbam=True, **kwargs)
  p0 = jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x, train=False))
  p1 = jax.eval_shape(lambda: with_cbam.init(jax.random.PRNGKey(0), x, train=False))
  flat = lambda t: {"/".join(str(k.key) for k in path): v.shape
                    for path, v in jax.tree_util.tree_leaves_with_path(t)}
  f0, f1 = flat(p0), flat(p1)
  assert not any("cbam" in k for k in f0)  # default: the tree is unchanged
  assert {k: v for k, v in f1.items() if "cbam" not in k} == f0
  module = Module(name="m", model=with_cbam, num_classes=3, input_shape=(16, 16, 3),
                  mean=(0.5,) * 3, std=(0.5,) * 3, tx=None, schedule=None)
  variables = dict(zip(("params", "batch_stats"), module.init(jax.random.PRNGKey(0))))
  out, _ = module.apply_outputs(variables, jnp.full((2, 16, 16, 3), 0.3), train=False)
  assert out["logits"].shape == (2, 3)
  for b in blocks:
    c, s = out[f"attention/{b}/channel"], out[f"attention/{b}/spatial"]
    assert c.ndim == 2 and c.shape[0] == 2 and s.shape[-1] == 1 and s.ndim == 4
  assert out[f"attention/{blocks[0]}/spatial"].shape[1:3] == (16, 16)


@pytest.mark.slow
def test_models_pass_cbam_momentum_to_every_block():
  """``cbam_momentum`` reaches each block's spatial BatchNorm: from zero running means, one
  train-mode step leaves ``(1 - momentum) * batch mean``, so 0.5 gives 50x the default 0.99's."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  means = {}
  for m in (0.99, 0.5):
    model = get_model("wrn", num_classes=3, depth=10, width=1, cbam=True, cbam_momentum=m)
    v = model.init(jax.random.PRNGKey(0), x, train=False)
    _, new = model.apply(v, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.PRNGKey(1)})
    means[m] = {k: np.asarray(b["cbam"]["spatial_bn"]["mean"])
                for k, b in new["batch_stats"].items() if "cbam" in b}
  assert len(means[0.5]) == 3
  for k, v in means[0.99].items():
    np.testing.assert_allclose(means[0.5][k], 50 * v, rtol=1e-4)


@pytest.mark.parametrize("name", ["wrn", "preact_resnet18", "resnet50"])
def test_models_reject_cbam_momentum_out_of_range(name):
  model = get_model(name, num_classes=3, cbam=True, cbam_momentum=1.5)
  with pytest.raises(ValueError, match=r"config.model.kwargs.cbam_momentum\) must be a float in"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                      train=False))


def test_recipe_rejects_cbam_momentum_out_of_range():
  from configs.recipes import attention_distill
  with pytest.raises(ValueError, match="cbam_momentum must be in"):
    attention_distill.get_config("cbam_momentum=1.5")
  c = attention_distill.get_config("cbam_momentum=0.9")
  assert c.model.kwargs.cbam_momentum == 0.9


@pytest.mark.slow
def test_resnet50_cbam_maps():
  m = get_model("resnet50", num_classes=4, cbam=True)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: m.init_with_output(jax.random.PRNGKey(0), x, train=False,
                                                     return_features=True)[0])
  assert shapes[2]["attention/layer4_block3/channel"].shape == (1, 2048)
  assert shapes[2]["attention/layer1_block1/spatial"].shape == (1, 8, 8, 1)
