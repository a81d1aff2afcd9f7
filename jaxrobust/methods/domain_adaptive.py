"""Domain-adaptive transfer (Ngiam et al. 2018, "Domain Adaptive Transfer
Learning with Specialist Models", arXiv 1811.07056): pre-train on the source
examples that matter for the target, chosen by label importance weights.

The method, as the paper states it (no reference code was released):

1. Train a model on the source dataset (JFT there).
2. Estimate the target's label distribution over the *source* label space,
   ``P_t(y)``: the source model's softmax over the target's (unlabelled)
   training images, averaged; the paper smooths the predictions with a
   temperature (T = 2 in the paper). :func:`target_prior`.
3. ``P_s(y)``: the source's label frequencies. :func:`source_prior`.
4. Importance weights ``w(y) = P_t(y) / P_s(y)`` -- the weight
   ``P_t(x, y) / P_s(x, y)`` of a source example under the assumption
   ``P_s(x | y) ≈ P_t(x | y)``. :func:`importance_weights`.
5. Build the pre-training set by resampling the source with these weights
   (index lists a stream reads as its population), or keep the source and
   weight each example's loss by ``w(y)``
   (``streams.train.labels='importance_weighted(weights=...)'``).
6. Pre-train on it from scratch, then fine-tune on the labelled target.

Samplers (each documented choice is ours where the paper is not explicit;
the paper's §3 could not be consulted offline when this was written, so the
two rules below follow the issue's specification and are stated exactly):

* :func:`same_distribution_indices` -- "same distribution matching": the
  pre-training label histogram equals ``P_t``. Class counts are
  ``size · P_t(y)`` rounded by largest remainder (they sum to ``size`` and
  each is within 1 of its target), and each class's images are drawn
  uniformly **with replacement** (i.i.d. draws from ``P_s(x | y) P_t(y)``),
  so a class with more weight than images repeats images.
* :func:`elastic_distribution_indices` -- "elastic distribution matching":
  **without replacement**, as close to the weighted distribution as the
  source allows. ``mode='greedy'`` (default; the rule the project's seed
  text describes for the paper: whole classes taken in decreasing importance
  weight, without replacement, until ``size`` -- the last one partly).
  ``mode='proportional'``: class ``y`` gets ``min(N_y, λ · w(y) N_y)`` images
  with λ set so the total is ``size`` (water-filling): when no class runs out
  the histogram is ``P_t``; a class that runs out gives all its images and
  the rest is spread over the other classes in proportion to ``P_t``. Images within a class
  are a uniform random subset. Classes with weight 0 are never taken, so a
  size above the number of positive-weight images is an error.

Multi-label sources (JFT is multi-label): :func:`source_prior` takes a
multi-hot ``[N, K]`` matrix and counts every (image, label) pair, so
``P_s(y)`` is the share of label occurrences; the samplers take one label per
image (``int[N]``) -- pass e.g. the rarest or the first label.

Stage tasks: ``target_prior`` (the source checkpoint's prior over a target
split, via :func:`jaxrobust.tasks.predict_outputs`: sharded, streaming, in
dataset index order, any number of processes) and ``importance_sample``
(weights and one sampler's index list). Recipe:
``configs/recipes/domain_adaptive.py``; reproduction: ``python -m
launch.reproduce ngiam2018``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.data.streams import LABELS, LabelFn, StreamData
from jaxrobust.registry import RegistryError
from jaxrobust.config import merge
from jaxrobust.tasks import TASKS, StageContext, predict_outputs

TEMPERATURE = 2.0  # the paper's softmax temperature for P_t
SAMPLERS = ("same", "elastic", "uniform")
ELASTIC_MODES = ("greedy", "proportional")
# P_t mass allowed on classes the source never shows (softmax is never exactly 0).
ZERO_SOURCE_TOLERANCE = 1e-3


# --- priors and weights ------------------------------------------------------------

@jax.jit
def _mean_softmax(logits: jax.Array, mask: jax.Array, temperature: jax.Array) -> jax.Array:
  p = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  m = mask.astype(jnp.float32)
  return (p * m[:, None]).sum(0) / jnp.maximum(m.sum(), 1.0)


def target_prior(logits: Any, *, temperature: float = TEMPERATURE,
                 mask: Any = None) -> jax.Array:
  """``P_t(y)``: the mean of ``softmax(logits / T)`` over the valid rows.

  Args:
    logits: ``[N, K]`` source-model logits over the target's images.
    temperature: T > 0 (2 in the paper; larger T flattens the prior).
    mask: ``[N]`` validity (padded rows 0); default all valid.

  Returns:
    float32 ``[K]`` summing to 1 (jitted; any sharding of ``logits``).
  """
  if not temperature > 0:
    raise RegistryError(f"target_prior: temperature must be > 0, got {temperature!r}.")
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise RegistryError(f"target_prior: logits must be [N, K], got shape {logits.shape}.")
  mask = jnp.ones(logits.shape[0], bool) if mask is None else jnp.asarray(mask)
  if mask.shape != logits.shape[:1]:
    raise RegistryError(f"target_prior: mask has shape {mask.shape}, logits {logits.shape}.")
  return _mean_softmax(logits, mask, jnp.float32(temperature))


def source_prior(labels: Any, num_classes: int) -> np.ndarray:
  """``P_s(y)``: label frequencies of the source.

  ``labels``: ``int[N]`` class ids (entries < 0, unlabelled, are ignored) or a
  multi-hot ``[N, K]`` matrix (every label occurrence counts once).
  """
  labels = np.asarray(labels)
  if labels.ndim == 2:
    if labels.shape[1] != num_classes:
      raise RegistryError(f"source_prior: multi-hot labels have {labels.shape[1]} columns for "
                          f"{num_classes} classes.")
    counts = (labels > 0).sum(0).astype(np.float64)
  elif labels.ndim == 1:
    valid = labels[labels >= 0]
    if valid.size and valid.max() >= num_classes:
      raise RegistryError(f"source_prior: a label {int(valid.max())} >= num_classes "
                          f"({num_classes}).")
    counts = np.bincount(valid, minlength=num_classes).astype(np.float64)
  else:
    raise RegistryError(f"source_prior: labels must be int[N] or multi-hot [N, K], got shape "
                        f"{labels.shape}.")
  if counts.sum() == 0:
    raise RegistryError("source_prior: the source has no labelled example.")
  return counts / counts.sum()


def importance_weights(p_t: Any, p_s: Any, *,
                       tolerance: float = ZERO_SOURCE_TOLERANCE) -> np.ndarray:
  """``w(y) = P_t(y) / P_s(y)``, float64 ``[K]``.

  Rule for classes the source never shows (``P_s(y) = 0``): they cannot be
  sampled, so their weight is 0 -- allowed only while their total ``P_t`` mass
  is at most ``tolerance`` (a softmax puts a little mass everywhere); more is
  an error naming the classes (the source model and the source dataset
  disagree, or the prior was estimated on another label space).
  """
  p_t, p_s = np.asarray(p_t, np.float64), np.asarray(p_s, np.float64)
  if p_t.shape != p_s.shape or p_t.ndim != 1:
    raise RegistryError(f"importance_weights: P_t {p_t.shape} and P_s {p_s.shape} must be "
                        "vectors over the same classes.")
  for name, p in (("P_t", p_t), ("P_s", p_s)):
    if np.any(p < 0) or not np.all(np.isfinite(p)) or abs(p.sum() - 1.0) > 1e-3:
      raise RegistryError(f"importance_weights: {name} must be a distribution (>= 0, sum 1); "
                          f"it sums to {p.sum():.6f}.")
  empty = p_s <= 0
  if p_t[empty].sum() > tolerance:
    worst = np.flatnonzero(empty)[np.argsort(-p_t[empty])][:10]
    raise RegistryError(
        f"importance_weights: P_t puts mass {p_t[empty].sum():.4f} (> {tolerance}) on classes "
        f"the source has no example of (P_s = 0), e.g. {worst.tolist()}; the source model's "
        "classes do not match the source dataset.")
  return np.where(empty, 0.0, p_t / np.where(empty, 1.0, p_s))


# --- samplers -------------------------------------------------------------------------

def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
  """Integer counts summing to ``total`` with ``|count - total · share| < 1``
  (Hamilton's method; ties to the lower class id)."""
  shares = np.asarray(shares, np.float64)
  exact = total * shares / shares.sum()
  counts = np.floor(exact).astype(np.int64)
  short = int(total - counts.sum())
  order = np.lexsort((np.arange(len(exact)), -(exact - counts)))
  counts[order[:short]] += 1
  return counts


def _check_size(size: int, where: str) -> int:
  if isinstance(size, bool) or int(size) != size or size < 1:
    raise RegistryError(f"{where}: size must be a positive integer, got {size!r}.")
  return int(size)


def _class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  order = np.argsort(labels, kind="stable")
  bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
  return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


def same_distribution_indices(labels: Any, p_t: Any, size: int, *, seed: int) -> np.ndarray:
  """Source indices whose label histogram is ``P_t`` ("same distribution
  matching"; with replacement), sorted.

  Args:
    labels: ``int[N]`` source labels.
    p_t: ``[K]`` target prior (any non-negative vector; normalised).
    size: the number of indices.
    seed: the draw within classes.
  """
  size = _check_size(size, "same_distribution_indices")
  labels = np.asarray(labels, np.int64)
  p_t = np.asarray(p_t, np.float64)
  if np.any(p_t < 0) or p_t.sum() <= 0:
    raise RegistryError("same_distribution_indices: p_t must be >= 0 and not all 0.")
  counts = largest_remainder(p_t, size)
  members = _class_members(labels, len(p_t))
  missing = [c for c in range(len(p_t)) if counts[c] and not len(members[c])]
  if missing:
    raise RegistryError(f"same_distribution_indices: P_t asks for classes {missing[:10]} that "
                        "have no source example.")
  rng = np.random.default_rng(seed)
  out = [rng.choice(members[c], counts[c], replace=True) for c in range(len(p_t)) if counts[c]]
  return np.sort(np.concatenate(out)).astype(np.int64)


def _water_fill(targets: np.ndarray, caps: np.ndarray, size: int) -> np.ndarray:
  """Counts ``min(cap, λ · target)`` summing to ``size`` (``size <= Σ cap``
  over positive targets)."""
  counts = np.zeros(len(caps), np.int64)
  open_ = (targets > 0) & (caps > 0)
  left = size
  while left > 0:
    want = largest_remainder(np.where(open_, targets, 0.0), left)
    full = open_ & (counts + want >= caps)
    if not full.any():
      return counts + want
    # classes that run out take everything; the rest is re-spread over the others
    left -= int((caps[full] - counts[full]).sum())
    counts[full] = caps[full]
    open_ &= ~full
  return counts


def elastic_distribution_indices(labels: Any, weights: Any, size: int, *, seed: int,
                                 mode: str = "greedy") -> np.ndarray:
  """Source indices without replacement, as close to the weighted distribution
  as the source allows ("elastic distribution matching"; see the module
  docstring for ``mode``), sorted.

  Args:
    labels: ``int[N]`` source labels.
    weights: ``[K]`` class importance weights ``w(y)`` (>= 0).
    size: the number of (distinct) indices.
    seed: which images of a partly taken class.
    mode: ``'greedy'`` (whole classes in decreasing weight, the default) or
      ``'proportional'`` (water-filling).
  """
  size = _check_size(size, "elastic_distribution_indices")
  if mode not in ELASTIC_MODES:
    raise RegistryError(f"elastic_distribution_indices: mode must be one of {ELASTIC_MODES}, "
                        f"got {mode!r}.")
  labels = np.asarray(labels, np.int64)
  w = np.asarray(weights, np.float64)
  if np.any(w < 0) or not np.all(np.isfinite(w)):
    raise RegistryError("elastic_distribution_indices: weights must be finite and >= 0.")
  members = _class_members(labels, len(w))
  caps = np.array([len(m) for m in members], np.int64)
  available = int(caps[w > 0].sum())
  if size > available:
    raise RegistryError(
        f"elastic_distribution_indices: size {size} is more than the {available} source images "
        "with a positive weight; without replacement it cannot be reached (use "
        "same_distribution_indices, or a smaller size).")
  if mode == "proportional":
    counts = _water_fill(w * caps, caps, size)
  else:
    counts = np.zeros(len(w), np.int64)
    left = size
    for c in np.lexsort((np.arange(len(w)), -w)):
      if left == 0 or w[c] <= 0:
        break
      counts[c] = min(caps[c], left)
      left -= counts[c]
  rng = np.random.default_rng(seed)
  out = [rng.choice(members[c], counts[c], replace=False) for c in range(len(w)) if counts[c]]
  return np.sort(np.concatenate(out)).astype(np.int64)


def uniform_indices(num_examples: int, size: int, *, seed: int) -> np.ndarray:
  """The baseline: ``size`` distinct source indices uniformly at random, sorted."""
  size = _check_size(size, "uniform_indices")
  if size > num_examples:
    raise RegistryError(f"uniform_indices: size {size} > the {num_examples} source images.")
  return np.sort(np.random.default_rng(seed).choice(num_examples, size, replace=False))


def histogram_stats(labels: np.ndarray, indices: np.ndarray, p_t: np.ndarray) -> dict[str, Any]:
  """How far a pre-training set's label histogram is from ``P_t``: total
  variation distance, distinct images, classes present, per-class counts."""
  k = len(p_t)
  counts = np.bincount(labels[indices], minlength=k)
  hist = counts / max(counts.sum(), 1)
  return {"tv_distance": float(0.5 * np.abs(hist - p_t / p_t.sum()).sum()),
          "num_distinct": int(len(np.unique(indices))), "num_classes": int((counts > 0).sum()),
          "counts": counts.tolist()}


# --- label source: the importance-weighted loss -------------------------------------

@LABELS.register("importance_weighted")
def importance_weighted(data: StreamData, weights: Any) -> LabelFn:
  """The dataset's labels plus ``weight = w(label)``: importance-weighted
  pre-training on the whole source instead of resampling (``weights``: ``[K]``,
  a list or ``'artifact:<stage>/weights'``). The cross-entropy term then
  reduces as ``Σ w_i ℓ_i / Σ w_i`` over the batch."""
  w = data.array(weights, "labels", dtype=np.float32).reshape(-1)
  if data.num_classes is None or len(w) != data.num_classes:
    raise RegistryError(f"{data.where}.labels: importance_weighted needs one weight per class "
                        f"({data.num_classes}); got {len(w)}.")
  if np.any(w < 0) or not np.all(np.isfinite(w)) or w.max() <= 0:
    raise RegistryError(f"{data.where}.labels: importance weights must be finite, >= 0 and not "
                        "all 0.")
  return lambda idx, labels: {"label": labels, "weight": w[np.maximum(labels, 0)]}


# --- stage tasks ---------------------------------------------------------------------

def _dataset_labels(ctx: StageContext, data: str, split: str) -> tuple[np.ndarray, int]:
  from jaxrobust.data import pipeline, sources
  config = ctx.config
  spec = sources.get_spec(data, data_dir=config.data.data_dir)
  source = pipeline.load_split(data, split, data_dir=config.data.data_dir,
                               cache=config.data.cache, image_size=config.data.image_size)
  return pipeline.all_labels(source), int(spec.num_classes)


def _plot_weights(ctx: StageContext, w: np.ndarray, source: str, target: str,
                  temperature: float) -> None:
  import os

  from jaxrobust import plots
  from jaxrobust.data import sources
  names = sources.class_names(source, data_dir=ctx.config.data.data_dir)
  os.makedirs(os.path.join(ctx.workdir, "plots"), exist_ok=True)
  plots.class_bars(
      w, class_names=names if len(names) == len(w) else None, top=min(len(w), 30),
      ylabel="w(y) = P_t(y) / P_s(y)",
      path=os.path.join(ctx.workdir, "plots", "importance_weights.png"),
      title=f"Importance weights of {source} classes for {target} (T={temperature:g}; top 30)")


@TASKS.register("target_prior")
def target_prior_task(ctx: StageContext, *, checkpoint: str, data: str, split: str = "train",
                      temperature: float = TEMPERATURE, source_data: str = "",
                      source_split: str = "train", module: str = "classifier"
                      ) -> dict[str, float]:
  """``P_t`` of ``data:split`` under the source model ``checkpoint``, and
  ``P_s`` and ``w`` of the source (``source_data``, default the stage's
  ``config.data.name``). Artifacts: ``prior`` (``p_t``, ``p_s``,
  ``weights``) and ``stats`` (JSON: the top classes). The checkpoint's
  classes must be the source dataset's."""
  where = f"config.stages.{ctx.name}"
  if not temperature > 0:
    raise RegistryError(f"{where}.temperature must be > 0, got {temperature!r}.")
  source_name = source_data or ctx.config.data.name
  source_labels, k = _dataset_labels(ctx, source_name, source_split)
  # The model is the source model: built for the source's classes, whatever
  # the stage's (target) dataset; its checkpoint must have as many.
  source_ctx = dataclasses.replace(ctx, config=merge(ctx.config, {"data": {"name": source_name}},
                                                     where))
  try:
    out = predict_outputs(source_ctx, checkpoint=checkpoint, data=data, split=split,
                          fields=("logits",), module=module)
  except RegistryError as e:
    raise RegistryError(f"{e} The source model's classes must be the source dataset's "
                        f"(source_data={source_name!r}).") from None
  logits = np.asarray(out["logits"])
  p_t = np.asarray(target_prior(logits, temperature=temperature), np.float64)
  p_s = source_prior(source_labels, k)
  try:
    w = importance_weights(p_t, p_s)
  except RegistryError as e:
    raise RegistryError(f"{where}: {e}") from None
  ctx.artifacts.save("prior", {"p_t": p_t, "p_s": p_s, "weights": w})
  top = np.argsort(-p_t)[:10]
  if ctx.config.plots and jax.process_index() == 0:
    _plot_weights(ctx, w, source_name, f"{data}:{split}", temperature)
  ctx.artifacts.save("stats", {"top_classes": top.tolist(), "top_p_t": p_t[top].tolist(),
                               "top_weights": w[top].tolist(), "num_images": len(logits)})
  entropy = float(-(p_t * np.log(np.maximum(p_t, 1e-30))).sum())
  print(f"target_prior: P_t of {data}:{split} ({len(logits)} images, T={temperature}); top "
        f"classes {top[:5].tolist()} with mass {np.round(p_t[top[:5]], 3).tolist()}", flush=True)
  return {"num_images": float(len(logits)), "entropy": entropy,
          "perplexity": float(np.exp(entropy)), "top10_mass": float(p_t[top].sum()),
          "max_weight": float(w.max())}


@TASKS.register("importance_sample")
def importance_sample(ctx: StageContext, *, prior: str, size: int, sampler: str = "same",
                      seed: int | None = None, mode: str = "greedy", source_data: str = "",
                      source_split: str = "train") -> dict[str, float]:
  """A pre-training set of ``size`` source indices: ``sampler`` ``'same'``
  (:func:`same_distribution_indices`), ``'elastic'``
  (:func:`elastic_distribution_indices` with ``mode``) or ``'uniform'`` (the
  baseline, ignores the prior). ``prior``: a ``target_prior`` stage's
  ``'artifact:<stage>/prior'``; ``seed`` defaults to ``config.seed``.
  Artifacts: ``indices`` (a stream's ``index``) and ``stats`` (the label
  histogram)."""
  where = f"config.stages.{ctx.name}"
  seed = int(ctx.config.seed) if seed is None else int(seed)
  if sampler not in SAMPLERS:
    raise RegistryError(f"{where}.sampler must be one of {SAMPLERS}, got {sampler!r}.")
  arrays = ctx.artifacts.load(prior, f"{where}.prior")
  if not isinstance(arrays, dict) or not {"p_t", "weights"} <= set(arrays):
    raise RegistryError(f"{where}.prior={prior!r} is not a target_prior artifact (p_t, "
                        "weights).")
  labels, k = _dataset_labels(ctx, source_data or ctx.config.data.name, source_split)
  if len(arrays["p_t"]) != k:
    raise RegistryError(f"{where}.prior: P_t has {len(arrays['p_t'])} classes, the source "
                        f"dataset {k}.")
  try:
    if sampler == "same":
      idx = same_distribution_indices(labels, arrays["p_t"], size, seed=seed)
    elif sampler == "elastic":
      idx = elastic_distribution_indices(labels, arrays["weights"], size, seed=seed, mode=mode)
    else:
      idx = uniform_indices(len(labels), size, seed=seed)
  except RegistryError as e:
    raise RegistryError(f"{where}: {e}") from None
  stats = histogram_stats(labels, idx, arrays["p_t"])
  ctx.artifacts.save("indices", idx)
  ctx.artifacts.save("stats", stats)
  print(f"importance_sample ({sampler}): {len(idx)} indices, {stats['num_distinct']} distinct, "
        f"{stats['num_classes']} classes, TV distance to P_t {stats['tv_distance']:.3f}",
        flush=True)
  return {"size": float(len(idx)), "num_distinct": float(stats["num_distinct"]),
          "num_classes": float(stats["num_classes"]), "tv_distance": stats["tv_distance"]}

