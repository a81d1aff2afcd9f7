"""Name -> model: ``get_model('wrn_40_2', num_classes=10)``.

Models live in the project's one :class:`~jaxrobust.registry.Registry`
(:data:`MODELS`). A model is registered by decorating its linen Module class
(or any factory function taking ``num_classes``) with :func:`register_model`;
presets fix some constructor arguments::

  @register_model("wrn")
  @register_model("wrn_40_2", depth=40, width=2)
  class WideResNet(ImageClassifier): ...
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, TypeVar

import flax.linen as nn

from jaxrobust.registry import Registry, RegistryError

_T = TypeVar("_T", bound=Callable[..., Any])

#: The models by name (:func:`register_model` adds one).
MODELS = Registry("model")


def register_model(name: str, **preset: Any) -> Callable[[_T], _T]:
  """Decorator registering ``builder(num_classes=..., **kwargs)`` under ``name``.

  Args:
    name: registry key; must be new.
    **preset: constructor arguments fixed by this name (e.g. ``depth=40``).
      Passing one of them again to :func:`get_model` is an error.

  Returns:
    A decorator that returns the builder unchanged, so it can be stacked.
  """
  def decorator(builder: _T) -> _T:
    MODELS.register(name, **preset)(builder)
    if "num_classes" not in MODELS.options(name) + list(MODELS.preset(name)):
      MODELS.unregister(name)
      raise RegistryError(f"model builder {builder.__name__} must take num_classes.")
    return builder

  return decorator


def list_models() -> list[str]:
  """Sorted names accepted by :func:`get_model`."""
  return MODELS.names()


def get_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the registered model ``name`` with ``num_classes`` outputs.

  Args:
    name: one of :func:`list_models`.
    num_classes: size of the classifier ``head``.
    **kwargs: other constructor arguments of that model (e.g. ``dropout_rate``,
      ``dtype``, ``bn_axis_name``).

  Raises:
    RegistryError: (a ``ValueError``) an unknown ``name`` (with the close matches
      and the available names), an argument the model does not take or one its
      preset fixes, or ``num_classes < 1``.
  """
  if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
      or num_classes < 1):
    raise RegistryError(f"num_classes must be a positive int, got {num_classes!r}.")
  build = MODELS.build({"name": name, **kwargs}, runtime=("num_classes",))
  return build(num_classes=int(num_classes))
