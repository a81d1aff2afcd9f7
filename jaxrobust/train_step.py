"""The one train step, as a pure function, and its compiled forms.

``train_step(state, batch, rng, constants) -> (state, metrics)`` is pure: the
step's randomness is ``fold_in(rng, state.step)``, so a resumed run repeats the
same augmentations, perturbations and dropout masks. ``batch`` maps stream
names to ``{'image' uint8, 'label', 'mask', 'index', ...}``; ``constants`` maps
names to arrays from earlier stages.

One step does, in order:

1. **pp** -- each data stream's images go to ``[0, 1]`` and through its pp
   chain (``views`` times with independent keys for multi-view streams);
2. for each **update** of ``config.updates``, in order (default: one update of
   the ``classifier`` on every loss term):

   0. **generate** -- the generated streams it reads (:mod:`jaxrobust.generated`)
      are filled by their generator: as constants, or, in the update that
      trains the generator, inside the differentiated function;

   a. **perturb** -- streams with a ``perturb`` hook are perturbed with the
      update module's *current* variables (BatchNorm in train mode; each pass
      its own dropout key; its statistics updated by every pass, as the
      reference's ``model.train()`` attacks, unless the stream says
      ``perturb_stats='discard'``), gradients stopped;
   b. **forward** -- ONE pass of the module over its data streams,
      concatenated, so BatchNorm sees them together (as the OE/energy code
      does); each generated stream gets a pass of its own after it (as the GAN
      reference's ``model(data)``, ``model(fake)``) unless the update lists it
      in ``share_pass``; BatchNorm statistics are threaded pass to pass;
   c. **loss** -- the update's composed loss terms (:mod:`jaxrobust.losses`)
      read the outputs and may run other modules (``LossInputs.call``, whose
      train-mode passes update those modules' statistics, as every train-mode
      pass of the reference code does); ``value_and_grad`` w.r.t. the module's
      *trainable* parameters only;
   d. **apply** -- the module's optax transformation; later updates of the
      same step see the new parameters (a GAN's generator update sees the
      discriminator just updated).

Two compiled forms, held equal by tests:

* :func:`jit_train_step` -- the engine: global-view ``jax.jit`` with
  NamedSharding over the mesh. Data-parallel, FSDP, or any mix is the sharding
  of the state and batch, not a code path; BatchNorm statistics are global
  batch statistics automatically.
* :func:`pmap_train_step` -- ``jax.pmap`` over local devices with ``pmean`` of
  gradients and metrics; models are built with ``bn_axis_name='batch'``. Each
  device folds its index into the rng, so with augmentation or dropout on,
  pmap draws different random numbers than the jit step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxrobust import attacks
from jaxrobust import generated as generated_lib
from jaxrobust import losses as losses_lib
from jaxrobust import sharding as sharding_lib
from jaxrobust.data import pp as pp_lib
from jaxrobust.modules import Module, split_trainable, unflat
from jaxrobust.train_state import ModuleState, TrainState

Array = jax.Array
_PASS_SALT = 0x70617373  # keys of an update's second and later forward passes
Batch = Mapping[str, Mapping[str, Array]]


@dataclasses.dataclass(frozen=True)
class StreamStep:
  """How the step treats one stream (``perturb_stats``: whether the
  perturbation's train-mode passes update the module's BatchNorm statistics,
  ``'update'``, or not, ``'discard'``; ``passes_by_group``: group values
  whose rows go through the module in separate passes, in that order)."""
  name: str
  pp: pp_lib.Chain | None = None
  views: int = 1
  perturb: Callable[[attacks.PerturbContext], Any] | None = None
  perturb_stats: str = "update"
  passes_by_group: tuple[int, ...] = ()
  generator: str | None = None  # generated stream: the module that fills it
  noise: generated_lib.Noise | None = None
  batch_size: int = 0  # of a generated stream (global)

  @property
  def is_generated(self) -> bool:
    return self.generator is not None


@dataclasses.dataclass(frozen=True)
class Update:
  """One optimizer update inside the step."""
  name: str
  module: str
  loss_fn: losses_lib.LossFn
  streams: tuple[str, ...]
  stats_keys: tuple[str, ...] = ()  # terms whose moving averages it keeps
  generates: tuple[str, ...] = ()  # generated streams it fills (read or trained through)
  fresh_noise: tuple[str, ...] = ()  # generated streams it draws new noise for
  share_pass: tuple[str, ...] = ()  # generated streams in the data streams' pass


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything the pure step closes over."""
  modules: Mapping[str, Module]
  streams: Mapping[str, StreamStep]
  updates: Sequence[Update]
  num_classes: int


def images01(spec: StepSpec, batch: Batch, rng: Array) -> dict[str, Array]:
  """Each stream's images in ``[0, 1]`` after its pp chain (views stacked
  view-major along the batch axis)."""
  out = {}
  for i, (name, s) in enumerate(sorted(spec.streams.items())):
    if s.is_generated:
      continue
    x = pp_lib.to_unit_range(batch[name]["image"])
    key = jax.random.fold_in(rng, i)
    views = [s.pp(jax.random.fold_in(key, v), x) if s.pp is not None else x
             for v in range(s.views)]
    out[name] = jnp.concatenate(views) if len(views) > 1 else views[0]
  return out


def _repeat(x: Array, views: int) -> Array:
  return jnp.concatenate([x] * views) if views > 1 else x


def _caller(spec: StepSpec, modules: Mapping[str, ModuleState], trained: str, params: Any,
            rng: Array, book: dict[str, Any]) -> Callable[..., Mapping[str, Array]]:
  """``LossInputs.call``: each call is a pass with its own dropout key
  (``fold_in(rng, i)`` for the i-th call of the update, counted while the
  step is traced). ``book`` maps module names to their current BatchNorm
  statistics; a train-mode call with ``stats='update'`` (the default, as the
  reference code's train-mode passes) replaces its module's entry, so the
  next pass and the state after the update see it."""
  calls = [0]

  def call(name: str, x: Array, *, train: bool = False,
           stats: str = "update") -> Mapping[str, Array]:
    if name not in spec.modules:
      raise KeyError(f"no module {name!r}; modules: {sorted(spec.modules)}.")
    if stats not in ("update", "discard"):
      raise ValueError(f"call(stats={stats!r}): 'update' or 'discard'.")
    m, ms = spec.modules[name], modules[name]
    current = book.get(name, ms.batch_stats)
    variables = ({"params": params, "batch_stats": current} if name == trained
                 else jax.lax.stop_gradient({"params": ms.params, "batch_stats": current}))
    calls[0] += 1
    out, new = m.apply_outputs(variables, x, train=train, rng=jax.random.fold_in(rng, calls[0]),
                               update_stats=stats == "update")
    if new:
      book[name] = new
    return out
  return call


def pass_groups(update: Update, streams: Mapping[str, StreamStep]) -> list[tuple[str, ...]]:
  """The forward passes of an update's module, in order: its data streams
  (and the generated ones it shares that pass with) together, then each other
  generated stream alone."""
  together = tuple(s for s in update.streams
                   if not streams[s].is_generated or s in update.share_pass)
  alone = [(s,) for s in update.streams
           if streams[s].is_generated and s not in update.share_pass]
  return ([together] if together else []) + alone


def _passes_by_group(m: Module, params: Any, stats: Any, x: Array, b: Mapping[str, Array],
                     groups: Sequence[int], rng: Array) -> tuple[dict[str, Array], Any]:
  """One train-mode pass per group value, in order, each with BatchNorm
  statistics of its rows alone (:func:`jaxrobust.models.layers.batch_norm_rows`)
  and its own dropout key, the statistics threaded from pass to pass; every
  row takes the outputs of its group's pass. GLC's reference runs the silver
  and the gold rows of a batch through the network separately."""
  from jaxrobust.models import layers
  if "group" not in b:
    raise ValueError("passes_by_group: the stream has no 'group' field; its label source must "
                     "set one (e.g. corrupted(..., gold_fraction=0.05): trusted rows are group 1).")
  rows = b["group"]
  out = None
  for i, g in enumerate(groups):
    with layers.batch_norm_rows(rows == g):
      o, new = m.apply_outputs({"params": params, "batch_stats": stats}, x, train=True,
                               rng=jax.random.fold_in(rng, i))
    stats = new if new else stats
    sel = rows == g
    out = o if out is None else {
        k: jnp.where(sel.reshape((-1,) + (1,) * (v.ndim - 1)), v, out[k]) for k, v in o.items()}
  return out, stats


def _perturb(m: Module, params: Any, stats: Any, st: StreamStep, x01: Array,
             b: Mapping[str, Array], rng: Array, dropout_rng: Array) -> tuple[Array, Any]:
  """One stream's perturbation inside the step: ``(x_adv, BatchNorm
  statistics after its passes)``. Every train-mode pass of the attack draws
  its own dropout mask (``fold_in(dropout_rng, pass)``) and, with
  ``perturb_stats='update'``, updates the statistics the next pass and the
  update's forward pass start from, as PyTorch's ``model.train()`` attacks
  in the reference code do."""
  keep = st.perturb_stats == "update"

  def forward(x: Array, stats_in: Any, key: Array) -> tuple[Array, Any]:
    out, new = m.apply_outputs({"params": params, "batch_stats": stats_in}, x, train=True,
                               rng=key, update_stats=keep)
    return out["logits"], (new if new else stats_in)

  ctx = attacks.PerturbContext(
      logits_fn=m.logits_fn({"params": params, "batch_stats": stats}, train=True,
                            rng=jax.random.fold_in(dropout_rng, -1 % (2**31))),
      x=x01, labels=_repeat(b["label"], st.views), mask=_repeat(b["mask"], st.views), rng=rng,
      num_classes=m.num_classes, batch=b, forward=forward, stats=stats, dropout_rng=dropout_rng)
  out = st.perturb(ctx)
  x_adv, stats = out if isinstance(out, tuple) else (out, stats)
  return jax.lax.stop_gradient(x_adv), jax.lax.stop_gradient(stats)


def step_keys(rng: Array, step: Any, axis_name: str | None = None) -> Array:
  """The ``(pp, perturb, dropout, loss)`` keys of step ``step``:
  ``fold_in(rng, step)`` (and the device index in the pmap form), split."""
  rng = jax.random.fold_in(rng, step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  return jax.random.split(rng, 4)


def make_train_step(spec: StepSpec, *, axis_name: str | None = None
                    ) -> Callable[[TrainState, Batch, Array, Mapping[str, Array]],
                                  tuple[TrainState, dict[str, Array]]]:
  """Builds the pure step. ``axis_name`` is set only for the pmap form."""
  stream_index = {n: i for i, n in enumerate(sorted(spec.streams))}
  prefix = len(spec.updates) > 1

  def train_step(state: TrainState, batch: Batch, rng: Array,
                 constants: Mapping[str, Array] | None = None
                 ) -> tuple[TrainState, dict[str, Array]]:
    pp_rng, perturb_rng, dropout_rng, loss_rng = step_keys(rng, state.step, axis_name)
    x01 = images01(spec, batch, pp_rng)
    modules = dict(state.modules)
    loss_stats = dict(state.loss_stats)
    metrics: dict[str, Array] = {}
    drawn: set[tuple[str, int]] = set()
    for u_i, u in enumerate(spec.updates):
      m, ms = spec.modules[u.module], modules[u.module]
      fed = dict(x01)
      stats = ms.batch_stats  # after the perturbations' own passes
      for s in u.streams:
        st = spec.streams[s]
        if st.perturb is None:
          continue
        u_s = (u_i, stream_index[s])
        fed[s], stats = _perturb(
            m, ms.params, stats, st, x01[s], batch[s],
            jax.random.fold_in(jax.random.fold_in(perturb_rng, u_s[0]), u_s[1]),
            jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(dropout_rng, u_s[0]),
                                                  u_s[1]), 1))
      u_dropout = jax.random.fold_in(dropout_rng, u_i)
      u_batch = dict(batch)
      by_module = []  # generated streams of the trained module: filled in loss_of
      for s in u.generates:
        st = spec.streams[s]
        draw = 1 + u_i if s in u.fresh_noise else 0
        keep = (s, draw) not in drawn
        drawn.add((s, draw))
        n = generated_lib.local_batch(st.batch_size, axis_name)
        z = st.noise.sample(
            generated_lib.noise_key(rng, state.step, stream_index[s], draw, axis_name), n)
        key = jax.random.fold_in(jax.random.fold_in(u_dropout, stream_index[s]), 2)
        u_batch[s] = generated_lib.GeneratedBatch({"mask": jnp.ones((n,), bool)}, s, st.generator)
        if st.generator == u.module:
          by_module.append((s, z, keep, key))
          continue
        g, gs = spec.modules[st.generator], modules[st.generator]
        out, new = g.apply_outputs(jax.lax.stop_gradient(gs.variables), z, train=True, rng=key,
                                   update_stats=keep)
        fed[s] = jax.lax.stop_gradient(generated_lib.output_images(out, st.generator))
        if new:
          modules[st.generator] = gs.replace(batch_stats=jax.lax.stop_gradient(new))
      passes = pass_groups(u, spec.streams)
      trainable, frozen = split_trainable(ms.params, m.trainable)

      def loss_of(train_params, m=m, u=u, frozen=frozen, u_dropout=u_dropout, u_i=u_i,
                  fed=fed, stats=stats, u_batch=u_batch, by_module=by_module, passes=passes,
                  modules=dict(modules)):
        params = unflat({**frozen, **train_params})
        book = {u.module: stats}
        fed = dict(fed)
        for s, z, keep, key in by_module:
          out, new = m.apply_outputs({"params": params, "batch_stats": book[u.module]}, z,
                                     train=True, rng=key, update_stats=keep)
          book[u.module] = new if new else book[u.module]
          fed[s] = generated_lib.output_images(out, u.module)
        outputs = {}
        for p_i, group in enumerate(passes):
          x = jnp.concatenate([fed[s] for s in group]) if len(group) > 1 else fed[group[0]]
          key = u_dropout if p_i == 0 else jax.random.fold_in(
              jax.random.fold_in(u_dropout, _PASS_SALT), p_i)
          grouped = spec.streams[group[0]].passes_by_group
          if grouped:
            out, new = _passes_by_group(m, params, book[u.module], x, u_batch[group[0]], grouped,
                                        key)
          else:
            out, new = m.apply_outputs({"params": params, "batch_stats": book[u.module]}, x,
                                       train=True, rng=key)
          book[u.module] = new if new else book[u.module]
          start = 0
          for s in group:
            n = fed[s].shape[0]
            outputs[s] = {k: v[start:start + n] for k, v in out.items()}
            start += n
        inputs = losses_lib.LossInputs(
            outputs=losses_lib._Outputs(outputs, u.module, u.streams), batch=u_batch,
            num_classes=m.num_classes, params=params,
            rng=jax.random.fold_in(loss_rng, u_i), step=state.step, images=fed,
            constants=dict(constants or {}), module=u.module,
            call=_caller(spec, modules, u.module, params, u_dropout, book),
            views={s: st.views for s, st in spec.streams.items()}, axis_name=axis_name,
            loss_stats=loss_stats)
        total, terms = u.loss_fn(inputs)
        return total, (terms, book)

      (_, (u_metrics, book)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
      u_metrics, book = dict(u_metrics), dict(book)
      new_stats = book.pop(u.module)
      for name, other in book.items():  # statistics of the modules its terms ran
        modules[name] = modules[name].replace(batch_stats=jax.lax.stop_gradient(other))
      if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        u_metrics = jax.lax.pmean(u_metrics, axis_name)
      for k in [k for k in u_metrics if k.startswith(losses_lib.STATS)]:
        loss_stats[k[len(losses_lib.STATS):]] = u_metrics.pop(k)
      u_metrics["grad_norm"] = optax.tree.norm(grads)
      u_metrics["learning_rate"] = jnp.asarray(m.schedule(state.step), jnp.float32)
      full_grads = unflat({**{p: jnp.zeros_like(v) for p, v in frozen.items()}, **grads})
      updates, opt_state = m.tx.update(full_grads, ms.opt_state, ms.params)
      modules[u.module] = ModuleState(
          params=optax.apply_updates(ms.params, updates),
          batch_stats=new_stats, opt_state=opt_state)
      metrics.update({f"{u.name}/{k}" if prefix else k: v for k, v in u_metrics.items()})
    return state.replace(step=state.step + 1, modules=modules, loss_stats=loss_stats), metrics

  return train_step


def jit_train_step(step: Callable, state_shardings: Any, batch_sharding: NamedSharding,
                   replicated: NamedSharding) -> Callable:
  """Global-view compiled step; the state is donated (updated in place)."""
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def pmap_train_step(step: Callable) -> Callable:
  """Per-device compiled step over local devices (state replicated on axis 0)."""
  return jax.pmap(step, axis_name="batch", in_axes=(0, 0, None, None), donate_argnums=(0,))


def replicate_for_pmap(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """Stacks a (host or global) pytree on a new leading device axis for pmap."""
  n = len(devices)
  sharding = NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("batch",)),
                           jax.sharding.PartitionSpec("batch"))
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding),
      tree)


def unreplicate(tree: Any) -> Any:
  """The copy at index 0 of the device axis of a pmap-replicated pytree,
  placed on every device of its mesh.

  Waits for the steps that produce ``tree``, then reads each leaf's shard at
  index 0: indexing (``x[0]``) would queue one program over every device
  per leaf behind the steps still in flight, and XLA:CPU with forced host
  devices (jax 0.10.2) aborts in its all-reduce rendezvous when many programs
  queue so (seen once, a test worker aborting here on a loaded machine; see
  :func:`jaxrobust.trainer.train_and_evaluate`)."""
  def first(x):
    if (isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.ndim
        and len(x.addressable_shards) > 1):
      shard = min(x.addressable_shards, key=lambda s: s.index[0].start or 0)
      return jax.device_put(shard.data.reshape(x.shape[1:]),
                            sharding_lib.replicated(x.sharding.mesh))
    return x[0]
  return jax.tree.map(first, jax.block_until_ready(tree))
