"""One registry for everything a config names: loss terms, scores, pp ops,
perturbations, samplers, index lists, label sources, stage tasks, evaluators,
models and sharding rules.

Each kind of thing has one :class:`Registry` instance, defined in the module
that consumes it (``losses.LOSSES``, ``scores.SCORES``, ``data.pp.OPS``, ...).
Functions register themselves by name::

    @SCORES.register("energy")
    def energy(logits, temperature=1.0): ...

and configs name them with a *spec*: a bare name (``"energy"``), a call
(``"energy(temperature=1000)"``, ``"pad_crop(4)"``, ``"fgsm(eps=8/255)"``) or a
mapping ``{"name": "energy", "temperature": 1000}``. :meth:`Registry.build`
parses the spec, checks its arguments against the function's signature (so a
misspelt option fails before anything is compiled) and returns the function
with them bound. Spec values are Python literals plus arithmetic on numbers
(``8/255``, ``2**-4``); strings are quoted (``"subset(indices='artifact:a/b')"``).

Unknown names raise :class:`RegistryError` (a ``ValueError``) listing what is
registered and the closest matches (:func:`suggest`, the one "did you mean"
helper of the project).

**Methods are found by name, on demand.** The engine imports no method
module. When a registry is asked for a name it does not hold (or for the list
of its names), it first imports the method modules -- every module of the
package ``jaxrobust.methods``, then the modules other packages declare under
the entry-point group ``jaxrobust.methods`` -- and looks again: a method
registers its hooks when its module is imported. So ``stages.run``,
``scores.build``, ``losses.build_terms`` and the other Python entry points see
every method without anything importing them by name, and a package of one's
own methods joins by declaring, in its ``pyproject.toml``::

    [project.entry-points."jaxrobust.methods"]
    my_methods = "my_package.methods"
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import logging
import operator
import pkgutil
from importlib import metadata
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["Registry", "RegistryError", "Spec", "load_methods", "parse_spec", "suggest"]

#: The package whose every module is a method.
METHOD_PACKAGE = "jaxrobust.methods"
#: The entry-point group under which other packages declare method modules.
ENTRY_POINT_GROUP = "jaxrobust.methods"
_methods_loaded = False
log = logging.getLogger("jaxrobust")


def load_methods() -> None:
  """Imports every method module once (see the module docstring): the
  modules of :data:`METHOD_PACKAGE`, then the ``jaxrobust.methods`` entry
  points of installed packages."""
  global _methods_loaded
  if _methods_loaded:
    return
  _methods_loaded = True
  package = importlib.import_module(METHOD_PACKAGE)
  for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
    if not info.name.startswith("_"):
      importlib.import_module(f"{METHOD_PACKAGE}.{info.name}")
  for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
    try:
      entry.load()
    except Exception as e:  # noqa: BLE001 -- a broken plugin must not stop the run
      log.warning("could not load the jaxrobust methods of %s (%s): %s", entry.name,
                  entry.value, e)


class RegistryError(ValueError):
  """An unknown name or a bad argument in a spec."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
  """`` (did you mean 'a', 'b'?)`` for the closest ``choices``, or ``''``."""
  close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n)
  return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed spec: ``name(*args, **kwargs)``."""
  name: str
  args: tuple[Any, ...] = ()
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
    return f"{self.name}({', '.join(parts)})" if parts else self.name


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
           ast.Mod: operator.mod}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _value(node: ast.AST, text: str) -> Any:
  """A literal, a container of literals, or arithmetic on numbers."""
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, (ast.Tuple, ast.List)):
    return tuple(_value(e, text) for e in node.elts)
  if isinstance(node, ast.Dict):
    return {_value(k, text): _value(v, text) for k, v in zip(node.keys, node.values)}
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _UNARY[type(node.op)](_number(node.operand, text))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
    return _BINOPS[type(node.op)](_number(node.left, text), _number(node.right, text))
  raise RegistryError(
      f"spec {text!r}: {ast.unparse(node)!r} is not a literal (quote strings: "
      f"name='value'; numbers may use + - * / **).")


def _number(node: ast.AST, text: str) -> Any:
  v = _value(node, text)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise RegistryError(f"spec {text!r}: arithmetic on a non-number {v!r}.")
  return v


def parse_spec(spec: Any) -> Spec:
  """``"name"``, ``"name(a, k=v)"`` or ``{"name": ..., **kwargs}`` -> :class:`Spec`."""
  if isinstance(spec, Spec):
    return spec
  if isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
    d = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    if "name" not in d:
      raise RegistryError(f"spec {d!r} has no 'name'.")
    name = d.pop("name")
    return Spec(str(name), (), {k: _plain(v) for k, v in d.items()})
  if not isinstance(spec, str) or not spec.strip():
    raise RegistryError(f"a spec must be a name, 'name(k=v, ...)' or a mapping; got {spec!r}.")
  text = spec.strip()
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError:
    raise RegistryError(f"spec {text!r} is not of the form name or name(arg, key=value, ...)."
                        ) from None
  if isinstance(node, ast.Name):
    return Spec(node.id)
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    args = tuple(_value(a, text) for a in node.args)
    kwargs = {}
    for kw in node.keywords:
      if kw.arg is None:
        raise RegistryError(f"spec {text!r}: **kwargs are not allowed.")
      kwargs[kw.arg] = _value(kw.value, text)
    return Spec(node.func.id, args, kwargs)
  raise RegistryError(f"spec {text!r} is not of the form name or name(arg, key=value, ...).")


def _plain(v: Any) -> Any:
  """ConfigDicts and lists inside a mapping spec -> dicts and tuples."""
  if hasattr(v, "to_dict"):
    return v.to_dict()
  if isinstance(v, list):
    return tuple(_plain(x) for x in v)
  return v


@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: Callable[..., Any]
  preset: Mapping[str, Any]
  info: Mapping[str, Any]


class Registry:
  """Name -> function (or class) for one kind of configurable thing.

  Args:
    kind: what is registered, for messages ("loss term", "OOD score", ...).
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, _Entry] = {}

  def register(self, name: str, *, info: Mapping[str, Any] | None = None,
               **preset: Any) -> Callable[[Any], Any]:
    """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged.

    ``preset`` fixes keyword arguments for this name (``wrn_40_2`` is ``wrn``
    with ``depth=40, width=2``); ``info`` is free metadata for the consumer
    (e.g. a loss term's constant shapes).
    """
    def deco(fn):
      if name in self._entries:
        raise RegistryError(f"{self.kind} {name!r} is already registered.")
      params = _parameters(fn)
      unknown = [k for k in preset if params is not None and k not in params]
      if unknown:
        raise RegistryError(f"preset {name!r} sets unknown argument(s) {unknown} of "
                            f"{getattr(fn, '__name__', fn)}.")
      self._entries[name] = _Entry(fn, dict(preset), dict(info or {}))
      return fn
    return deco

  def unregister(self, name: str) -> None:
    """Removes ``name`` (for tests and interactive sessions)."""
    self._entries.pop(name, None)

  def names(self) -> list[str]:
    """Every registered name, the methods' included."""
    load_methods()
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    if name not in self._entries:
      load_methods()
    return name in self._entries

  def _entry(self, name: str, where: str) -> _Entry:
    if name not in self._entries:
      load_methods()
    if name not in self._entries:
      at = f"{where}: " if where else ""
      raise RegistryError(
          f"{at}unknown {self.kind} {name!r}{suggest(name, self._entries)}; known: "
          f"{', '.join(self.names()) or '(none)'}.")
    return self._entries[name]

  def get(self, name: str, where: str = "") -> Callable[..., Any]:
    """The registered function itself (preset not applied)."""
    return self._entry(name, where).fn

  def info(self, name: str, where: str = "") -> Mapping[str, Any]:
    return self._entry(name, where).info

  def preset(self, name: str, where: str = "") -> Mapping[str, Any]:
    return self._entry(name, where).preset

  def options(self, name: str, runtime: Sequence[str] = ()) -> list[str]:
    """The arguments a spec may set for ``name`` (not the runtime ones)."""
    entry = self._entry(name, "")
    params = _parameters(entry.fn) or {}
    return [p for p in params if p not in runtime and p not in entry.preset]

  def options_with_defaults(self, bound: Callable[..., Any]) -> dict[str, Any]:
    """Every option of a :meth:`build` result: the defaults, then what the spec set."""
    params = _parameters(self._entries[bound.spec_name].fn) or {}
    out = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(bound.keywords)
    return out

  def resolve(self, spec: Any, *, where: str = "", runtime: Sequence[str] = ()
              ) -> tuple[Spec, dict[str, Any]]:
    """(parsed spec, keyword arguments it binds, preset included), checked.

    ``runtime`` names the leading parameters the consumer passes at call time
    (``ctx``, ``rng``, ``logits``, ...); a spec may not set them. Positional
    spec arguments fill the remaining parameters in order.
    """
    parsed = parse_spec(spec)
    entry = self._entry(parsed.name, where)
    params = _parameters(entry.fn)
    at = f"{where}: " if where else ""
    kwargs = dict(parsed.kwargs)
    if params is None:  # *args/**kwargs callable: nothing to check
      if parsed.args:
        raise RegistryError(f"{at}{self.kind} {parsed.name!r} takes no positional arguments.")
      return parsed, {**entry.preset, **kwargs}
    free = [p for p in params if p not in runtime and p not in entry.preset]
    if len(parsed.args) > len(free):
      raise RegistryError(f"{at}{self.kind} {parsed.name!r} takes at most {len(free)} "
                          f"argument(s) ({', '.join(free)}); got {len(parsed.args)}.")
    for p, a in zip(free, parsed.args):
      if p in kwargs:
        raise RegistryError(f"{at}{self.kind} {parsed.name!r}: {p!r} given twice.")
      kwargs[p] = a
    fixed = [k for k in kwargs if k in entry.preset]
    if fixed:
      raise RegistryError(f"{at}{self.kind} {parsed.name!r} fixes {fixed} (preset "
                          f"{dict(entry.preset)}).")
    bad = [k for k in kwargs if k not in free]
    if bad and not _takes_var_keyword(entry.fn):
      raise RegistryError(
          f"{at}{self.kind} {parsed.name!r} got unknown option(s) {bad}"
          f"{suggest(bad[0], free)}; it takes: {', '.join(free) or '(nothing)'}.")
    missing = [p for p, prm in params.items()
               if p not in runtime and p not in kwargs and p not in entry.preset
               and prm.default is inspect.Parameter.empty]
    if missing:
      raise RegistryError(f"{at}{self.kind} {parsed.name!r} needs {missing}.")
    return parsed, {**entry.preset, **kwargs}

  def build(self, spec: Any, *, where: str = "", runtime: Sequence[str] = ()
            ) -> Callable[..., Any]:
    """The registered function with the spec's arguments bound
    (``functools.partial``); call it with the ``runtime`` arguments."""
    parsed, kwargs = self.resolve(spec, where=where, runtime=runtime)
    fn = self._entries[parsed.name].fn
    bound = functools.partial(fn, **kwargs)
    bound.spec_name = parsed.name  # type: ignore[attr-defined]
    return bound

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {self.names()})"


def _takes_var_keyword(fn: Callable[..., Any]) -> bool:
  try:
    sig = inspect.signature(fn.__init__ if isinstance(fn, type) else fn)
  except (TypeError, ValueError):
    return True
  return any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
  """Named parameters of a function or class constructor; None if it takes
  ``*args``/``**kwargs`` only in a way that cannot be checked."""
  target = fn
  if isinstance(fn, type):
    if dataclasses.is_dataclass(fn):
      return {f.name: inspect.Parameter(
          f.name, inspect.Parameter.KEYWORD_ONLY,
          default=(inspect.Parameter.empty if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING else f.default))
              for f in dataclasses.fields(fn) if f.init and f.name not in ("parent", "name")}
    target = fn.__init__
  try:
    sig = inspect.signature(target)
  except (TypeError, ValueError):
    return None
  params = {n: p for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
  if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()) and not params:
    return None
  return params
