"""Numpy ports of the validation OOD transforms of hendrycks/outlier-exposure
``CIFAR/test.py`` (``--validate``, lines 307-419), for golden-value tests.

Each works on one CHW float image in [0, 1] (torchvision ``ToTensor``), with
the reference's index expressions kept literally (torch ``cat`` -> numpy
``concatenate``, ``index_select(2, reversed)`` -> ``[:, :, ::-1]``); the
random draws are passed in, since the reference draws from torch / numpy's
global state. ``pixelate`` is Pillow itself (the reference resizes the PIL
image), so it is tested against ``PIL.Image.resize`` directly.
"""

from __future__ import annotations

import numpy as np


def jigsaw(x):  # CIFAR/test.py:377-382
  cat = np.concatenate
  return cat((
      cat((cat((x[:, 8:16, :16], x[:, :8, :16]), 1),
           x[:, 16:, :16]), 2),
      cat((x[:, 16:, 16:],
           cat((x[:, :16, 24:], x[:, :16, 16:24]), 2)), 2),
  ), 1)


def speckle(x, randn):  # CIFAR/test.py:391, randn = torch.randn_like(x)
  return np.clip(x + x * randn, 0, 1)


def rgb_shift(x):  # CIFAR/test.py:407-408
  return np.concatenate((x[1:2][:, :, ::-1], x[2:, :, :], x[0:1, :, :]), 0)


def invert(x):  # CIFAR/test.py:415
  return np.concatenate((x[0:1, :, :], 1 - x[1:2, :, ], 1 - x[2:, :, :],), 0)


def avg_of_pair(dataset, i, random_idx):  # CIFAR/test.py:320-325 (AvgOfPair.__getitem__)
  return dataset[i] / 2. + dataset[random_idx] / 2.


def geom_mean_of_pair(dataset, i, random_idx):  # CIFAR/test.py:353-358
  return np.sqrt(dataset[i] * dataset[random_idx])


def random_partner(rng, n, i):  # CIFAR/test.py:321-323
  random_idx = rng.choice(n)
  while random_idx == i:
    random_idx = rng.choice(n)
  return random_idx
