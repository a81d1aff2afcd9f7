"""jaxrobust.convert without torch: layouts, round trips, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import convert
from jaxrobust.models import get_model


def _random_tree(name, shape, **kwargs):
  model = get_model(name, num_classes=10, **kwargs)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  rng = np.random.default_rng(0)
  fill = lambda s: rng.normal(size=s.shape).astype(np.float32)
  return jax.tree.map(fill, v["params"]), jax.tree.map(fill, v["batch_stats"]), v["params"]


@pytest.mark.parametrize("name, kwargs, arch, shape, count", [
    ("wrn", dict(depth=10, width=1), "wrn", (1, 32, 32, 3), 46),
    ("wrn", dict(depth=16, width=2), "wrn", (1, 32, 32, 3), 83),
    ("resnet50", {}, "resnet50", (1, 32, 32, 3), 320),  # torchvision's len(state_dict())
])
def test_round_trip(name, kwargs, arch, shape, count):
  params, stats, template = _random_tree(name, shape, **kwargs)
  sd = convert.to_torch(params, stats, arch=arch)
  assert len(sd) == count
  back_p, back_s = convert.from_torch(sd, arch=arch)
  jax.tree.map(np.testing.assert_array_equal, back_p, params)
  jax.tree.map(np.testing.assert_array_equal, back_s, stats)
  back_p, _ = convert.from_torch(sd, arch=arch, params_template=template)
  jax.tree.map(np.testing.assert_array_equal, back_p, params)
  # DataParallel checkpoints: a 'module.' prefix on every key.
  jax.tree.map(np.testing.assert_array_equal,
               convert.from_torch({f"module.{k}": v for k, v in sd.items()}, arch=arch)[0], params)


def test_wrn_names_and_conventions():
  params, stats, _ = _random_tree("wrn", (1, 32, 32, 3), depth=16, width=2)
  sd = convert.to_torch(params, stats, arch="wrn")
  g = params["group1_block1"]
  np.testing.assert_array_equal(sd["block1.layer.0.conv1.weight"],
                                g["conv1"]["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
  np.testing.assert_array_equal(sd["block1.layer.0.convShortcut.weight"],
                                g["shortcut"]["kernel"].transpose(3, 2, 0, 1))
  assert "block1.layer.1.convShortcut.weight" not in sd  # identity shortcut
  np.testing.assert_array_equal(sd["fc.weight"], params["head"]["kernel"].T)
  np.testing.assert_array_equal(sd["bn1.running_var"], stats["bn"]["var"])
  np.testing.assert_array_equal(sd["bn1.weight"], params["bn"]["scale"])
  assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["bn1.num_batches_tracked"] == 0
  # num_batches_tracked is optional on import (PyTorch 0.4.0 checkpoints lack it).
  convert.from_torch({k: v for k, v in sd.items() if "num_batches" not in k}, arch="wrn")


def test_resnet50_torchvision_names():
  params, stats, _ = _random_tree("resnet50", (1, 32, 32, 3))
  sd = convert.to_torch(params, stats, arch="resnet50")
  assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
  assert sd["layer4.2.bn3.running_var"].shape == (2048,)
  assert sd["fc.weight"].shape == (10, 2048) and sd["conv1.weight"].shape == (64, 3, 7, 7)
  assert "layer1.1.downsample.0.weight" not in sd


def test_errors_name_the_key():
  params, stats, template = _random_tree("wrn", (1, 32, 32, 3), depth=10, width=1)
  sd = convert.to_torch(params, stats, arch="wrn")
  with pytest.raises(ValueError, match=r"missing key\(s\) \['block2.layer.0.bn2.running_mean'\]"):
    convert.from_torch({k: v for k, v in sd.items() if k != "block2.layer.0.bn2.running_mean"},
                       arch="wrn")
  with pytest.raises(ValueError, match=r"unexpected key\(s\) \['extra.weight'\]"):
    convert.from_torch({**sd, "extra.weight": np.zeros(3)}, arch="wrn")
  bad = dict(sd, **{"fc.bias": np.zeros(11, np.float32)})
  with pytest.raises(ValueError, match=r"shape mismatch: fc.bias: got \(11,\), expected \(10,\)"):
    convert.from_torch(bad, arch="wrn")
  big, _, _ = _random_tree("wrn", (1, 32, 32, 3), depth=10, width=2)
  with pytest.raises(ValueError, match="shape mismatch: conv1.weight|shape mismatch"):
    convert.from_torch(convert.to_torch(big, _random_tree("wrn", (1, 32, 32, 3), depth=10,
                                                          width=2)[1], arch="wrn"),
                       arch="wrn", params_template=template)
  with pytest.raises(ValueError, match="missing key 'fc.weight'|missing key"):
    r50, r50s, _ = _random_tree("resnet50", (1, 32, 32, 3))
    convert.from_torch(convert.to_torch(r50, r50s, arch="resnet50"), arch="wrn")
  with pytest.raises(ValueError, match="unexpected key"):
    extra = dict(params, probe={"kernel": np.zeros((2, 2))})
    convert.to_torch(extra, stats, arch="wrn")
  with pytest.raises(ValueError, match="unknown arch 'vit'"):
    convert.to_torch(params, stats, arch="vit")
