"""Released PyTorch checkpoints into jaxrobust (jaxrobust.pretrained.from_torch):
the converted WRN-40-2 (hendrycks wrn.py, tests/parity/torch_reference.py)
and ResNet-50 (torchvision resnet.py, tests/reference_torchvision.py) give
PyTorch's eval-mode logits and penultimate features from random weights with
measured BatchNorm statistics; the three file formats read the same arrays;
bad files and other architectures are one clear error naming the key."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from configs.recipes import ood as ood_recipe  # noqa: E402
from jaxrobust import checkpoint as ckpt_lib  # noqa: E402
from jaxrobust import convert, pretrained  # noqa: E402
from jaxrobust.models import get_model  # noqa: E402
from parity import torch_reference as ref  # noqa: E402

import reference_torchvision as tv  # noqa: E402

RTOL = 1e-4


def _inputs(n: int, seed: int = 0) -> np.ndarray:
  """Normalised inputs (the CIFAR normalisation of [0, 1] pixels)."""
  x = np.random.default_rng(seed).uniform(size=(n, 32, 32, 3)).astype(np.float32)
  return (x - np.float32(ood_recipe.CIFAR_MEAN)) / np.float32(ood_recipe.CIFAR_STD)


def _torch_outputs(net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  with torch.no_grad():
    logits, features = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                           return_features=True)
  return logits.numpy(), features.numpy()


def _flax_outputs(model, params, stats, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))
  logits, features = fn({"params": params, "batch_stats": stats}, x)
  return np.asarray(logits), np.asarray(features)


def _close(got: np.ndarray, want: np.ndarray) -> None:
  scale = np.abs(want).max()
  assert scale > 1e-2  # not a degenerate network
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


@pytest.fixture(scope="module")
def wrn():
  """A WRN-40-2 (10 classes) with random weights, its BatchNorm statistics
  measured on other inputs, eval mode; its state_dict saved by torch."""
  torch.manual_seed(0)
  net = ref.WideResNet(40, 10, 2)
  with torch.no_grad():
    net.fc.bias.normal_(0, 0.1)
  tv.calibrate_batch_norm(net, torch.from_numpy(_inputs(64, seed=1).transpose(0, 3, 1, 2).copy()))
  return net


def test_wrn_40_2_matches_pytorch(wrn, tmp_path):
  sd = wrn.state_dict()
  assert len(sd) == len(convert.wrn_layout(40, 2, 10)) == 227 and "block1.layer.0.convShortcut.weight" in sd
  assert float(sd["block2.layer.3.bn1.running_var"].std()) > 0.1  # statistics far from 1
  path = tmp_path / "cifar10_wrn_pretrained_epoch_99.pt"
  torch.save(sd, path)
  model = get_model("wrn_40_2", num_classes=10)
  params, stats = pretrained.from_torch(path, model=model)
  x = _inputs(4)
  want_logits, want_features = _torch_outputs(wrn, x)
  logits, features = _flax_outputs(model, params, stats, x)
  assert features.shape == (4, 128)
  _close(features, want_features)
  _close(logits, want_logits)


@pytest.mark.parametrize("fmt", ["pt_legacy", "npz", "safetensors", "wrapped", "dataparallel"])
def test_every_format_reads_the_same_arrays(wrn, tmp_path, fmt):
  sd = {k: v.clone() for k, v in wrn.state_dict().items()}
  want = pretrained.from_torch(sd, model=get_model("wrn_40_2", num_classes=10))
  if fmt == "pt_legacy":  # PyTorch 0.4's format, which the released snapshots use
    path = tmp_path / "model.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
  elif fmt == "wrapped":
    path = tmp_path / "model.pth"
    torch.save({"epoch": 99, "state_dict": sd}, path)
  elif fmt == "dataparallel":
    path = tmp_path / "model.pth.tar"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
  else:
    path = tmp_path / f"model.{fmt}"
    convert.write_state_dict(path, {k: v.numpy() for k, v in sd.items()})
  got = pretrained.from_torch(str(path), model=get_model("wrn_40_2", num_classes=10))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), got, want)
  # init_from, predict and evaluate read the file directly (load_pretrained).
  direct = ckpt_lib.load_pretrained(str(path))
  jax.tree.map(np.testing.assert_array_equal, direct, want)


def test_safetensors_reader_follows_the_format(tmp_path):
  """A file written by hand from the format's description (huggingface/
  safetensors README: u64 header size, JSON header, little-endian buffer)."""
  a = np.arange(6, dtype="<f4").reshape(2, 3)
  b = np.array([-1, 7], "<i8")
  bf16 = np.array([0x3F80, 0xC000], "<u2")  # 1.0, -2.0 in bfloat16
  header = {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
            "c": {"dtype": "BF16", "shape": [2], "data_offsets": [40, 44]}}
  text = json.dumps(header).encode()
  path = tmp_path / "x.safetensors"
  path.write_bytes(len(text).to_bytes(8, "little") + text + a.tobytes() + b.tobytes()
                   + bf16.tobytes())
  out = convert.read_state_dict(path)
  np.testing.assert_array_equal(out["a"], a)
  np.testing.assert_array_equal(out["b"], b)
  np.testing.assert_array_equal(out["c"], np.float32([1.0, -2.0]))
  # The writer's files read back (and its header is 8-byte aligned).
  convert.write_safetensors(tmp_path / "y.safetensors", {"a": a, "b": b})
  raw = (tmp_path / "y.safetensors").read_bytes()
  assert int.from_bytes(raw[:8], "little") % 8 == 0
  back = convert.read_state_dict(tmp_path / "y.safetensors")
  np.testing.assert_array_equal(back["a"], a)
  np.testing.assert_array_equal(back["b"], b)


def test_wrong_architecture_or_shape_is_one_error_naming_the_key(wrn, tmp_path):
  wrn10 = get_model("wrn_40_2", num_classes=10)
  sd = wrn.state_dict()
  # A CIFAR-100 head for a CIFAR-10 model.
  bad = dict(sd, **{"fc.weight": torch.zeros(100, 128), "fc.bias": torch.zeros(100)})
  with pytest.raises(ValueError, match=r"from_torch: .*shape mismatch: fc.weight: got "
                     r"\(100, 128\), expected \(10, 128\)"):
    pretrained.from_torch(bad, model=wrn10)
  # A WRN-16-2 for a WRN-40-2.
  small = {k: v for k, v in sd.items() if not k.startswith(("block1.layer.2", "block1.layer.3",
                                                            "block1.layer.4", "block1.layer.5"))}
  with pytest.raises(ValueError, match=r"missing key\(s\) \['block1.layer.2.bn1.weight'"):
    pretrained.from_torch(small, model=wrn10)
  # A ResNet-50 state_dict for a WRN.
  r50 = tv.ResNet50(10).state_dict()
  with pytest.raises(ValueError, match=r"the state_dict is a 'resnet50' model \(its first key "
                     r"'conv1.weight'\), the model a 'wrn' \(WideResNet\)"):
    pretrained.from_torch(r50, model=wrn10)
  # A model without a PyTorch layout.
  with pytest.raises(ValueError, match="no PyTorch layout for a SmallCNN"):
    pretrained.from_torch(sd, model=get_model("small_cnn", num_classes=10))
  # Files: missing, not a state_dict, pickled code (refused by weights_only).
  with pytest.raises(FileNotFoundError, match="config.init_from.path: no file"):
    ckpt_lib.load_pretrained(str(tmp_path / "missing.pt"))
  torch.save(wrn, tmp_path / "whole_module.pt")  # a pickled nn.Module, not a state_dict
  with pytest.raises(ValueError, match=r"weights_only=True\) failed"):
    convert.read_state_dict(tmp_path / "whole_module.pt")
  torch.save([1, 2], tmp_path / "list.pt")
  with pytest.raises(ValueError, match="holds a list, not a state_dict"):
    convert.read_state_dict(tmp_path / "list.pt")
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(ValueError, match=r"not a state_dict of a known architecture .*'weights'"):
    ckpt_lib.load_pretrained(str(tmp_path / "other.npz"))
  with pytest.raises(ValueError, match="has no steps"):
    ckpt_lib.load_pretrained(str(tmp_path / "other.npz"), step=3)


def test_init_from_fine_tunes_from_an_imagenet32_checkpoint(wrn, tmp_path):
  """hendrycks/pre-training's ImageNet-32 WRN-40-2 (1000 classes) into a
  CIFAR-10 model: the trunk is copied, the head left fresh."""
  torch.manual_seed(1)
  src = ref.WideResNet(40, 1000, 2)
  path = tmp_path / "imagenet_wrn_baseline_epoch_99.pt"
  torch.save(src.state_dict(), path, _use_new_zipfile_serialization=False)
  model = get_model("wrn_40_2", num_classes=10)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                        train=False))
  v = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), v)  # "fresh" values: zeros
  src_p, src_s = ckpt_lib.load_pretrained(str(path))
  params, stats, reset = pretrained.merge_pretrained(v["params"], v["batch_stats"], src_p, src_s)
  assert sorted(reset) == ["head/bias", "head/kernel"]
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["stem"]["kernel"],
                                src.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["bn"]["var"], src.bn1.running_var.numpy())


def test_ood_recipe_evaluates_a_checkpoint_with_every_detector():
  from jaxrobust import config as config_lib
  from jaxrobust import scores, stages
  import jaxrobust.methods  # noqa: F401 -- registers every score
  c = ood_recipe.get_config("cifar10,checkpoint=/ckpt/cifar10_wrn_pretrained_epoch_99.pt")
  config_lib.validate(c)
  plan = stages.stage_configs(c)
  assert [(n, t) for n, (t, _, _) in plan.items()] == [("import", "import_torch"),
                                                      ("scores", "evaluate")]
  assert plan["import"][1]["path"] == "/ckpt/cifar10_wrn_pretrained_epoch_99.pt"
  scored = plan["scores"][2]
  # Every score the library ships (tests and docs may register more), and every post-hoc
  # detector among them.
  from jaxrobust.methods import posthoc
  shipped = {"msp", "max_logit", "entropy", "energy", "odin", "mahalanobis", *posthoc.DETECTORS}
  assert set(scored.evaluators.ood.scores) == shipped <= set(scores.SCORES.names())
  assert len(scored.evaluators.ood.scores) == 22
  # energy_ood / outlier-exposure CIFAR/test.py normalisation; HPT's with norm=half.
  np.testing.assert_allclose(scored.data.mean, [0.4914, 0.4824, 0.4467], atol=1e-4)
  np.testing.assert_allclose(scored.data.std, [0.2471, 0.2435, 0.2616], atol=1e-4)
  half = ood_recipe.get_config("cifar100,checkpoint=x.pt,norm=half")
  assert tuple(half.data.mean) == (0.5,) * 3 and half.model.kwargs.depth == 40
  assert scored.evaluators.ood.preset == "energy"
  with pytest.raises(ValueError, match="takes no mode"):
    ood_recipe.get_config("cifar10,checkpoint=x.pt,mode=oe_ft")
  with pytest.raises(ValueError, match="norm must be one of"):
    ood_recipe.get_config("cifar10,checkpoint=x.pt,norm=imagenet")
  with pytest.raises(ValueError, match="give checkpoint= too"):
    ood_recipe.get_config("cifar10,norm=half")


@pytest.mark.slow
def test_resnet50_matches_pytorch(tmp_path):
  torch.manual_seed(0)
  net = tv.ResNet50(num_classes=10)
  tv.calibrate_batch_norm(net, torch.from_numpy(_inputs(16, seed=1).transpose(0, 3, 1, 2).copy()))
  sd = net.state_dict()
  assert len(sd) == 320
  convert.write_state_dict(tmp_path / "resnet50.safetensors", {k: v.numpy() for k, v in sd.items()})
  model = get_model("resnet50", num_classes=10)
  params, stats = pretrained.from_torch(os.fspath(tmp_path / "resnet50.safetensors"), model=model)
  x = _inputs(2)
  want_logits, want_features = _torch_outputs(net, x)
  logits, features = _flax_outputs(model, params, stats, x)
  assert features.shape == (2, 2048)
  _close(features, want_features)
  _close(logits, want_logits)


@pytest.mark.slow
def test_import_torch_then_evaluate_as_stages(tmp_path, data_dir):
  """import_torch writes a checkpoint the evaluate stage scores; a state_dict
  of another width fails at the import stage, naming the stage's key."""
  from configs import default
  from jaxrobust import stages
  c = default.get_config("embedded")
  c.data.data_dir = str(data_dir)
  c.model.name, c.model.kwargs = "wrn", {"depth": 10, "width": 1}
  c.plots, c.progress_bar = False, False
  c.evaluators.classification.splits = ("test",)
  c.evaluators.ood.sets = {"blobs": "blobs/gray:validation"}
  c.evaluators.ood.scores = ("msp", "knn(k=5)", "vim")
  model = get_model("wrn", num_classes=10, depth=10, width=1)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 1)), train=False))
  rng = np.random.default_rng(0)
  fill = lambda a: rng.normal(size=a.shape).astype(np.float32)
  params, stats = jax.tree.map(fill, v["params"]), jax.tree.map(lambda a: 1 + fill(a) ** 2,
                                                                   v["batch_stats"])
  torch.save({k: torch.from_numpy(np.array(a)) for k, a in
              convert.to_torch(params, stats, arch="wrn").items()}, tmp_path / "m.pt")
  c.stages = {"import": {"task": "import_torch", "path": str(tmp_path / "m.pt")},
              "scores": {"task": "evaluate", "checkpoint": "artifact:import/checkpoint"}}
  results = stages.run(c, str(tmp_path / "run"))
  assert results["import/classifier/num_arrays"] == 46 - 7  # 7 BatchNorms: no num_batches_tracked
  assert 0.0 <= results["scores/ood/knn/blobs/fpr95"] <= 1.0
  back = ckpt_lib.load_pretrained(str(tmp_path / "run" / "import"))
  np.testing.assert_array_equal(back[0]["head"]["kernel"], params["head"]["kernel"])
  np.testing.assert_array_equal(back[1]["bn"]["var"], stats["bn"]["var"])
  wide = get_model("wrn", num_classes=10, depth=10, width=2)
  w = jax.eval_shape(lambda: wide.init(jax.random.key(0), np.zeros((1, 32, 32, 1)), train=False))
  convert.write_state_dict(tmp_path / "wide.npz", convert.to_torch(
      jax.tree.map(fill, w["params"]), jax.tree.map(fill, w["batch_stats"]), arch="wrn"))
  c.stages = {"import": {"task": "import_torch", "path": str(tmp_path / "wide.npz")}}
  with pytest.raises(ValueError, match=r"config.stages.import.path: .*unexpected key\(s\) "
                     r"\['block1.layer.0.convShortcut.weight'\], shape mismatch: "
                     r"block1.layer.0.conv1.weight: got \(32, 16, 3, 3\), expected \(16, 16, 3, 3\)"):
    stages.run(c, str(tmp_path / "run2"))
