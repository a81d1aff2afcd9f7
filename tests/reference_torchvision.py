"""A PyTorch port of torchvision's ResNet-50 (torchvision is not installed
here), for the checkpoint-conversion tests.

Follows ``pytorch/vision`` ``torchvision/models/resnet.py`` (``Bottleneck``,
``ResNet._make_layer``, ``ResNet._forward_impl``; v0.17): the "v1.5" layout
with the stride on the 3x3 conv, ``downsample = Sequential(conv1x1, BN)``,
7x7/2 stem, 3x3/2 max-pool (padding 1), adaptive average pool, ``fc``. Module
names are torchvision's, so ``state_dict()`` has its 320 keys.
``forward(x, return_features=True)`` also returns the pooled 2048-d features
(the input of ``fc``).
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet50(nn.Module):

  def __init__(self, num_classes: int = 1000, in_channels: int = 3):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(64, 3)
    self.layer2 = self._make_layer(128, 4, stride=2)
    self.layer3 = self._make_layer(256, 6, stride=2)
    self.layer4 = self._make_layer(512, 3, stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * 4, num_classes)

  def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * 4:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride,
                                           bias=False), nn.BatchNorm2d(planes * 4))
    layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * 4
    layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x: torch.Tensor, return_features: bool = False):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    features = torch.flatten(self.avgpool(x), 1)
    logits = self.fc(features)
    return (logits, features) if return_features else logits


def calibrate_batch_norm(net: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
  """Random BatchNorm affine parameters, then running statistics measured
  on ``x`` (cumulative averages, ``momentum=None``) -- realistic, far from
  the initial 0 / 1 -- and eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.reset_running_stats()
        m.momentum = None
    net.train()
    net(x)
    # Off the batch's own statistics: the eval-mode pass then differs from a train-mode one.
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.mul_(0.8 + 0.4 * torch.rand(m.running_var.shape, generator=g))
  return net.eval()
