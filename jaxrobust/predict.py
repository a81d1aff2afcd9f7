"""``predict``: per-example outputs of a module over a whole split, in dataset
index order, on any number of processes.

::

    out = predictor(variables, source, fields=("logits", "features", "label"))
    out["logits"][i]   # the logits of example i of the split

Each process reads its shard of the split in padded, masked batches
(:func:`jaxrobust.data.pipeline.eval_batches`); the jitted per-batch function
runs on the global, sharded batch; results are gathered to every process and
put back in order by the ``index`` every batch carries (not by arrival order,
which interleaves processes). Padding rows are dropped; every index of the
split must come back exactly once.

Fields: ``logits`` (float32 ``[N, K]``), ``features`` (penultimate,
``[N, D]``), ``probs`` (softmax), ``label``, ``group`` (the dataset's group
annotation, -1 for datasets without groups), ``correct`` (argmax == label),
``nll`` (per example, 0 for unlabelled), and any OOD score of
:mod:`jaxrobust.scores` by its result name (``msp``, ``energy``, ...). With a
``perturb`` hook the inputs are first perturbed (BatchNorm in eval mode): robust
accuracy, input pre-processing of ODIN-style scores. :meth:`Predictor.reduce`
streams a split into sums (fits over a training set).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import attacks
from jaxrobust.data import pipeline
from jaxrobust.data import pp
from jaxrobust.modules import Module
from jaxrobust.scores import ScoreMethod

Array = jax.Array
BASE_FIELDS = ("logits", "features", "probs", "label", "group", "correct", "nll")


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  if x.is_fully_replicated:  # e.g. a sum over the batch: every process has it whole
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _per_batch(module: Module, fields: Sequence[str],
               perturb: Callable[[attacks.PerturbContext], Array] | None,
               scores: Mapping[str, ScoreMethod], rng: Array | None
               ) -> Callable[[Any, Mapping[str, Array], Any], dict[str, Array]]:
  def fn(variables, batch, fitted):
    x01 = pp.to_unit_range(batch["image"])
    labels, mask = batch["label"], batch["mask"]
    outputs_fn = _outputs_fn(module, variables)
    if perturb is not None:
      ctx = attacks.PerturbContext(
          logits_fn=module.logits_fn(variables, train=False), x=x01, labels=labels, mask=mask,
          # A different random start per batch, the same for the same examples.
          rng=jax.random.fold_in(rng if rng is not None else jax.random.PRNGKey(0),
                                 batch["index"][0]),
          num_classes=module.num_classes, batch=batch,
          outputs_fn=outputs_fn,
          fitted=next(iter(fitted.values()), None) if fitted else None)
      x01 = jax.lax.stop_gradient(perturb(ctx))
    outputs = outputs_fn(x01)
    logits, features = outputs["logits"], outputs["features"]
    out: dict[str, Array] = {"index": batch["index"], "mask": mask}
    k = logits.shape[-1]
    safe = jnp.clip(labels, 0, k - 1)
    for f in fields:
      if f == "logits":
        out[f] = logits
      elif f == "features":
        out[f] = features
      elif f == "probs":
        out[f] = jax.nn.softmax(logits)
      elif f == "label":
        out[f] = labels
      elif f == "group":
        out[f] = batch["group"] if "group" in batch else jnp.full_like(labels, -1)
      elif f == "correct":
        out[f] = (jnp.argmax(logits, -1) == labels) & (labels >= 0)
      elif f == "nll":
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe[:, None], -1)[:, 0]
        out[f] = jnp.where(labels >= 0, nll, 0.0)
      else:
        out[f] = scores[f].score(outputs, fitted.get(f))
    return out
  return fn


def _outputs_fn(module: Module, variables: Any) -> Callable[[Array], dict[str, Array]]:
  """``x01 -> {'logits', 'features'}`` of ``module`` in eval mode."""
  def outputs(x):
    logits, features, _ = module.apply(variables, x, train=False)
    return {"logits": logits, "features": features}
  return outputs


class Predictor:
  """Compiled per-batch functions of one module, cached per request, so
  repeated predictions (every evaluation) never recompile.

  Args:
    module: the module to run.
    batch_size: the global eval batch size.
    batch_sharding: NamedSharding of the batch axis over the mesh.
  """

  def __init__(self, module: Module, *, batch_size: int,
               batch_sharding: jax.sharding.NamedSharding):
    self.module = module
    self.batch_size = batch_size
    self.batch_sharding = batch_sharding
    self._compiled: dict[Any, Callable] = {}
    # The scores each entry was compiled for: a plain function's key is its
    # id, which another function could reuse once the first were freed.
    self._pinned: dict[Any, tuple] = {}

  def _fn(self, fields: tuple[str, ...], perturb, perturb_key: str,
          scores: Mapping[str, ScoreMethod]) -> Callable:
    key = (fields, perturb_key, tuple(sorted((n, s.key) for n, s in scores.items())))
    if key not in self._compiled:
      unknown = [f for f in fields if f not in BASE_FIELDS and f not in scores]
      if unknown:
        raise ValueError(f"predict: unknown field(s) {unknown}; fields are {BASE_FIELDS} or "
                         f"a score name ({sorted(scores)}).")
      self._compiled[key] = jax.jit(_per_batch(self.module, fields, perturb, scores, None))
      self._pinned[key] = tuple(scores.values())
    return self._compiled[key]

  def __call__(self, variables: Any, source: Any, *, fields: Sequence[str] = ("logits",),
               perturb: Callable[[attacks.PerturbContext], Array] | None = None,
               perturb_key: str = "", scores: Mapping[str, Any] | None = None,
               fitted: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``{field: array [N, ...]}`` in dataset index order.

    ``scores`` maps field names to :class:`~jaxrobust.scores.ScoreMethod` (or
    plain logit functions); ``fitted`` to their fitted states, passed to the
    compiled function as arguments (a refit does not recompile);
    ``perturb_key`` names the perturbation for the compile cache.
    """
    fields = tuple(dict.fromkeys(fields))
    scores = {n: _as_method(n, s) for n, s in dict(scores or {}).items()}
    fitted = {n: (fitted or {}).get(n) for n in scores if (fitted or {}).get(n) is not None}
    fn = self._fn(fields, perturb, perturb_key, scores)
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in pipeline.eval_batches(source, self.batch_size):
      batch = pipeline.to_global(batch, self.batch_sharding)
      # Fetched per batch: bounded work in flight (see trainer.train_and_evaluate).
      for k, v in fn(variables, batch, fitted).items():
        chunks.setdefault(k, []).append(to_host(v))
    got = {k: np.concatenate(v) for k, v in chunks.items()}
    keep = got.pop("mask")
    index = got.pop("index")[keep]
    n = len(source)
    if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
      raise RuntimeError(f"predict: the batches covered {len(np.unique(index))} distinct of "
                         f"{n} examples ({len(index)} rows); the eval pipeline is broken.")
    order = np.argsort(index, kind="stable")
    return {k: v[keep][order] for k, v in got.items()}

  def reduce(self, variables: Any, source: Any, fn: Callable[..., Mapping[str, Array]],
             key: str, args: Any = None) -> dict[str, np.ndarray]:
    """Streams a split through ``fn(outputs, labels, mask, args) -> {name:
    array}`` (jitted, sharded like predict; ``key`` names it for the compile
    cache; ``args`` are arrays it receives, e.g. means from a first pass) and
    sums the results over batches on the host in float64 -- for fits over a
    whole training set (class means, scatter matrices) without keeping every
    feature."""
    cache_key = ("reduce", key)
    if cache_key not in self._compiled:
      module = self.module

      def per_batch(variables, batch, args):
        outputs = _outputs_fn(module, variables)(pp.to_unit_range(batch["image"]))
        return fn(outputs, batch["label"], batch["mask"], args)
      self._compiled[cache_key] = jax.jit(per_batch)
    compiled = self._compiled[cache_key]
    total: dict[str, np.ndarray] = {}
    for batch in pipeline.eval_batches(source, self.batch_size):
      batch = pipeline.to_global(batch, self.batch_sharding)
      for k, v in compiled(variables, batch, args).items():
        v = to_host(v).astype(np.float64)
        total[k] = total[k] + v if k in total else v
    return total


def _as_method(name: str, score: Any) -> ScoreMethod:
  if isinstance(score, ScoreMethod):
    return score
  return ScoreMethod(name, lambda outputs, fitted, f=score: f(outputs["logits"]),
                     key=f"fn{id(score)}")
