"""Lee et al. (2018)'s recipe: the reference's defaults and the checks on its arguments."""

import pytest

from configs.recipes import confidence_gan
from jaxrobust import config as config_lib


@pytest.mark.parametrize("variant, beta, batch, model", [
    ("cifar10", 0.1, 64, "vgg13"), ("svhn", 1.0, 128, "vgg13"), ("embedded", 1.0, 64, "small_cnn")])
def test_variants_carry_the_reference_defaults(variant, beta, batch, model):
  c = confidence_gan.get_config(f"{variant},mode=joint")
  config_lib.validate(c)
  joint = c.stages.joint.config
  assert joint.losses.confidence.weight == joint.losses.generated_confidence.weight == beta
  assert c.streams.train.batch_size == joint.streams.fake.batch_size == batch
  assert c.model.name == model
  assert joint.streams.fake.noise == "normal(100)"
  assert c.optimizer.name == "adam"
  assert c.optimizer.learning_rate == (3e-3 if variant == "embedded" else 2e-4)
  assert c.optimizer.b1 == 0.9 and joint.modules.generator.optimizer.b1 == 0.5
  assert c.optimizer.weight_decay == 0.0
  assert c.optimizer.step_epochs == (0.6 * c.num_epochs,)  # epoch 60 of 100
  assert tuple(c.data.mean) == (0.0,) * len(c.data.mean) and set(c.data.std) == {1.0}
  width = 32 if variant == "embedded" else 64
  assert joint.modules.generator.model.kwargs.ngf == joint.modules.discriminator.model.kwargs.ndf == width
  order = config_lib.order(joint.updates, "updates", total=True)
  assert list(order) == ["discriminator", "generator", "classifier"]
  assert joint.updates.classifier.fresh_noise == ("fake",)


def test_compare_judges_the_generator_on_a_separately_trained_embedding():
  c = confidence_gan.get_config()
  assert set(c.stages) == {"ce", "confidence", "joint", "gan"}
  assert c.stages.gan.embedding == "artifact:ce/checkpoint"
  assert c.stages.gan.checkpoint == "artifact:joint/checkpoint"
  assert "letters" in c.evaluators.ood.sets and c.evaluators.ood.preset == "lee"


@pytest.mark.parametrize("arg, message", [
    ("beta=-0.5", "must be >= 0"), ("variant=mnist", "unknown variant"), ("mode=gan", "mode must")])
def test_bad_arguments_are_one_clear_error(arg, message):
  with pytest.raises(ValueError, match=message):
    confidence_gan.get_config(arg)
