"""Model zoo (flax linen): ``get_model(name, num_classes=...)``.

Every classifier is an ``nn.Module`` called as
``model.apply(variables, images_nhwc, train=bool, return_features=False)`` and
returns logits ``[B, num_classes]`` (float32, or wider if ``dtype`` is wider),
or ``(logits, features)`` with the penultimate, globally pooled embedding. The
classifier is always the submodule ``head`` (``params['head']``), so fine-tuning
can replace it for a new number of classes. Variables are ``params`` and
``batch_stats``; dropout uses the ``'dropout'`` rng.

Registered names: ``wrn`` (``depth``, ``width``, ``dropout_rate``),
``wrn_40_2``, ``wrn_28_10``, ``preact_resnet18``, ``resnet50``, ``small_cnn``,
``efficientnet`` (``width_coefficient``, ``depth_coefficient``),
``efficientnet_b0``, ``efficientnet_b1``, ``efficientnet_b2``, ``vgg13``,
``vgg13_bn``, ``cmt`` (``variant``, ``stem_stride``), ``cmt_ti``, ``cmt_xs``,
``cmt_s``, ``cmt_b``, ``cmt_ti_32``. The residual models take ``stochastic_depth_rate`` (0 by default
except EfficientNet's 0.2 and CMT's reference rates).

Models without classes are built without ``num_classes``
(:func:`~jaxrobust.models.registry.has_classes`), take the same call
signature and return a dict of named outputs: ``dcgan_generator`` (noise ->
``{'images'}``) and ``dcgan_discriminator`` (images -> ``{'score'}``, a
logit), the GAN of Lee et al. 2018 (:mod:`jaxrobust.models.dcgan`).
"""

from jaxrobust.models.cmt import CMT
from jaxrobust.models.dcgan import DCGANDiscriminator, DCGANGenerator
from jaxrobust.models.efficientnet import EfficientNet
from jaxrobust.models.layers import ImageClassifier
from jaxrobust.models.registry import get_model, has_classes, list_models, register_model
from jaxrobust.models.resnet import PreActResNet18, ResNet50
from jaxrobust.models.small_cnn import SmallCNN
from jaxrobust.models.vgg import VGG
from jaxrobust.models.wide_resnet import WideResNet

__all__ = ["CMT", "VGG", "DCGANDiscriminator", "DCGANGenerator", "EfficientNet", "ImageClassifier",
           "PreActResNet18", "ResNet50", "SmallCNN", "WideResNet", "get_model", "has_classes", "list_models",
           "register_model"]
