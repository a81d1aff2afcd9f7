"""Input-saliency maps of a classifier: plain gradient, gradient × input and
guided back-propagation (Springenberg et al. 2015), as in the interpretability
figure of Lee et al. (ICLR 2018, confidence-calibrated classifiers).

Convention: ``fn(apply_fn, x, target) -> [B, H, W, C]`` for a function
``apply_fn(x) -> logits [B, K]`` (fixed variables, eval mode: e.g.
:meth:`jaxrobust.modules.Module.logits_fn` with ``train=False``), images ``x``
``[B, H, W, C]`` (floating) and integer classes ``target`` ``[B]``. Row ``i``
of the map is the derivative of the **target logit** ``logits[i, target[i]]``
(not of a softmax probability or a loss) with respect to ``x[i]``, in the
space ``x`` is given in (pixels for :meth:`~jaxrobust.modules.Module.logits_fn`,
which normalises inside). All rows are computed by one backward pass of
``sum_i logits[i, target[i]]``, which equals the per-example gradients
because the logits of row ``i`` depend only on ``x[i]`` in an eval-mode model
(BatchNorm with its running statistics). There is no per-example mask: rows
are independent, so padding rows only cost compute, and their maps can be
dropped. A model that mixes rows (BatchNorm in train mode) would mix the maps.

All three functions are jittable (``jax.jit(functools.partial(guided_backprop,
apply_fn))``) and check their arguments' shapes and dtypes while tracing; a
target outside ``[0, K)`` is an error when ``target`` is concrete (called
eagerly) and gives a zero map under ``jit``.

**How guided back-propagation replaces the ReLUs.** ``jax.nn.relu`` (which is
``flax.linen.relu``, the same object) is a ``custom_jvp`` function around a
jitted ``max(x, 0)``. :func:`with_guided_relus` traces ``apply_fn`` to a
jaxpr and re-evaluates it with every such ReLU call replaced by
:func:`guided_relu` (same forward values; a ``custom_vjp`` whose backward pass
keeps the incoming gradient only where both the ReLU's input and that
gradient are positive). It recurses into ``jit``, ``remat``/``checkpoint``,
``cond``, ``scan`` and ``while`` bodies. Rewriting the traced program rather
than substituting ``jax.nn.relu`` in a context manager catches every ReLU
however the model refers to it: ``nn.relu``, ``jax.nn.relu``,
``from jax.nn import relu``, a module attribute whose default is ``nn.relu``
(bound when the class was defined, out of reach of a substitution), a
``jax.jit``-compiled ``apply_fn`` whose trace is cached (a substitution would
silently reuse the cached, unguided trace); and it changes no global state, so
nothing needs undoing and threads are unaffected. Limits:

* A bare ``jnp.maximum(x, 0)`` is only rewritten with ``bare_maximum=True``:
  flax's ``LayerNorm``/``GroupNorm`` compute ``max(0, variance)``, which must
  keep its ordinary gradient. ``jnp.where(x > 0, x, 0)``, ``x * (x > 0)``,
  ``relu6``, ``leaky_relu``, ``gelu``, ``swish`` and other activations are
  left as they are (EfficientNet, with swish, gets plain gradients).
* A ReLU inside another function with its own custom derivative
  (``custom_jvp``/``custom_vjp``) keeps that function's rule.
* Any other higher-order primitive whose body holds a ReLU is an error
  (``NotImplementedError``) rather than an unguided map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

Array = jax.Array

__all__ = ["gradient_times_input", "guided_backprop", "guided_relu", "input_gradients",
           "with_guided_relus"]


# ----------------------------------------------------------------------------- guided ReLU

def guided_relu(x: Array) -> Array:
  """``max(x, 0)`` whose backward pass is guided back-propagation's:
  ``g · [x > 0] · [g > 0]`` for an incoming gradient ``g`` (only positive
  gradients reach positive inputs; Springenberg et al. 2015)."""
  return _guided_relu(x)


def _relu(x):
  return jax.lax.max(x, jnp.zeros_like(x))


@jax.custom_vjp
def _guided_relu(x):
  return _relu(x)


def _guided_relu_fwd(x):
  return _relu(x), x


def _guided_relu_bwd(x, g):
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


# ----------------------------------------------------------------------------- jaxpr rewrite

_INLINE = (prims.jit_p, prims.closed_call_p, prims.call_p)
_CUSTOM = (prims.custom_jvp_call_p, prims.custom_vjp_call_p)


def _is_float(aval) -> bool:
  return jnp.issubdtype(getattr(aval, "dtype", np.int32), jnp.floating)


def _is_zero_value(value, max_size: int | None = None) -> bool:
  """A concrete all-zero array (a literal or a jaxpr constant) of at most
  ``max_size`` elements; tracers and arrays not all on this host are not."""
  if isinstance(value, jax.core.Tracer) or not getattr(value, "is_fully_addressable", True):
    return False
  if max_size is not None and np.size(value) > max_size:
    return False
  try:
    arr = np.asarray(value)
  except Exception:  # noqa: BLE001  (opaque objects: keys, tokens)
    return False
  return arr.dtype != object and arr.size > 0 and not np.any(arr)


_ZERO_PRESERVING = ("broadcast_in_dim", "convert_element_type", "reshape", "squeeze",
                    "expand_dims", "copy")


def _zero_test(jaxpr, consts) -> Callable[..., bool]:
  """``is_zero(v, any_size=False)``: ``v`` of ``jaxpr`` is known to be all
  zeros: a zero literal or scalar constant, a broadcast, reshape or cast of
  one, or (``any_size``: only for ``max``'s operands, so that no parameter is
  copied to the host to be tested) a constant array of zeros."""
  constants = dict(zip(jaxpr.constvars, consts))
  zeros = set()

  def is_zero(v, any_size: bool = False) -> bool:
    if isinstance(v, jcore.Literal):
      return _is_zero_value(v.val)
    if v in zeros:
      return True
    return v in constants and _is_zero_value(constants[v], None if any_size else 1)

  for eqn in jaxpr.eqns:
    if (eqn.primitive.name in _ZERO_PRESERVING and len(eqn.invars) == 1
        and is_zero(eqn.invars[0])):
      zeros.update(eqn.outvars)
  return is_zero


def _relu_operand(eqn, is_zero) -> int | None:
  """Index of ``x`` when ``eqn`` is ``max(x, 0)`` (either order) on a
  floating ``x`` of the output's shape, else None."""
  if eqn.primitive is not prims.max_p:
    return None
  out = eqn.outvars[0].aval
  if not _is_float(out):
    return None
  for i, (a, b) in enumerate((eqn.invars, eqn.invars[::-1])):
    if (not isinstance(a, jcore.Literal) and a.aval.shape == out.shape
        and is_zero(b, any_size=True)):
      return i
  return None


def _single_body(jaxpr):
  """The jaxpr under nested single-equation ``jit`` wrappers."""
  while (len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive in _INLINE
         and list(jaxpr.eqns[0].invars) == list(jaxpr.invars)
         and list(jaxpr.eqns[0].outvars) == list(jaxpr.outvars)):
    sub = _sub_jaxpr(jaxpr.eqns[0].params)
    jaxpr = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
  return jaxpr


def _is_relu_call(eqn) -> bool:
  """``eqn`` is a ``custom_jvp`` call whose primal is exactly ``max(x, 0)``
  (``jax.nn.relu`` / ``flax.linen.relu``)."""
  if eqn.primitive is not prims.custom_jvp_call_p or eqn.params.get("num_consts", 0):
    return False
  closed = eqn.params["call_jaxpr"]
  if (closed.consts or len(closed.jaxpr.invars) != 1 or len(closed.jaxpr.outvars) != 1
      or not _is_float(closed.jaxpr.outvars[0].aval)):
    return False
  body = _single_body(closed.jaxpr)
  if len(body.eqns) != 1 or body.constvars:
    return False
  inner = body.eqns[0]
  i = _relu_operand(inner, _zero_test(body, []))
  return (i is not None and inner.invars[i] == body.invars[0]
          and inner.outvars[0] == body.outvars[0])


def _sub_jaxpr(params):
  for key in ("jaxpr", "call_jaxpr"):
    if key in params:
      return params[key]
  raise KeyError(f"no jaxpr among the params {sorted(params)}")


def _contains_relu(jaxpr, bare_maximum: bool) -> bool:
  is_zero = _zero_test(jaxpr, [])
  for eqn in jaxpr.eqns:
    if _is_relu_call(eqn) or (bare_maximum and _relu_operand(eqn, is_zero) is not None):
      return True
    if eqn.primitive in _CUSTOM:
      continue
    for sub in jcore.jaxprs_in_params(eqn.params):
      if _contains_relu(sub, bare_maximum):
        return True
  return False


def _eval_closed(closed, args, bare_maximum):
  return _eval_jaxpr(closed.jaxpr, closed.consts, args, bare_maximum)


def _eval_jaxpr(jaxpr, consts, args, bare_maximum: bool) -> list:
  """Evaluates ``jaxpr`` in the current trace with its ReLUs guided."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def write(vs, values):
    for v, value in zip(vs, values):
      if not isinstance(v, jcore.DropVar):
        env[v] = value

  write(jaxpr.constvars, consts)
  write(jaxpr.invars, args)
  is_zero = _zero_test(jaxpr, consts) if bare_maximum else None
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
      outvals = _eval_eqn(eqn, invals, is_zero, bare_maximum)
    else:
      with ctx:
        outvals = _eval_eqn(eqn, invals, is_zero, bare_maximum)
    write(eqn.outvars, outvals)
  return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals, is_zero, bare_maximum: bool) -> list:
  prim, params = eqn.primitive, eqn.params
  if _is_relu_call(eqn):
    return [guided_relu(invals[0])]
  if bare_maximum:
    i = _relu_operand(eqn, is_zero)
    if i is not None:
      return [guided_relu(invals[i])]
  if prim in _INLINE:
    sub = _sub_jaxpr(params)
    if isinstance(sub, jcore.ClosedJaxpr):
      return _eval_closed(sub, invals, bare_maximum)
    return _eval_jaxpr(sub, [], invals, bare_maximum)
  if prim is prims.remat_p:
    body = functools.partial(_eval_jaxpr, params["jaxpr"], [], bare_maximum=bare_maximum)
    remat = jax.checkpoint(lambda *a: body(list(a)), prevent_cse=params["prevent_cse"],
                           policy=params["policy"])
    return list(remat(*invals))
  if prim is prims.cond_p:
    branches = [functools.partial(_cond_branch, br, bare_maximum)
                for br in params["branches"]]
    return list(jax.lax.switch(invals[0], branches, *invals[1:]))
  if prim is prims.scan_p:
    return _scan(params, invals, bare_maximum)
  if prim is prims.while_p:
    return _while(params, invals, bare_maximum)
  if prim not in _CUSTOM:
    for sub in jcore.jaxprs_in_params(params):
      if _contains_relu(sub, bare_maximum):
        raise NotImplementedError(
            f"with_guided_relus: a ReLU inside the higher-order primitive {prim.name!r}, "
            "which it cannot rewrite; its map would not be guided.")
  out = prim.bind(*invals, **prim.get_bind_params(params))  # as jax.core.eval_jaxpr
  return list(out) if prim.multiple_results else [out]


def _cond_branch(closed, bare_maximum, *operands):
  return tuple(_eval_closed(closed, list(operands), bare_maximum))


def _scan(params, invals, bare_maximum):
  nc, ncarry = params["num_consts"], params["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]

  def body(carry, x):
    out = _eval_closed(params["jaxpr"], [*consts, *carry, *x], bare_maximum)
    return out[:ncarry], out[ncarry:]

  carry, ys = jax.lax.scan(body, list(init), list(xs), length=params["length"],
                           reverse=params["reverse"], unroll=params["unroll"])
  return [*carry, *ys]


def _while(params, invals, bare_maximum):
  cn, bn = params["cond_nconsts"], params["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]

  def cond(carry):
    return _eval_closed(params["cond_jaxpr"], [*cconsts, *carry], bare_maximum)[0]

  def body(carry):
    return _eval_closed(params["body_jaxpr"], [*bconsts, *carry], bare_maximum)

  return list(jax.lax.while_loop(cond, body, list(init)))


def with_guided_relus(fn: Callable[..., Any], *, bare_maximum: bool = False
                      ) -> Callable[..., Any]:
  """``fn`` with every ReLU replaced by :func:`guided_relu` (same values;
  guided gradients), by rewriting its traced program (module docstring).

  Args:
    fn: any function of arrays (pytrees in and out); traced once per call.
    bare_maximum: also rewrite ``jnp.maximum(x, 0)`` / ``lax.max(x, 0)`` on
      floating arrays, for models that write their ReLU that way (not only
      calls of ``jax.nn.relu``). Off by default: norm layers' ``max(0,
      variance)`` would be rewritten too.
  """
  @functools.wraps(fn)
  def guided(*args, **kwargs):
    flat, tree = jax.tree_util.tree_flatten((args, kwargs))

    def flat_fn(*leaves):
      a, k = jax.tree_util.tree_unflatten(tree, leaves)
      return fn(*a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
    out = _eval_jaxpr(closed.jaxpr, closed.consts, flat, bare_maximum)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

  return guided


# ----------------------------------------------------------------------------- saliency

def _check(x, target, name: str) -> None:
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"{name}: x must be images [B, H, W, C], got shape "
                     f"{getattr(x, 'shape', type(x))}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: x must be floating to be differentiated, got {x.dtype}.")
  if getattr(target, "shape", None) != (x.shape[0],):
    raise ValueError(f"{name}: target must be [B] = ({x.shape[0]},) class indices, got "
                     f"shape {getattr(target, 'shape', type(target))}.")
  if not jnp.issubdtype(target.dtype, jnp.integer):
    raise TypeError(f"{name}: target must hold integer class indices, got {target.dtype}.")


def _target_logit_grad(apply_fn, x, target, name: str) -> Array:
  x, target = jnp.asarray(x), jnp.asarray(target)
  _check(x, target, name)
  logits, vjp = jax.vjp(apply_fn, x)
  if not isinstance(logits, jax.Array) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
    raise ValueError(f"{name}: apply_fn(x) must return logits [B, K] = ({x.shape[0]}, K), "
                     f"got {jax.tree_util.tree_map(jnp.shape, logits)}.")
  k = logits.shape[1]
  if not isinstance(target, jax.core.Tracer):
    t = np.asarray(target)
    if t.size and (t.min() < 0 or t.max() >= k):
      raise ValueError(f"{name}: target must be in [0, {k}) (the logits' classes), got "
                       f"values in [{t.min()}, {t.max()}].")
  (grad,) = vjp(jax.nn.one_hot(target, k, dtype=logits.dtype))
  return grad


def input_gradients(apply_fn: Callable[[Array], Array], x: Array, target: Array) -> Array:
  """``d logits[i, target[i]] / d x[i]``, ``[B, H, W, C]`` (the plain
  sensitivity map; convention in the module docstring).

  Raises:
    ValueError: ``x`` not 4-D, ``target`` not ``[B]``, logits not
      ``[B, K]``, or (eagerly) a target outside ``[0, K)``.
    TypeError: ``x`` not floating or ``target`` not integer.
  """
  return _target_logit_grad(apply_fn, x, target, "input_gradients")


def gradient_times_input(apply_fn: Callable[[Array], Array], x: Array,
                         target: Array) -> Array:
  """``x · d logits[i, target[i]] / d x[i]`` elementwise, ``[B, H, W, C]``;
  errors as :func:`input_gradients`. The map depends on where ``x``'s zero
  is (pixels in ``[0, 1]`` vs normalised inputs)."""
  x = jnp.asarray(x)
  return x * _target_logit_grad(apply_fn, x, target, "gradient_times_input")


def guided_backprop(apply_fn: Callable[[Array], Array], x: Array, target: Array, *,
                    bare_maximum: bool = False) -> Array:
  """Guided back-propagation (Springenberg et al. 2015) of the target logit,
  ``[B, H, W, C]``: the input gradient with every ReLU's backward pass
  passing only positive gradients to positive inputs (:func:`guided_relu`).

  The model is not edited: ``apply_fn`` is rewritten by
  :func:`with_guided_relus` (module docstring: which ReLUs are found and the
  limits). For a model without ReLUs it equals :func:`input_gradients`.

  Args:
    apply_fn: ``x -> logits [B, K]``, eval mode.
    x: images ``[B, H, W, C]``, floating.
    target: ``[B]`` integer classes.
    bare_maximum: see :func:`with_guided_relus`.

  Raises:
    ValueError, TypeError: as :func:`input_gradients`.
    NotImplementedError: a ReLU where it cannot be rewritten.
  """
  return _target_logit_grad(with_guided_relus(apply_fn, bare_maximum=bare_maximum), x, target,
                            "guided_backprop")

