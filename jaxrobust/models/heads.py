"""Extra named heads on any model's penultimate features.

A model of the zoo has one classifier, ``head``. Some methods need more
outputs from the same trunk: joint training (Zoph et al. 2020) adds a head for
the source task's classes, SimCLR (Chen et al. 2020) a projection head for the
contrastive loss. ``config.model.heads`` names them, each a spec of
:data:`HEADS`::

    config.model.heads = {'proj': 'mlp(features=128, hidden=0, layers=2)',
                          'source': 'linear(features=62)'}

:class:`WithHeads` wraps the model with ``nn.share_scope``, so the model's own
parameters keep their paths (``stem/...``, ``head/...``: checkpoints of the
bare model load unchanged) and the extra heads live under ``heads/<name>/``;
``init_from.skip='heads/.*'`` drops them when fine-tuning (SimCLR's projection
head is discarded after pre-training). The wrapped model returns
``(logits, features, {name: output})``.

Heads:

* ``linear(features)``: one Dense layer, PyTorch ``nn.Linear`` init (as the
  zoo's ``head``).
* ``mlp(features, hidden=0, layers=2, batch_norm=False)``: ``layers - 1``
  hidden Dense + (BatchNorm) + ReLU blocks of width ``hidden`` (0: the input
  width) and a last Dense of ``features`` -- SimCLR v1's projection head is
  ``mlp(128, layers=2)`` (Dense-ReLU-Dense); v2's uses three layers with
  BatchNorm (``layers=3, batch_norm=True``).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax

from jaxrobust.models.layers import batch_norm, torch_linear_bias_init, torch_linear_init
from jaxrobust.registry import Registry, RegistryError

#: Extra heads on the features (``config.model.heads``) by name.
HEADS = Registry("head")
PREFIX = "heads"  # parameter paths heads/<name>/... (WithHeads' attribute name)
OUTPUT = "head:"  # output keys head:<name> next to 'logits' and 'features'


class LinearHead(nn.Module):
  """The ``linear`` head: one Dense layer with PyTorch's ``nn.Linear`` init."""
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return nn.Dense(self.features, dtype=self.dtype, kernel_init=torch_linear_init,
                    bias_init=torch_linear_bias_init(x.shape[-1]), name="dense")(x)


class MLPHead(nn.Module):
  """The ``mlp`` head: ``layers - 1`` Dense (+ BatchNorm) + ReLU blocks, then a Dense."""
  features: int
  hidden: int = 0
  layers: int = 2
  batch_norm: bool = False
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = self.hidden or x.shape[-1]
    for i in range(self.layers - 1):
      x = nn.Dense(width, dtype=self.dtype, kernel_init=torch_linear_init,
                   use_bias=not self.batch_norm, name=f"dense{i}")(x)
      if self.batch_norm:
        x = batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name, name=f"bn{i}")(x)
      x = nn.relu(x)
    return nn.Dense(self.features, dtype=self.dtype, kernel_init=torch_linear_init,
                    bias_init=torch_linear_bias_init(x.shape[-1]),
                    name=f"dense{self.layers - 1}")(x)


def _check_features(features: int) -> None:
  if isinstance(features, bool) or int(features) != features or features < 1:
    raise RegistryError(f"features must be a positive integer, got {features!r}.")


@HEADS.register("linear")
def linear(features: int) -> dict[str, Any]:
  """One Dense layer to ``features`` outputs."""
  _check_features(features)
  return {"cls": LinearHead, "features": int(features)}


@HEADS.register("mlp")
def mlp(features: int, hidden: int = 0, layers: int = 2, batch_norm: bool = False
        ) -> dict[str, Any]:
  """``layers`` Dense layers (ReLU between, optional BatchNorm) to ``features``."""
  _check_features(features)
  if int(layers) != layers or layers < 1 or hidden < 0:
    raise RegistryError(f"mlp: layers must be >= 1 and hidden >= 0, got layers={layers!r}, "
                        f"hidden={hidden!r}.")
  return {"cls": MLPHead, "features": int(features), "hidden": int(hidden),
          "layers": int(layers), "batch_norm": bool(batch_norm)}


def build_specs(heads: Mapping[str, Any], where: str = "config.model.heads"
                ) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
  """``{name: spec}`` -> a hashable description of every head (checked)."""
  out = []
  for name, spec in sorted(dict(heads or {}).items()):
    if not name.isidentifier():
      raise RegistryError(f"{where}: head name {name!r} must be an identifier.")
    desc = HEADS.build(spec, where=f"{where}.{name}")()
    out.append((name, tuple(sorted(desc.items(), key=lambda kv: kv[0]))))
  return tuple(out)


class _Heads(nn.Module):
  specs: tuple
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool) -> dict[str, jax.Array]:
    out = {}
    for name, desc in self.specs:
      d = dict(desc)
      cls = d.pop("cls")
      extra = {"bn_axis_name": self.bn_axis_name} if cls is MLPHead else {}
      out[name] = cls(dtype=self.dtype, name=name, **d, **extra)(features, train)
    return out


class WithHeads(nn.Module):
  """``model`` plus the extra heads of ``specs`` (see the module docstring)."""
  model: nn.Module
  specs: tuple

  def setup(self):
    nn.share_scope(self, self.model)
    self.heads = _Heads(self.specs, dtype=getattr(self.model, "dtype", None),
                        bn_axis_name=getattr(self.model, "bn_axis_name", None))

  def __call__(self, x: jax.Array, *, train: bool, return_features: bool = False):
    out = self.model(x, train=train, return_features=True)
    logits, features = out[:2]
    outputs = {**self.heads(features, train), **(out[2] if len(out) == 3 else {})}
    if not return_features:
      return logits
    return logits, features, outputs
