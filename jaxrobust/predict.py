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
``[N, D]``), ``probs`` (softmax), ``label``, ``correct`` (argmax == label),
``nll`` (per example, 0 for unlabelled), and any OOD score of
:mod:`jaxrobust.scores` by its result name (``msp``, ``energy``, ...). With a
``perturb`` hook the inputs are first perturbed (BatchNorm in eval mode): robust
accuracy, input pre-processing of ODIN-style scores.
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

Array = jax.Array
BASE_FIELDS = ("logits", "features", "probs", "label", "correct", "nll")


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _per_batch(module: Module, fields: Sequence[str],
               perturb: Callable[[attacks.PerturbContext], Array] | None,
               scores: Mapping[str, Callable[..., Array]], rng: Array | None
               ) -> Callable[[Any, Mapping[str, Array]], dict[str, Array]]:
  def fn(variables, batch):
    x01 = pp.to_unit_range(batch["image"])
    labels, mask = batch["label"], batch["mask"]
    if perturb is not None:
      ctx = attacks.PerturbContext(
          logits_fn=module.logits_fn(variables, train=False), x=x01, labels=labels, mask=mask,
          rng=rng if rng is not None else jax.random.PRNGKey(0),
          num_classes=module.num_classes, batch=batch)
      x01 = jax.lax.stop_gradient(perturb(ctx))
    logits, features, _ = module.apply(variables, x01, train=False)
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
      elif f == "correct":
        out[f] = (jnp.argmax(logits, -1) == labels) & (labels >= 0)
      elif f == "nll":
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe[:, None], -1)[:, 0]
        out[f] = jnp.where(labels >= 0, nll, 0.0)
      else:
        score = scores[f]
        out[f] = score({"logits": logits, "features": features}) if getattr(
            score, "takes_outputs", False) else score(logits)
    return out
  return fn


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

  def _fn(self, fields: tuple[str, ...], perturb, perturb_key: str,
          scores: Mapping[str, Callable[..., Array]]) -> Callable:
    key = (fields, perturb_key, tuple(sorted(scores)))
    if key not in self._compiled:
      unknown = [f for f in fields if f not in BASE_FIELDS and f not in scores]
      if unknown:
        raise ValueError(f"predict: unknown field(s) {unknown}; fields are {BASE_FIELDS} or "
                         f"a score name ({sorted(scores)}).")
      self._compiled[key] = jax.jit(_per_batch(self.module, fields, perturb, scores, None))
    return self._compiled[key]

  def __call__(self, variables: Any, source: Any, *, fields: Sequence[str] = ("logits",),
               perturb: Callable[[attacks.PerturbContext], Array] | None = None,
               perturb_key: str = "", scores: Mapping[str, Callable[..., Array]] | None = None
               ) -> dict[str, np.ndarray]:
    """``{field: array [N, ...]}`` in dataset index order (``perturb_key``
    names the perturbation for the compile cache)."""
    fields = tuple(dict.fromkeys(fields))
    fn = self._fn(fields, perturb, perturb_key, dict(scores or {}))
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in pipeline.eval_batches(source, self.batch_size):
      batch = pipeline.to_global(batch, self.batch_sharding)
      # Fetched per batch: bounded work in flight (see trainer.train_and_evaluate).
      for k, v in fn(variables, batch).items():
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
