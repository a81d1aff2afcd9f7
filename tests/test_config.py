"""Config schema: unknown keys fail loudly, variants parse, bad values are named."""

import pytest
from ml_collections import config_flags

from configs import default
from jaxrobust import config as config_lib


def test_default_config_is_valid_and_embedded():
  c = default.get_config()
  config_lib.validate(c)
  assert c.data.name == "digits" and c.model.name == "small_cnn"


@pytest.mark.parametrize("arg", ["embedded", "glyphs", "cifar10", "cifar100", "smoke",
                                 "variant=cifar10,epochs=3", "cifar10,model=preact_resnet18"])
def test_variants_validate(arg):
  c = default.get_config(arg)
  config_lib.validate(c)


def test_cifar_variant_follows_the_paper_recipe():
  c = default.get_config("cifar10")
  assert (c.model.name, c.model.kwargs.depth, c.model.kwargs.width) == ("wrn", 40, 2)
  assert c.model.kwargs.dropout_rate == 0.3
  assert (c.optimizer.name, c.optimizer.nesterov, c.optimizer.momentum) == ("sgd", True, 0.9)
  assert (c.optimizer.learning_rate, c.optimizer.weight_decay,
          c.streams.train.batch_size) == (0.1, 5e-4, 128)
  assert c.optimizer.end_learning_rate == 1e-6 and c.num_epochs == 100
  assert c.streams.train.pp == "pad_crop(4)|flip"


def test_unknown_key_is_named_with_a_suggestion():
  c = default.get_config()
  c.optimiser = 1
  with pytest.raises(ValueError, match=r"optimiser \(did you mean 'optimizer"):
    config_lib.validate(c)
  c = default.get_config()
  c.optimizer.learnig_rate = 0.1
  with pytest.raises(ValueError, match="optimizer.learnig_rate.*optimizer.learning_rate"):
    config_lib.validate(c)


def test_unknown_variant_and_arg_are_errors():
  with pytest.raises(ValueError, match="unknown variant 'cifar11'"):
    default.get_config("cifar11")
  with pytest.raises(ValueError, match="unknown config arg 'epoch'.*'epochs'"):
    default.get_config("epoch=3")


@pytest.mark.parametrize("key, value, pattern", [
    ("parallelism", "pjit", "parallelism"),
    ("streams.train.batch_size", 0, r"streams.train.batch_size must be positive"),
    ("streams.train.views", 0, r"streams.train.views must be >= 1"),
    ("data.std", (0.0,), "std must be positive"),
    ("optimizer.learning_rate", -0.1, "optimizer.learning_rate must be >= 0"),
    ("optimizer.weight_decay", -1.0, "optimizer.weight_decay must be >= 0"),
])
def test_bad_values_are_named(key, value, pattern):
  c = default.get_config()
  *path, last = key.split(".")
  target = c
  for p in path:
    target = target[p]
  target[last] = value
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate(c)


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.streams.update({"outliers": {"split": "test"}}),
     r"streams.outliers.data: name the dataset"),
    (lambda c: c.streams.update({"outliers": {"data": "blobs/gray", "augment": True}}),
     r"streams.outliers has unknown key\(s\) \['augment'\]"),
    (lambda c: c.updates.update({"d": {"module": "disc", "losses": ("cross_entropy",)}}),
     r"updates.d.module='disc': no such module"),
    (lambda c: c.updates.update({"u": {"module": "classifier", "losses": ("ce",)}}),
     r"updates.u.losses: 'ce' is not a loss term"),
    (lambda c: c.updates.update({"u": {"streams": ("outlier",), "losses": ("cross_entropy",)}}),
     r"updates.u.streams: no stream 'outlier'"),
    (lambda c: c.modules.update({"probe": {"model": {"nam": "small_cnn"}}}),
     r"modules.probe.model has unknown key\(s\) \['nam'\] \(did you mean 'name'"),
    (lambda c: c.constants.update({"C": "runs/x/C.npz"}), "constants are artifact references"),
    (lambda c: c.evaluators.update({"rob": {"attacks": {}}}), r"evaluators.rob needs a 'type'"),
])
def test_bad_structure_is_named(edit, pattern):
  c = default.get_config()
  edit(c)
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate(c)


def test_unused_loss_terms_with_explicit_updates_are_an_error():
  c = default.get_config()
  c.losses.extra = {"name": "cross_entropy", "label_smoothing": 0.1}
  c.updates.main = {"module": "classifier", "losses": ("cross_entropy",)}
  with pytest.raises(ValueError, match=r"config.losses \['extra'\] are not used"):
    config_lib.validate(c)


def _parse(argv):
  from absl import flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", "configs/default.py", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides():
  c = _parse(["prog", "--config=configs/default.py:smoke", "--config.optimizer.learning_rate=0.3",
              "--config.model.kwargs.stage_widths=((8,), (16,))"])
  assert c.optimizer.learning_rate == 0.3 and c.num_steps == 6
  assert tuple(map(tuple, c.model.kwargs.stage_widths)) == ((8,), (16,))


def test_command_line_override_of_unknown_key_fails():
  with pytest.raises(AttributeError, match='Did you mean "learning_rate"'):
    _parse(["prog", "--config.optimizer.learnig_rate=0.1"])
