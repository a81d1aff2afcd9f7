"""Name -> model: ``get_model('wrn_40_2', num_classes=10)``,
``get_model('dcgan_generator', nz=100)``.

Models live in the project's one :class:`~jaxrobust.registry.Registry`
(:data:`MODELS`). A model is registered by decorating its linen Module class
(or any factory function) with :func:`register_model`; presets fix some
constructor arguments::

  @register_model("wrn")
  @register_model("wrn_40_2", depth=40, width=2)
  class WideResNet(ImageClassifier): ...

A model whose builder takes ``num_classes`` (every classifier) needs it in
:func:`get_model`; a model without classes (a GAN's generator or
discriminator, :func:`has_classes` is False) is built without it.
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
  """Decorator registering ``builder(num_classes=..., **kwargs)`` (a
  classifier) or ``builder(**kwargs)`` (a model without classes) under ``name``.

  Args:
    name: registry key; must be new.
    **preset: constructor arguments fixed by this name (e.g. ``depth=40``).
      Passing one of them again to :func:`get_model` is an error.

  Returns:
    A decorator that returns the builder unchanged, so it can be stacked.
  """
  def decorator(builder: _T) -> _T:
    MODELS.register(name, **preset)(builder)
    return builder

  return decorator


def has_classes(name: str) -> bool:
  """Whether the model ``name`` has classes (its builder takes
  ``num_classes``, which :func:`get_model` then requires).

  Raises:
    RegistryError: an unknown ``name``.
  """
  return "num_classes" in MODELS.options(name) + list(MODELS.preset(name))


def list_models() -> list[str]:
  """Sorted names accepted by :func:`get_model`."""
  return MODELS.names()


def get_model(name: str, *, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
  """Builds the registered model ``name`` (with ``num_classes`` outputs if it
  is a classifier).

  Args:
    name: one of :func:`list_models`.
    num_classes: size of the classifier ``head``; required for a model with
      classes, left out (None) for one without (:func:`has_classes`).
    **kwargs: other constructor arguments of that model (e.g. ``dropout_rate``,
      ``dtype``, ``bn_axis_name``, ``nz``).

  Raises:
    RegistryError: (a ``ValueError``) an unknown ``name`` (with the close matches
      and the available names), an argument the model does not take or one its
      preset fixes, ``num_classes`` missing or ``< 1`` for a classifier, or
      given to a model without classes.
  """
  if not has_classes(name):
    if num_classes is not None:
      raise RegistryError(f"model {name!r} has no classes; build it without num_classes "
                          f"(got num_classes={num_classes!r}).")
    return MODELS.build({"name": name, **kwargs})()
  if num_classes is None:
    raise RegistryError(f"model {name!r} is a classifier: get_model({name!r}, "
                        "num_classes=...) needs num_classes, the size of its head.")
  if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
      or num_classes < 1):
    raise RegistryError(f"num_classes must be a positive int, got {num_classes!r}.")
  build = MODELS.build({"name": name, **kwargs}, runtime=("num_classes",))
  return build(num_classes=int(num_classes))
