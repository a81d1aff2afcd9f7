"""PyTorch ports of the models of Lee et al. 2018 (joint confidence loss).

Repository, at the commit read: CC -- ``alinlab/Confident_classifier``
462db01967f8a96374f2ab6a534b7c81fd872d2f (PyTorch 1.x code; run here on
PyTorch 2.x, which has the same semantics for every module used). The ports
keep the reference's module structure and ``state_dict`` names (``features.i``
/ ``classifier.i`` / ``main.i``), its initialisation and its forward passes;
what they leave out is cited: the ``ngpu`` data-parallel branch of the GAN
modules (single device here) and the discriminator's final ``view(-1, 1)``
(kept, it is the reference's output shape).

Used by ``tests/test_models_gan.py`` (layouts, parameter counts and forward
passes of :mod:`jaxrobust.models.vgg` and :mod:`jaxrobust.models.dcgan`
against these, through :mod:`jaxrobust.convert`) and available to a parity
test of the joint-confidence training step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: CC src/models/vgg.py:58-63, configuration 'B' (VGG-13).
CFG_B = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


# --- VGG-13 (CC src/models/vgg.py) ---------------------------------------------------------

class VGG(nn.Module):
  """vgg.py:9-43: ``features``, then the 512-512-K classifier with dropout."""

  def __init__(self, features: nn.Module, num_classes: int = 10):
    super().__init__()
    self.features = features
    self.classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
        nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
        nn.Linear(512, num_classes))
    self._initialize_weights()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x)
    x = x.view(x.size(0), -1)
    return self.classifier(x)

  def _initialize_weights(self) -> None:
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2. / n))
        if m.bias is not None:
          m.bias.data.zero_()
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.weight.data.normal_(0, 0.01)
        m.bias.data.zero_()


def make_layers(cfg, batch_norm: bool = False, in_channels: int = 3) -> nn.Sequential:
  """vgg.py:45-55 (``batch_norm=False``, ``in_channels=3``, as the reference
  has them); ``batch_norm=True`` is torchvision's ``make_layers`` option
  (conv, BatchNorm, ReLU), the layout of ``vgg13_bn``."""
  layers: list[nn.Module] = []
  for v in cfg:
    if v == "M":
      layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
      conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
      layers += ([conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm
                 else [conv2d, nn.ReLU(inplace=True)])
      in_channels = v
  return nn.Sequential(*layers)


def vgg13(num_classes: int = 10, batch_norm: bool = False) -> VGG:
  """vgg.py:65-71."""
  return VGG(make_layers(CFG_B, batch_norm), num_classes=num_classes)


# --- DCGAN (CC src/models/gan.py) ----------------------------------------------------------

def weights_init(m: nn.Module) -> None:
  """gan.py:11-17."""
  classname = m.__class__.__name__
  if classname.find("Conv") != -1:
    m.weight.data.normal_(0.0, 0.02)
  elif classname.find("BatchNorm") != -1:
    m.weight.data.normal_(1.0, 0.02)
    m.bias.data.fill_(0)


class NetD(nn.Module):
  """gan.py:19-46 (``_netD``), single device."""

  def __init__(self, nc: int, ndf: int):
    super().__init__()
    self.main = nn.Sequential(
        nn.Conv2d(nc, ndf * 2, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 4),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 8),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
        nn.Sigmoid())

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.main(x).view(-1, 1)


class NetG(nn.Module):
  """gan.py:48-76 (``_netG``), single device."""

  def __init__(self, nz: int, ngf: int, nc: int):
    super().__init__()
    self.main = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False),
        nn.Sigmoid())

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    return self.main(z)


def generator(nz: int = 100, ngf: int = 64, nc: int = 3) -> NetG:
  """gan.py:78-81 (``Generator(n_gpu, nz, ngf, nc)``; run_joint_confidence.py:63)."""
  model = NetG(nz, ngf, nc)
  model.apply(weights_init)
  return model


def discriminator(nc: int = 3, ndf: int = 64) -> NetD:
  """gan.py:83-86 (``Discriminator(n_gpu, nc, ndf)``; run_joint_confidence.py:64)."""
  model = NetD(nc, ndf)
  model.apply(weights_init)
  return model
