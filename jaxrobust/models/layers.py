"""Building blocks shared by the model zoo (PyTorch-equivalent defaults).

The reference implementations of the reproduced papers are PyTorch, so the
layers here default to PyTorch's conventions:

* convolutions are bias-free and initialised ``normal(0, sqrt(2 / fan_out))``
  with ``fan_out = k * k * out_channels`` (the WRN code of Hendrycks et al. and
  torchvision's ``kaiming_normal_(mode='fan_out')`` are the same rule);
* padding is explicit and symmetric (``k // 2`` on each side), as in PyTorch;
  XLA's ``'SAME'`` differs for stride-2 convolutions on even inputs;
* BatchNorm uses PyTorch's ``momentum=0.1`` (flax ``momentum=0.9``) and
  ``eps=1e-5``, scale 1, bias 0, and updates the running variance with the
  unbiased batch variance as PyTorch does (flax's ``nn.BatchNorm`` uses the
  biased one: a factor n/(n-1), n = batch * height * width, e.g. 1 + 1.2e-4
  for the last WRN group at batch 128) -- :class:`BatchNorm`;
* the classifier is an ``nn.Dense`` named ``head`` with PyTorch's
  ``nn.Linear`` weight init, ``uniform(+-1/sqrt(fan_in))``.

EfficientNet (:mod:`jaxrobust.models.efficientnet`) follows its TensorFlow
reference instead and passes its own padding, BatchNorm constants and head
init to these helpers.

Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth")
has one implementation here, :func:`drop_path` / :class:`StochasticDepth`,
used by every residual model of the zoo, and one per-block rule,
:func:`stochastic_depth_rate` (Noisy Student's / EfficientNet's).

Every model in :mod:`jaxrobust.models` shares the attributes of
:class:`ImageClassifier` and the call signature
``model.apply(variables, x, train=..., return_features=False)``.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch default init of nn.Conv2d weights in the reference WRN/ResNet code.
torch_conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch default init of nn.Linear weights: kaiming_uniform(a=sqrt(5)).
torch_linear_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> jax.nn.initializers.Initializer:
  """PyTorch default ``nn.Linear`` bias init, ``uniform(+-1/sqrt(fan_in))``."""
  bound = 1.0 / (fan_in ** 0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype,
         name: str | None = None) -> nn.Conv:
  """Bias-free ``kernel x kernel`` conv with PyTorch padding and init."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 kernel_init=torch_conv_init, name=name)


RUNNING_VARIANCES = ("unbiased", "biased")
_ROW_MASKS: list[jax.Array] = []


@contextlib.contextmanager
def batch_norm_rows(mask: jax.Array | None) -> Iterator[None]:
  """Inside, every :class:`BatchNorm` in train mode computes its batch
  statistics (and updates its running averages) over the rows where
  ``mask`` (``[B]`` bool) is set, as if only those rows had been fed: several
  separate forward passes over subsets of one static-shape batch, as the
  reference code runs on variable-size subsets (GLC's gold and silver rows).
  A mask with no row set leaves the running averages unchanged and
  normalises with mean 0 and variance 1. Read when the model is traced (a
  trace-time setting, like a flax ``apply`` argument)."""
  if mask is None:
    yield
    return
  _ROW_MASKS.append(mask)
  try:
    yield
  finally:
    _ROW_MASKS.pop()


class BatchNorm(nn.Module):
  """BatchNorm over all but the last axis, PyTorch's semantics by default.

  The arithmetic of ``flax.linen.BatchNorm(use_fast_variance=False)``
  (statistics in float32 or wider, the two-pass variance ``E[(x − E[x])²]``,
  ``pmean`` over ``axis_name``; the same ``scale``/``bias`` parameters and
  ``mean``/``var`` batch statistics, so checkpoints are interchangeable) --
  not flax's default one-pass ``E[x²] − E[x]²``, which cancels
  catastrophically in float32 when a channel's mean is large next to its
  spread (step-0 gradients of a WRN up to 10% off the float64 ones, where
  PyTorch's two-pass ones are within 3e-6; the parity tier measures it) --
  plus:

  * ``running_variance='unbiased'`` (PyTorch's ``nn.BatchNorm2d``): the
    running variance is updated with the unbiased batch variance ``var · n /
    (n − 1)``, ``n`` the number of values per channel (batch × height ×
    width, all devices); normalisation always uses the biased one. ``'biased'``
    is flax's and TensorFlow's ``tf.nn.moments`` rule.
  * row masks (:func:`batch_norm_rows`).

  ``momentum`` is flax's: ``running = momentum · running + (1 − momentum) ·
  batch`` (PyTorch's 0.1 is 0.9 here).
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = None
  axis_name: str | None = None
  scale_init: jax.nn.initializers.Initializer = nn.initializers.ones
  running_variance: str = "unbiased"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.running_variance not in RUNNING_VARIANCES:
      raise ValueError(f"running_variance must be one of {RUNNING_VARIANCES}, got "
                       f"{self.running_variance!r}.")
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                            (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                           (features,))
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var, n = self._batch_stats(x)
      if not self.is_initializing():
        unbiased = (var * (n / jnp.maximum(n - 1, 1)) if self.running_variance == "unbiased"
                    else var)
        m = self.momentum
        seen = n > 0
        ra_mean.value = jnp.where(seen, m * ra_mean.value + (1 - m) * mean, ra_mean.value)
        ra_var.value = jnp.where(seen, m * ra_var.value + (1 - m) * unbiased, ra_var.value)
    y = x - mean
    y = y * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return jnp.asarray(y, self.dtype if self.dtype is not None
                       else jnp.result_type(x, scale, bias))

  def _batch_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, biased variance, values per channel) of this batch."""
    stat_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
    xf = x.astype(stat_dtype)
    axes = tuple(range(x.ndim - 1))
    axis_name = None if self.is_initializing() else self.axis_name
    per_row = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
    rows = _ROW_MASKS[-1] if _ROW_MASKS else None
    if rows is None:
      n = jnp.asarray(x.shape[0] * per_row, stat_dtype)
      mu = xf.mean(axes)
      if axis_name is not None:
        mu = jax.lax.pmean(mu, axis_name)
        n = n * jax.lax.psum(1, axis_name)
      var = jnp.square(xf - mu).mean(axes)
      if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
      return mu, var, n
    w = rows.astype(stat_dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    n = rows.astype(stat_dtype).sum() * per_row
    total = (w * xf).sum(axes)
    if axis_name is not None:
      total, n = jax.lax.psum((total, n), axis_name)
    safe = jnp.maximum(n, 1)
    mu = jnp.where(n > 0, total / safe, 0.0)
    sq = (w * jnp.square(xf - mu)).sum(axes)
    if axis_name is not None:
      sq = jax.lax.psum(sq, axis_name)
    return mu, jnp.where(n > 0, sq / safe, 1.0), n


def batch_norm(train: bool, *, dtype: Dtype, axis_name: str | None,
               scale_init: jax.nn.initializers.Initializer = nn.initializers.ones,
               momentum: float = 0.9, epsilon: float = 1e-5, running_variance: str = "unbiased",
               name: str | None = None) -> BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5, the running
  variance updated with the unbiased batch variance): :class:`BatchNorm`.

  In train mode it normalises with the batch statistics and updates the
  running averages in the ``batch_stats`` collection; ``axis_name`` makes the
  batch statistics a mean over that pmap/shard_map axis. ``momentum`` is
  flax's (and TensorFlow's): ``running = momentum * running + (1 - momentum)
  * batch``, so PyTorch's 0.1 is 0.9 here.
  """
  return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                   dtype=dtype, axis_name=axis_name, scale_init=scale_init,
                   running_variance=running_variance, name=name)


def check_images(x: jax.Array, model: str) -> None:
  """Raises if ``x`` is not a batch of NHWC floating-point images."""
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects NHWC images of rank 4 [batch, height, width, channels]; "
        f"got shape {tuple(x.shape)} (rank {x.ndim}).")
  _, h, _, c = x.shape
  if c > 4 and h <= 4:
    raise ValueError(
        f"{model} expects NHWC images but got shape {tuple(x.shape)}, which looks "
        "like NCHW (channels second). Transpose with x.transpose(0, 2, 3, 1).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{model} expects floating-point images normalised by the input pipeline; "
        f"got dtype {x.dtype}.")


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 and VALID padding (``nn.max_pool(x, (2, 2),
  strides=(2, 2))``), written as a reshape and a max.

  The forward values are identical. The gradient of ``nn.max_pool`` is XLA's
  select-and-scatter, which on XLA:CPU costs more than the rest of a small
  CNN's backward pass (71 ms vs 6 ms on a [64, 32, 32, 32] batch); the
  reduction's gradient is fast everywhere. Only ties differ: a reduce-max
  splits the gradient between tied maxima, select-and-scatter gives it to the
  first.
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def classify(features: jax.Array, num_classes: int, *, dtype: Dtype,
             return_features: bool, bias_init=nn.initializers.zeros,
             kernel_init=torch_linear_init, dropout_rate: float = 0.0,
             train: bool = False):
  """Applies the ``head`` Dense layer; logits (and features) come back as >= float32.

  Must be called from inside a model's compact ``__call__`` so that the Dense
  is created as the model's submodule ``head``. ``dropout_rate > 0`` applies
  dropout (``'dropout'`` rng, train mode only) to the head's input; the
  returned features are the ones before dropout.
  """
  head_input = features
  if dropout_rate > 0:
    head_input = nn.Dropout(dropout_rate, deterministic=not train)(features)
  logits = nn.Dense(num_classes, dtype=dtype, kernel_init=kernel_init,
                    bias_init=bias_init, name="head")(head_input)
  upcast = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))
  if return_features:
    return upcast(logits), upcast(features)
  return upcast(logits)


def check_rate(value: float, name: str, model: str) -> None:
  """Raises ``ValueError`` unless ``0 <= value < 1`` (a dropout-like rate)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not 0.0 <= value < 1.0):
    raise ValueError(f"{model} {name} must be a float in [0, 1), got {value!r}.")


def stochastic_depth_rate(rate: float, index: int, num_blocks: int) -> float:
  """Drop rate of residual block ``index`` (0-based) of ``num_blocks``:
  ``rate * index / num_blocks``.

  This is the rule of the Noisy Student / EfficientNet reference
  (``efficientnet_model.py``: ``drop_rate *= float(idx) / len(self._blocks)``):
  it grows linearly with depth, the first block is never dropped and the last
  one is dropped with ``rate * (num_blocks - 1) / num_blocks`` (0.1875 for
  EfficientNet-B0's 16 blocks at ``rate=0.2``, 0.1889 for WRN-40-2's 18).
  Huang et al. 2016 instead use ``rate * (index + 1) / num_blocks`` (exactly
  ``rate`` at the last block); the zoo uses the Noisy Student rule everywhere
  so that ``stochastic_depth_rate`` means the same in every model.
  """
  return rate * index / num_blocks


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Per-example stochastic depth: zeroes ``x[i]`` with probability ``rate``
  and scales the kept examples by ``1 / (1 - rate)``, so the expectation is
  ``x`` (identity at eval time, as in the reference ``utils.stochastic_depth``).

  ``x`` is a residual branch ``[batch, ...]``; one Bernoulli draw per example.
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class StochasticDepth(nn.Module):
  """:func:`drop_path` in train mode (``'dropout'`` rng), identity otherwise.

  Attributes:
    rate: probability of dropping the branch of one example, in [0, 1).
      ``rate == 0`` returns the input unchanged and draws no random numbers.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    check_rate(self.rate, "rate", "StochasticDepth")
    if deterministic or self.rate == 0.0:
      return x
    return drop_path(x, self.rate, self.make_rng("dropout"))


class ImageClassifier(nn.Module):
  """Attributes common to every model of the zoo.

  Attributes:
    num_classes: size of the ``head`` output.
    dtype: computation dtype (e.g. ``jnp.bfloat16`` on TPU). Parameters and
      batch statistics stay float32; logits and features are returned in
      float32 (or ``dtype`` if wider, e.g. float64 under x64).
    bn_axis_name: axis name given to every ``nn.BatchNorm`` so that a pmap (or
      shard_map) step averages batch statistics across devices. Leave ``None``
      under global-view ``jax.jit`` with the batch sharded over a mesh: the
      batch mean there is already global.
  """
  num_classes: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None


def conv_and_bn(module: nn.Module, train: bool):
  """``(conv, batch_norm)`` bound to ``module.dtype`` and ``module.bn_axis_name``."""
  return (functools.partial(conv, dtype=module.dtype),
          functools.partial(batch_norm, train, dtype=module.dtype,
                            axis_name=module.bn_axis_name))


class PreActBasicBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016; the ``BasicBlock`` of WRN).

  BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus the input, or, when
  the shape changes, a 1x1 conv (stride) of the *pre-activated* input.
  ``drop_rate > 0`` applies :class:`StochasticDepth` to the residual branch
  (the conv path; the shortcut is always kept) in train mode. ``attention``
  (a module class such as :class:`~jaxrobust.models.cbam.CBAM`, called as
  ``attention(dtype=, bn_axis_name=, name='cbam')(y, train) -> (y, maps)``)
  refines the branch before the addition (parameters under ``cbam/``) and the
  block returns ``(out, attention maps)``.
  """
  features: int
  stride: int
  dropout_rate: float
  dtype: Dtype
  bn_axis_name: str | None
  drop_rate: float = 0.0
  attention: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv, bn = conv_and_bn(self, train)
    preact = nn.relu(bn(name="bn1")(x))
    y = conv(self.features, 3, self.stride, name="conv1")(preact)
    y = nn.relu(bn(name="bn2")(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, name="conv2")(y)
    maps = None
    if self.attention is not None:
      y, maps = self.attention(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                               name="cbam")(y, train)
    if self.drop_rate > 0:
      y = StochasticDepth(self.drop_rate, name="stochastic_depth")(y, deterministic=not train)
    if x.shape[-1] == self.features and self.stride == 1:
      out = x + y
    else:
      out = conv(self.features, 1, self.stride, name="shortcut")(preact) + y
    return out if maps is None else (out, maps)
