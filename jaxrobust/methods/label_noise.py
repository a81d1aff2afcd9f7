"""Label corruption, forward loss correction and the Gold Loss Correction (GLC).

Papers: Hendrycks, Lee, Mazeika, "Using Pre-Training Can Improve Model
Robustness and Uncertainty" (ICML 2019, §4.1 label corruption); Hendrycks,
Mazeika, Wilson, Gimpel, "Using Trusted Data to Train Deep Networks on Labels
Corrupted by Severe Noise" (NeurIPS 2018: GLC); Patrini et al., "Making Deep
Neural Networks Robust to Label Noise: a Loss Correction Approach" (CVPR 2017:
forward correction with anchor points).

Reference code: ``hendrycks/pre-training`` ``robustness/label_corruption/``
(``load_corrupted_ours_hierarchical.py``, ``train_glc.py``,
``train_forward.py``; the GLC code comes from ``mmazeika/glc``).

**Corruption** (:func:`corruption_matrix`, :func:`corrupt_labels`). ``C[i, j] =
p(ỹ = j | y = i)``; a noisy label is drawn from row ``C[y]``:

* ``uniform`` -- ``C = (1 − s)·I + s/K·11ᵀ`` (a corrupted label may stay
  correct; the reference's ``unif``);
* ``flip`` -- ``1 − s`` on the diagonal and ``s`` on ONE other class per row,
  drawn with the seed;
* ``hierarchical`` -- ``s`` spread uniformly over the other classes of the
  same group (the reference: CIFAR-100's coarse classes). Groupings for the
  datasets we ship are module constants: :data:`DIGITS_GROUPS`,
  :data:`GLYPHS_GROUPS`, :data:`CIFAR100_GROUPS` (by name in
  :data:`GROUPINGS`).

**Trusted ("gold") split** (:func:`trusted_split`): a fraction ``g`` of the
training set keeps its true labels; only the rest ("silver") is corrupted.
As the reference: for ``g ≥ 0.05`` the first ``⌊g·N⌋`` examples of a random
order, redrawn until every class is among them; below, ``⌊g·N/K⌋`` examples
of every class.

**GLC** (``train_glc.py``): phase 1 trains with CE on the silver part only;
``Ĉ[i, :]`` = the phase-1 model's mean softmax over the gold examples of true
class ``i`` (:func:`estimate_glc_matrix`); phase 2 re-initialises the model
(NOT from phase 1) and trains on gold ∪ silver with CE on gold rows and
``−log Σ_i softmax_i(x)·Ĉ[i, ỹ]`` on silver rows, ``(sum_gold + sum_silver) /
batch_size``. **Forward** (``train_forward.py``): every label noisy (gold
fraction 0), phase 1 CE, ``Ĉ[i, :]`` = the softmax of the example with the
highest ``p(i | x)`` (an anchor point; :func:`estimate_anchor_matrix`; for
CIFAR-10 only, probabilities ≥ the 97th percentile of that class are zeroed
first), phase 2 re-initialised with the corrected loss on every row. Both
estimates use the phase-1 model in eval mode on un-augmented training images
(the reference's ``test_transform``). The "no correction" baseline trains with
CE on every example (``train.py`` / ``tune.py`` with gold fraction 0; with
trusted data, on gold ∪ silver as in the GLC paper).

Hooks registered here:

* index list ``trusted(fraction, seed=0, part='gold')`` -- the dataset
  indices of the trusted (``'gold'``) or untrusted (``'silver'``) part;
* label source ``corrupted(kind='uniform', strength=0.3, seed=0,
  gold_fraction=0.0, groups=None)`` -- noisy labels on the silver part, true
  labels on the gold part (the same split as ``trusted``), and a ``group``
  field: 1 = trusted, 0 = untrusted;
* loss term ``forward_corrected(stream='train', matrix='corruption_matrix',
  trusted_group=1)`` reading ``Ĉ`` from ``config.constants``;
* stage task ``estimate_corruption(checkpoint, method='glc', ...)`` saving
  ``Ĉ`` as the artifact ``matrix`` (``'artifact:<stage>/matrix'``);
* :func:`recipe` assembles the stages of one arm (``ce``, ``forward``,
  ``glc``); the arm's result is the stage named by :func:`final_stage`.

Departures from the reference (documented, deliberate):

* Random numbers: numpy ``default_rng`` streams keyed by ``(seed, purpose)``
  instead of the global ``np.random.seed``; corruption, the flip targets and
  the trusted split are deterministic in ``seed`` but not bit-identical to the
  reference's. Noisy labels are drawn for every example and the gold ones then
  restored, so an example's noisy label does not depend on the gold fraction
  (paired comparisons across fractions).
* Trusted split: the reference keeps the dataset's order when its first
  ``⌊g·N⌋`` examples already hold every class (CIFAR's order is random) and
  takes the FIRST ``⌊g·N/K⌋`` examples of each class below 5%; we always draw
  a seeded permutation (per class below 5%), so the split does not depend on
  how the dataset is stored. Below 5% the gold part has exactly
  ``K·⌊g·N/K⌋`` examples (the reference tops it up to ``⌊g·N⌋`` with
  arbitrary others; equal when ``g·N`` is a multiple of K, as for CIFAR at
  the paper's fractions).
* Anchor filter: the reference zeroes the filtered probabilities IN PLACE
  (``class_probs`` is a view of the probability matrix), so the anchors of
  later classes carry the zeros of earlier columns and their rows no longer
  sum to 1. We filter a copy: every row of ``Ĉ`` is a full softmax.
* The corrected loss is computed in log space, ``logsumexp(log_softmax(x) +
  log Ĉ[:, ỹ])`` with ``Ĉ`` clipped at :data:`MATRIX_FLOOR`, instead of
  ``log((softmax(x) · Ĉ[:, ỹ]).sum())`` (same value, no ``log 0``).
* In phase 2 the config's ``cross_entropy`` term stays with weight 0 (a
  stage's overrides cannot remove a loss term), so ``loss/cross_entropy``
  logs the uncorrected CE on the training labels for comparison.

As the reference, GLC's phase 2 runs the silver and the gold rows of a batch
through the network in two passes (``train_glc.py:389-397``: ``net(data_s)``,
then ``net(data_g)``), so BatchNorm normalises each subset by its own
statistics and updates its running averages twice, in that order: the recipe
sets ``streams.train.passes_by_group=(0, 1)`` (:mod:`jaxrobust.train_step`);
``()`` is one pass over the whole batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import special

from jaxrobust.config import merge
from jaxrobust.data.streams import INDEX, LABELS, LabelFn, StreamData
from jaxrobust.losses import LOSSES, LossInputs, masked_mean
from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS, StageContext, predict_outputs

Array = jax.Array

KINDS = ("uniform", "flip", "hierarchical")
METHODS = ("ce", "forward", "glc")
ESTIMATORS = ("glc", "anchor")
# train_glc.py / load_corrupted_ours_hierarchical.py: from this trusted fraction
# on, the gold part is a random draw redrawn until every class is in it.
RESHUFFLE_FROM = 0.05
MAX_RESHUFFLES = 1000
#: Lower bound on the entries of a corruption matrix before its log is taken.
MATRIX_FLOOR = 1e-12
#: train_forward.py filters anchors at the 97th percentile for CIFAR-10 only.
ANCHOR_PERCENTILE = {"cifar10": 97.0}
#: As train_glc.py / train_forward.py with --use_pretrained_model, 10 epochs at lr 0.01
#: (both phases), the rest as tune.py (jaxrobust.methods.transfer.fine_tune).
PRETRAINED_FINETUNE: Mapping[str, Any] = {"num_epochs": 10.0, "learning_rate": 0.01}
# Purposes of the random streams, keyed with the seed.
_FLIP, _CORRUPT, _SPLIT = 1, 2, 3

# Groupings for ``hierarchical`` corruption: group id per class.
#
#: ``digits`` (0-9) by stroke shape, so that a label is replaced by a digit
#: that looks alike (as CIFAR-100's coarse classes group look-alike fine
#: classes): closed loops {0, 6, 8, 9}, straight strokes {1, 4, 7}, open curves
#: {2, 3, 5}. Every group has >= 3 classes, so the noise is spread (a group of
#: two would make ``hierarchical`` a fixed symmetric flip).
DIGITS_GROUPS: tuple[int, ...] = (0, 1, 2, 2, 1, 2, 0, 1, 0, 0)
#: ``glyphs`` (0-9, A-Z, a-z): the digits as DIGITS_GROUPS, then each letter with
#: its other case (A/a, B/b, ...; several are the same shape in most fonts:
#: c, o, s, v, w, x, z).
GLYPHS_GROUPS: tuple[int, ...] = (DIGITS_GROUPS + tuple(3 + i for i in range(26))
                                  + tuple(3 + i for i in range(26)))
#: CIFAR-100's own fine -> coarse (20 superclasses) map, the reference's grouping.
CIFAR100_GROUPS: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13)
#: The groupings of ``hierarchical`` corruption by dataset name.
GROUPINGS: Mapping[str, tuple[int, ...]] = {
    "digits": DIGITS_GROUPS, "glyphs": GLYPHS_GROUPS, "cifar100": CIFAR100_GROUPS}


# --- corruption ------------------------------------------------------------------

def _rng(seed: int, purpose: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), purpose])


def dataset_base(name: str) -> str:
  """``'glyphs/small:1.0.0'`` -> ``'glyphs'`` (the key of :data:`GROUPINGS`)."""
  return str(name).split(":")[0].split("/")[0]


def resolve_groups(groups: Any, num_classes: int, *, dataset: str = "") -> np.ndarray:
  """``int[K]`` group ids from a sequence, a name in :data:`GROUPINGS`, or
  (``None``) the grouping of ``dataset``."""
  if groups is None:
    if dataset_base(dataset) not in GROUPINGS:
      raise RegistryError(
          "hierarchical corruption needs groups: a group id per class, or the name of a "
          f"grouping ({', '.join(GROUPINGS)})"
          + (f"; there is none for dataset {dataset!r}." if dataset else "."))
    groups = dataset_base(dataset)
  if isinstance(groups, str):
    if groups not in GROUPINGS:
      raise RegistryError(f"groups={groups!r}: no such grouping; known: "
                          f"{', '.join(GROUPINGS)}.")
    groups = GROUPINGS[groups]
  g = np.asarray(groups).reshape(-1)
  if len(g) != num_classes or not np.issubdtype(g.dtype, np.integer):
    raise RegistryError(f"groups must be {num_classes} integer group ids (one per class); got "
                        f"{len(g)} values of type {g.dtype}.")
  return g.astype(np.int64)


def _check_corruption(kind: str, strength: float) -> None:
  if kind not in KINDS:
    from jaxrobust.registry import suggest
    raise RegistryError(f"kind={kind!r}: unknown corruption{suggest(kind, KINDS)}; known: "
                        f"{', '.join(KINDS)}.")
  if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
      0.0 <= strength <= 1.0):
    raise RegistryError(f"strength={strength!r}: the corruption strength must be in [0, 1].")


def corruption_matrix(kind: str, strength: float, num_classes: int, *, seed: int = 0,
                      groups: Any = None) -> np.ndarray:
  """The row-stochastic ``float64 [K, K]`` matrix ``C[i, j] = p(ỹ = j | y = i)``.

  Args:
    kind: ``'uniform'``, ``'flip'`` or ``'hierarchical'`` (module docstring).
    strength: ``s`` in [0, 1].
    num_classes: K.
    seed: draws the flip targets (``flip`` only).
    groups: ``hierarchical``: ``int[K]`` group id per class or a name in
      :data:`GROUPINGS`; every group needs at least two classes.
  """
  _check_corruption(kind, strength)
  k, s = int(num_classes), float(strength)
  if k < 2:
    raise RegistryError(f"label corruption needs at least 2 classes, got {k}.")
  c = (1.0 - s) * np.eye(k)
  if kind == "uniform":
    return c + s / k
  if kind == "flip":
    rng = _rng(seed, _FLIP)
    for i in range(k):
      others = np.delete(np.arange(k), i)
      c[i, others[rng.integers(k - 1)]] += s
    return c
  g = resolve_groups(groups, k)
  for i in range(k):
    same = np.flatnonzero((g == g[i]) & (np.arange(k) != i))
    if not len(same):
      raise RegistryError(f"groups: class {i} is alone in group {int(g[i])}; hierarchical "
                          "corruption spreads its noise over the other classes of the group, "
                          "so every group needs at least two classes.")
    c[i, same] += s / len(same)
  return c


def _check_matrix(matrix: np.ndarray, num_classes: int | None = None, what: str = "matrix"
                  ) -> np.ndarray:
  m = np.asarray(matrix, np.float64)
  k = m.shape[0] if m.ndim == 2 else -1
  if m.ndim != 2 or m.shape != (k, k) or (num_classes is not None and k != num_classes):
    raise RegistryError(f"{what} has shape {m.shape}; it must be [K, K]"
                        + (f" with K = {num_classes}." if num_classes else "."))
  if np.any(m < 0) or not np.allclose(m.sum(1), 1.0, atol=1e-6):
    raise RegistryError(f"{what}: rows must be >= 0 and sum to 1 (row sums "
                        f"{np.round(m.sum(1), 6).tolist()}).")
  return m


def corrupt_labels(labels: np.ndarray, matrix: np.ndarray, *, seed: int) -> np.ndarray:
  """Noisy labels ``ỹ ~ C[y, :]`` (``int32[N]``), deterministic in ``seed``."""
  labels = np.asarray(labels).reshape(-1)
  c = _check_matrix(matrix)
  k = c.shape[0]
  if labels.size and (labels.min() < 0 or labels.max() >= k):
    raise RegistryError(f"labels must be class ids in [0, {k}); found "
                        f"{int(labels.min())}..{int(labels.max())}.")
  cdf = np.cumsum(c, axis=1)
  cdf /= cdf[:, -1:]  # the last entry exactly 1: u < 1 never passes it
  u = _rng(seed, _CORRUPT).random(len(labels))
  return (u[:, None] >= cdf[labels]).sum(1).astype(np.int32)


def trusted_split(labels: np.ndarray, fraction: float, num_classes: int, *, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(gold_idx, silver_idx)``: sorted dataset indices of the trusted and
  untrusted parts (disjoint, together every index).

  As the reference: for ``fraction ≥ 0.05`` the first ``⌊g·N⌋`` of a random
  order, redrawn until every class is among them; below, ``⌊g·N/K⌋`` random
  examples of every class. ``fraction = 0``: no trusted part. A fraction too
  small to hold an example of every class raises.
  """
  labels = np.asarray(labels).reshape(-1)
  n, k = len(labels), int(num_classes)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0.0 <= fraction <= 1.0):
    raise RegistryError(f"the trusted fraction must be in [0, 1], got {fraction!r}.")
  everything = np.arange(n, dtype=np.int64)
  if fraction == 0:
    return np.zeros(0, np.int64), everything
  if n and (labels.min() < 0 or labels.max() >= k):
    raise RegistryError(f"the trusted split needs class labels in [0, {k}); found "
                        f"{int(labels.min())}..{int(labels.max())}.")
  counts = np.bincount(labels, minlength=k)
  if np.any(counts == 0):
    raise RegistryError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no example in "
                        "the data, so no trusted part can hold every class.")
  too_small = (f"trusted fraction {fraction} is too small to hold every class: {k} classes "
               f"need at least {k} of the {n} examples (fraction >= {k / n:.4g}).")
  rng = _rng(seed, _SPLIT)
  if fraction >= RESHUFFLE_FROM:
    size = int(np.floor(fraction * n + 1e-9))
    if size < k:
      raise RegistryError(too_small)
    for _ in range(MAX_RESHUFFLES):
      gold = rng.permutation(n)[:size]
      if len(np.unique(labels[gold])) == k:
        break
    else:
      raise RegistryError(f"trusted fraction {fraction}: {MAX_RESHUFFLES} random draws of "
                          f"{size} examples all missed a class; raise the fraction.")
  else:
    per = int(np.floor(fraction * n / k + 1e-9))
    if per == 0:
      raise RegistryError(too_small)
    short = np.flatnonzero(counts < per)
    if len(short):
      raise RegistryError(f"trusted fraction {fraction} takes {per} examples per class; "
                          f"class(es) {short.tolist()} have fewer.")
    gold = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per]
                           for c in range(k)])
  gold = np.sort(gold).astype(np.int64)
  return gold, np.setdiff1d(everything, gold)


def noisy_labels(labels: np.ndarray, num_classes: int, *, kind: str = "uniform",
                 strength: float = 0.3, seed: int = 0, gold_fraction: float = 0.0,
                 groups: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """``(labels int32[N], group int32[N])`` of a whole split: true labels on
  the trusted part (``group`` 1, :func:`trusted_split`), noisy ones elsewhere
  (``group`` 0). What the ``corrupted`` label source gives."""
  labels = np.asarray(labels).reshape(-1)
  c = corruption_matrix(kind, strength, num_classes, seed=seed, groups=groups)
  gold, _ = trusted_split(labels, gold_fraction, num_classes, seed=seed)
  out = corrupt_labels(labels, c, seed=seed)
  out[gold] = labels[gold]
  group = np.zeros(len(labels), np.int32)
  group[gold] = 1
  return out, group


# --- estimators ------------------------------------------------------------------

def _check_probs(probs: np.ndarray, num_classes: int) -> np.ndarray:
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or p.shape[1] != num_classes:
    raise RegistryError(f"probs has shape {p.shape}; expected [N, {num_classes}].")
  return p


def estimate_glc_matrix(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """GLC's ``Ĉ``: row ``i`` = the mean predicted distribution over the trusted
  examples of true class ``i`` (``float64 [K, K]``)."""
  p = _check_probs(probs, num_classes)
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(p):
    raise RegistryError(f"{len(labels)} labels for {len(p)} predictions.")
  counts = np.bincount(labels, minlength=num_classes) if len(labels) else np.zeros(num_classes)
  missing = np.flatnonzero(counts[:num_classes] == 0)
  if len(missing):
    raise RegistryError(f"GLC: class {int(missing[0])} has no trusted example (classes without "
                        f"one: {missing.tolist()}); raise the trusted fraction.")
  sums = np.zeros((num_classes, num_classes))
  np.add.at(sums, labels, p)
  return sums / counts[:num_classes, None]


def estimate_anchor_matrix(probs: np.ndarray, num_classes: int,
                           filter_percentile: float | None = None) -> np.ndarray:
  """Forward correction's ``Ĉ`` from anchor points: row ``i`` = the predicted
  distribution of the example with the highest ``p(i | x)``. With
  ``filter_percentile`` (97 for CIFAR-10 in the reference) the probabilities
  ``p(i | x)`` at or above that percentile of class ``i`` (numpy
  ``method='higher'``) are first set to 0, so the anchor is the highest
  remaining one (robust to outliers). Filtering works on a copy (see the
  module docstring)."""
  p = _check_probs(probs, num_classes)
  if not len(p):
    raise RegistryError("anchor estimate: no examples.")
  if filter_percentile is not None and not 0 < filter_percentile <= 100:
    raise RegistryError(f"filter_percentile must be in (0, 100], got {filter_percentile}.")
  c = np.zeros((num_classes, num_classes))
  for i in range(num_classes):
    col = p[:, i].copy()
    if filter_percentile is not None:
      col[col >= np.percentile(col, filter_percentile, method="higher")] = 0.0
    c[i] = p[int(np.argmax(col))]
  return c


# --- hooks: index list and label source -------------------------------------------

def _labels_and_k(data: StreamData, where: str) -> tuple[np.ndarray, int]:
  if data.num_classes is None:
    raise RegistryError(f"{where}: the stream's data has no class labels of the task.")
  return data.labels, int(data.num_classes)


@INDEX.register("trusted")
def trusted(data: StreamData, fraction: float, seed: int = 0, part: str = "gold") -> np.ndarray:
  """The trusted (``part='gold'``) or untrusted (``'silver'``) dataset indices
  of :func:`trusted_split` on the stream's labels: the same split as the
  ``corrupted`` label source with ``gold_fraction=fraction`` and ``seed``."""
  where = f"{data.where}.index"
  if part not in ("gold", "silver"):
    raise RegistryError(f"{where}: part={part!r} must be 'gold' (trusted) or 'silver' "
                        "(untrusted).")
  labels, k = _labels_and_k(data, where)
  try:
    gold, silver = trusted_split(labels, fraction, k, seed=seed)
  except RegistryError as e:
    raise RegistryError(f"{where}: {e}") from None
  out = gold if part == "gold" else silver
  if not len(out):
    raise RegistryError(f"{where}: the {part} part of trusted(fraction={fraction}) is empty.")
  return out


@LABELS.register("corrupted")
def corrupted(data: StreamData, kind: str = "uniform", strength: float = 0.3, seed: int = 0,
              gold_fraction: float = 0.0, groups: Any = None) -> LabelFn:
  """Corrupted labels (:func:`noisy_labels`) with a ``group`` field (1 =
  trusted, 0 = untrusted), deterministic in ``seed`` -- not the stream's seed,
  so every stage of a recipe sees the same corruption. ``groups``
  (``hierarchical``): ``int[K]`` group ids or a name in :data:`GROUPINGS`."""
  where = f"{data.where}.labels"
  labels, k = _labels_and_k(data, where)
  try:
    noisy, group = noisy_labels(labels, k, kind=kind, strength=strength, seed=seed,
                                gold_fraction=gold_fraction, groups=groups)
  except RegistryError as e:
    raise RegistryError(f"{where}: {e}") from None
  return lambda idx, dataset_labels: {"label": noisy[idx], "group": group[idx]}


# --- loss ------------------------------------------------------------------------

def forward_corrected_loss(logits: Array, labels: Array, matrix: Array,
                           trusted: Array | None = None) -> Array:
  """Per-example loss: ``−log Σ_i softmax_i(x)·C[i, ỹ]`` (computed as
  ``−logsumexp(log_softmax(x) + log C[:, ỹ])``, ``C`` clipped at
  :data:`MATRIX_FLOOR`), and plain CE where ``trusted``."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  k = log_p.shape[-1]
  y = jnp.clip(labels, 0, k - 1)
  log_c = jnp.log(jnp.maximum(jnp.asarray(matrix, jnp.float32), MATRIX_FLOOR))
  corrected = -jax.nn.logsumexp(log_p + log_c[:, y].T, axis=-1)
  if trusted is None:
    return corrected
  ce = -jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]
  return jnp.where(trusted, ce, corrected)


def _matrix_shape(options: Mapping[str, Any], num_classes: int | None) -> dict[str, tuple]:
  if num_classes is None:
    return {}
  return {options["matrix"]: (num_classes, num_classes)}


def _check_forward(options: Mapping[str, Any], num_classes: int | None) -> None:
  del num_classes
  if not isinstance(options.get("matrix"), str) or not options["matrix"]:
    raise RegistryError(f"matrix={options.get('matrix')!r} must name a constant of "
                        "config.constants.")
  tg = options.get("trusted_group")
  if isinstance(tg, bool) or not isinstance(tg, int):
    raise RegistryError(f"trusted_group={tg!r} must be an int (the label source's group id of "
                        "trusted rows).")


@LOSSES.register("forward_corrected", info={"constants": _matrix_shape, "check": _check_forward})
def forward_corrected(inputs: LossInputs, *, stream: str = "train",
                      matrix: str = "corruption_matrix", trusted_group: int = 1
                      ) -> tuple[Array, dict[str, Array]]:
  """The GLC / forward-corrected loss on ``stream`` with ``Ĉ =
  constants[matrix]``: rows whose ``group`` is ``trusted_group`` (when the
  batch has a ``group`` field) take CE with their label, the others
  ``−log Σ_i softmax_i(x)·Ĉ[i, ỹ]``; the mean over valid rows (the
  reference's ``(sum_gold + sum_silver) / batch_size``)."""
  batch = inputs.batch[stream]
  logits = inputs.outputs[stream]["logits"]
  labels = batch["label"]
  if logits.shape[0] != labels.shape[0]:
    raise RegistryError(f"forward_corrected: stream {stream!r} has {inputs.views.get(stream)} "
                        "views; the term takes single-view streams.")
  mask = batch["mask"] & (labels >= 0)
  trusted_rows = batch["group"] == trusted_group if "group" in batch else None
  per_example = forward_corrected_loss(logits, labels, inputs.constants[matrix], trusted_rows)
  loss = masked_mean(per_example, mask)
  acc = masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)
  metrics = {f"{stream}/accuracy": acc}
  if trusted_rows is not None:
    metrics[f"{stream}/trusted_fraction"] = masked_mean(trusted_rows.astype(jnp.float32), mask)
  return loss, metrics


# --- stage task ------------------------------------------------------------------

def _format_matrix(c: np.ndarray) -> str:
  if len(c) <= 20:
    return np.array2string(c, precision=2, suppress_small=True, max_line_width=200)
  d = np.diag(c)
  return (f"[{len(c)}x{len(c)}] diagonal mean {d.mean():.3f} (min {d.min():.3f}, max "
          f"{d.max():.3f}), largest off-diagonal {np.max(c - np.diag(d)):.3f}")


@TASKS.register("estimate_corruption")
def estimate_corruption(ctx: StageContext, *, checkpoint: str, method: str = "glc",
                        gold_fraction: float = 0.05, seed: int = 0,
                        filter_percentile: float | None = None, kind: str = "",
                        strength: float = -1.0, groups: Any = None) -> dict[str, float]:
  """Estimates the corruption matrix ``Ĉ`` with a trained checkpoint's softmax
  over the training split of the ``train`` stream, and saves it as the
  artifact ``matrix`` (``config.constants = {'corruption_matrix':
  'artifact:<stage>/matrix'}``).

  Args:
    checkpoint: the phase-1 run (``'artifact:<stage>/checkpoint'`` or a path).
    method: ``'glc'`` (mean softmax per true class over the trusted part) or
      ``'anchor'`` (anchor points over the untrusted part: every example when
      ``gold_fraction`` is 0).
    gold_fraction, seed: the trusted split (as the ``corrupted`` labels).
    filter_percentile: ``anchor``: the percentile filter (97 for CIFAR-10).
    kind, strength, groups: the true corruption, when known: the results then
      hold the error of ``Ĉ`` (``error/max_abs``, ``error/mean_abs``) and the
      true matrix is saved as the artifact ``true_matrix``.
  """
  where = f"config.stages.{ctx.name}"
  if method not in ESTIMATORS:
    raise RegistryError(f"{where}.method={method!r} must be one of {ESTIMATORS}.")
  if method == "glc" and not gold_fraction > 0:
    raise RegistryError(f"{where}.gold_fraction={gold_fraction}: GLC estimates the matrix on "
                        "trusted examples; give a fraction > 0 (or method='anchor').")
  known = bool(kind) or strength >= 0
  if known and not (kind and strength >= 0):
    raise RegistryError(f"{where}: give both kind and strength of the true corruption, or "
                        "neither.")
  config = ctx.config
  train = config.streams.train
  data_name = train.get("data") or config.data.name
  out = predict_outputs(ctx, checkpoint=checkpoint, data=data_name, split=train.split,
                        fields=("logits", "label"))
  probs = special.softmax(np.asarray(out["logits"], np.float64), axis=-1)
  labels = np.asarray(out["label"])
  k = probs.shape[1]
  try:
    truth = (corruption_matrix(kind, strength, k, seed=seed,
                               groups=(resolve_groups(groups, k, dataset=data_name)
                                       if kind == "hierarchical" else None))
             if known else None)
    gold, silver = trusted_split(labels, gold_fraction, k, seed=seed)
    if method == "glc":
      c, used = estimate_glc_matrix(probs[gold], labels[gold], k), len(gold)
    else:
      c, used = estimate_anchor_matrix(probs[silver], k, filter_percentile), len(silver)
  except RegistryError as e:
    raise RegistryError(f"{where}: {e}") from None
  ctx.artifacts.save("matrix", {"matrix": c})
  results = {"num_examples": float(used), "diagonal_mean": float(np.mean(np.diag(c)))}
  text = f"estimate_corruption ({method}, {used} examples): C_hat =\n{_format_matrix(c)}"
  if truth is not None:
    ctx.artifacts.save("true_matrix", {"matrix": truth})
    err = np.abs(c - truth)
    results.update({"error/max_abs": float(err.max()), "error/mean_abs": float(err.mean())})
    text += (f"\n  vs the true {kind}({strength}) matrix: max |error| {err.max():.4f}, "
             f"mean |error| {err.mean():.4f}")
  print(text, flush=True)
  return results


# --- recipe ----------------------------------------------------------------------

def final_stage(method: str, prefix: str = "") -> str:
  """The stage whose results are the arm's (``f'{prefix}{method}'``)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  return f"{prefix}{method}"


def _intermediate_evaluators(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Overrides that leave an intermediate phase with classification on
  validation only (the config's splits when it evaluates no validation
  split, e.g. CIFAR's test, which the reference logs in phase 1 too)."""
  out: dict[str, Any] = {}
  for key, ev in config.evaluators.items():
    kind = ev.get("type")
    if kind == "classification":
      if "validation" in tuple(ev.get("splits", ("validation",))):
        out[key] = {"splits": ("validation",)}
    elif kind == "ood":
      out[key] = {"sets": {}}
    elif kind == "robust":  # cannot be switched off by overrides; made cheaper
      out[key] = {"split": "validation"}
  return out


def recipe(config: ml_collections.ConfigDict, *, method: str = "glc", kind: str = "uniform",
           strength: float = 0.3, gold_fraction: float = 0.05, seed: int = 0,
           init: str | None = None, prefix: str = "", groups: Any = None,
           filter_percentile: float | None | str = "auto",
           finetune: Mapping[str, Any] | None = None,
           overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
  """The stages of one label-noise arm on ``config``'s task
  (``c.stages = {**recipe(c, method='ce', prefix='a_'), **recipe(c, ...)}``).

  Args:
    config: the shared config (the recipe's).
    method: ``'ce'`` -- one stage ``{prefix}ce``, CE on the corrupted labels
      (all data; gold labels true when ``gold_fraction > 0``: the reference's
      "no correction" baseline on gold ∪ silver). ``'forward'`` --
      ``{prefix}forward_phase1`` (CE on noisy labels, gold fraction forced to
      0 as ``train_forward.py``), ``{prefix}forward_matrix`` (anchor
      estimate), ``{prefix}forward`` (re-initialised, forward-corrected loss).
      ``'glc'`` -- ``{prefix}glc_phase1`` (CE on the untrusted part only),
      ``{prefix}glc_matrix`` (GLC estimate on the trusted part), ``{prefix}glc``
      (re-initialised as phase 1 -- not from it -- on all data, trusted rows
      CE). The arm to report is :func:`final_stage` (``f'{prefix}{method}'``).
    kind, strength, seed, groups: the corruption (``corrupted`` label source);
      ``groups`` defaults to the dataset's grouping for ``hierarchical``.
    gold_fraction: the trusted fraction.
    init: a checkpoint or ``'artifact:<stage>/checkpoint'`` every training
      phase starts from (a fresh head; :func:`jaxrobust.methods.transfer.fine_tune`
      with :data:`PRETRAINED_FINETUNE` updated by ``finetune``); None: from
      scratch.
    prefix: prepended to every stage name (several arms in one recipe).
    filter_percentile: the anchor filter of ``forward``; ``'auto'``: 97 for
      CIFAR-10 (:data:`ANCHOR_PERCENTILE`), else none.
    finetune: options of ``fine_tune`` (``num_epochs``, ``learning_rate``,
      ``batch_size``) when ``init`` is given.
    overrides: config overrides of every training phase and of the estimate
      stage (e.g. the model).

  The final phase keeps the config's evaluators; intermediate phases only
  evaluate classification on validation.
  """
  final = final_stage(method, prefix)
  _check_corruption(kind, strength)
  if method == "forward":
    gold_fraction = 0.0
  if method == "glc" and not gold_fraction > 0:
    raise ValueError(f"GLC needs trusted data: gold_fraction > 0, got {gold_fraction}.")
  if kind == "hierarchical" and groups is None:
    groups = dataset_base(config.data.name)
    if groups not in GROUPINGS:
      raise ValueError(f"hierarchical corruption of {config.data.name!r}: no grouping in "
                       f"GROUPINGS ({', '.join(GROUPINGS)}); pass groups=.")
  if filter_percentile == "auto":
    filter_percentile = ANCHOR_PERCENTILE.get(dataset_base(config.data.name))
  if isinstance(groups, np.ndarray):
    groups = tuple(int(g) for g in groups)
  labels = (f"corrupted(kind={kind!r}, strength={float(strength)!r}, seed={int(seed)!r}, "
            f"gold_fraction={float(gold_fraction)!r}, groups={groups!r})")
  intermediate = {"evaluators": _intermediate_evaluators(config)}

  def phase(index: str = "", *, last: bool, corrected_by: str = "") -> dict[str, Any]:
    out = merge(overrides or {}, {"streams": {"train": {"labels": labels, "index": index}}})
    if corrected_by:
      out = merge(out, {
          "constants": {"corruption_matrix": f"artifact:{corrected_by}/matrix"},
          "losses": {"cross_entropy": {"weight": 0.0},
                     "forward_corrected": {"matrix": "corruption_matrix", "trusted_group": 1}}})
      if gold_fraction > 0:  # train_glc.py:389-397: net(data_s), then net(data_g)
        out = merge(out, {"streams": {"train": {"passes_by_group": (0, 1)}}})
    if not last:
      out = merge(out, intermediate)
    if init:
      from jaxrobust.methods import transfer
      out = transfer.fine_tune(out, source=init, **{**PRETRAINED_FINETUNE, **dict(finetune or {})})
    return {"task": "train", "config": out}

  def estimate(estimator: str, phase1: str) -> dict[str, Any]:
    stage = {"task": "estimate_corruption", "checkpoint": f"artifact:{phase1}/checkpoint",
             "method": estimator, "gold_fraction": float(gold_fraction), "seed": int(seed),
             "filter_percentile": filter_percentile if estimator == "anchor" else None,
             "kind": kind, "strength": float(strength), "groups": groups}
    if overrides:
      stage["config"] = merge({}, overrides)
    return stage

  if method == "ce":
    return {final: phase(last=True)}
  phase1, matrix = f"{final}_phase1", f"{final}_matrix"
  if method == "forward":
    return {phase1: phase(last=False), matrix: estimate("anchor", phase1),
            final: phase(last=True, corrected_by=matrix)}
  silver = f"trusted(fraction={float(gold_fraction)!r}, seed={int(seed)!r}, part='silver')"
  return {phase1: phase(silver, last=False), matrix: estimate("glc", phase1),
          final: phase(last=True, corrected_by=matrix)}
