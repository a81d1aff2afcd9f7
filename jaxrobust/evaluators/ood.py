"""OOD detection: several scores against several OOD sets.

Each score of ``scores`` (registered in :mod:`jaxrobust.scores`; higher = more
in-distribution) is computed on the in-distribution ``split`` of the task and
on every OOD set, and compared with the metric convention of ``preset``
(:func:`jaxrobust.metrics.ood.ood_metrics`: which class is positive, how the
95%-TPR point is picked, AUPR in or out). Result keys:

* ``ood/<score>/<set>/<metric>`` -- e.g. ``ood/energy/blobs/fpr95``;
* ``ood/<score>/mean/<metric>`` -- the average over the sets;
* ``ood/<score>/<group>/<metric>`` -- with ``groups`` (``{'near': ('cifar100',
  'tin'), 'far': (...)}``), the average over each group's sets, as OpenOOD's
  ``nearood`` / ``farood`` rows (the mean of the per-set metrics);
* ``ood/id_accuracy`` -- with ``id_accuracy`` (default: on for the
  ``openood`` preset), the classifier's top-1 accuracy on the in-distribution
  split (OpenOOD's ``ID Acc``; labels < 0 left out).

The metric names say the convention where two presets would otherwise share
a name for different quantities (:data:`METRICS`): the ``openood`` preset's
FPR is ``fpr95_ood_positive`` (the fraction of **in-distribution** examples
flagged at the first threshold flagging >= 95% of the OOD examples), never
``fpr95``, which the ``energy`` preset uses with the in-distribution class
positive (the fraction of OOD accepted at 95% ID accepted).

A score entry is a spec (``'msp'``, ``'energy(temperature=10)'``,
``'odin(temperature=1000, epsilon=0.0014)'``, ``'mahalanobis'``), keyed by its
name, or a ``{result name: spec}`` mapping when one score appears twice. A spec
may be an artifact holding one (``'artifact:tune/best:spec'``, written by the
``tune_score`` stage task). A spec mapping may add ``perturb`` (a
:mod:`jaxrobust.attacks` spec) to pre-process inputs before scoring. Scores
with a ``fit`` (Mahalanobis) are fitted on the task's training split once per
evaluation.

**Protocol.** With ``fraction > 0`` each OOD set is subsampled to ``fraction``
× the in-distribution count ``draws`` times with seeded draws, and the metrics
are averaged over draws. Left unset, both follow the ``preset``'s reference
code (:data:`PROTOCOLS`): hendrycks 1/5 and 5 draws (HPT/OE ``num_to_avg``),
energy 1/5 and 10 draws (the energy code's ``run.sh``), openood and lee every
OOD example once. Only the drawn examples are scored. ``fraction = 0`` scores
every OOD example once (AUPR then depends on the sets' sizes: 10,000 OOD vs 360
test digits puts AUPR-out near 1). Results
go under ``<prefix>/`` (default ``ood``), so two OOD evaluators with different
protocols can run side by side. One figure per score,
``plots/ood_<score>.png``: the ROC curves of every set and each set's score
histograms against the in-distribution split.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Mapping

import jax
import numpy as np

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import attacks
from jaxrobust import scores as scores_lib
from jaxrobust.data import pipeline
from jaxrobust.evaluators import EVALUATORS, EvalContext, Evaluator, parse_set
from jaxrobust.metrics import ood as ood_metrics
from jaxrobust.registry import RegistryError, parse_spec


def _score_specs(scores: Any, where: str) -> dict[str, dict[str, Any]]:
  """``('msp', 'energy(temperature=2)')`` or ``{name: spec}`` -> {name: {score, perturb}}."""
  if isinstance(scores, str):
    scores = (scores,)
  items = (list(scores.items()) if hasattr(scores, "items")
           else [(parse_spec(s).name, s) for s in scores])
  out: dict[str, dict[str, Any]] = {}
  for name, spec in items:
    if name in out:
      raise RegistryError(f"{where}: score {name!r} twice; give the scores as a mapping "
                          "{result name: spec} to compare variants of one score.")
    spec = spec.to_dict() if hasattr(spec, "to_dict") else spec
    perturb = ""
    if isinstance(spec, Mapping) and "score" in spec:
      spec = dict(spec)
      perturb = spec.pop("perturb", "") or ""
      extra = set(spec) - {"score"}
      if extra:
        raise RegistryError(f"{where}.{name}: unknown key(s) {sorted(extra)}; a score entry "
                            "has 'score' and optionally 'perturb'.")
      spec = spec["score"]
    out[str(name)] = {"score": spec, "perturb": perturb}
  if not out:
    raise RegistryError(f"{where}: no scores.")
  return out


#: preset -> (fraction, draws) of its reference code.
PROTOCOLS = {"hendrycks": (0.2, 5), "energy": (0.2, 10), "openood": (0.0, 1), "lee": (0.0, 1)}
#: preset -> {metric of :func:`jaxrobust.metrics.ood.ood_metrics`: result name}, where
#: the result name differs (it names the convention).
RENAMED = {"openood": {"fpr95": "fpr95_ood_positive"}}
#: preset -> the metric names of its results (``<prefix>/<score>/<set>/<name>``).
METRICS: dict[str, tuple[str, ...]] = {
    "hendrycks": ("auroc", "aupr_out", "fpr95"),
    "energy": ("auroc", "aupr_in", "fpr95"),
    "openood": ("auroc", "aupr_in", "aupr_out", "fpr95_ood_positive"),
    "lee": ("tnr95", "auroc", "detection_accuracy", "aupr_in", "aupr_out"),
}
#: Metrics where lower is better.
LOWER_IS_BETTER = ("fpr95", "fpr95_ood_positive")


def _groups(groups: Any, sets: Mapping[str, Any], where: str) -> dict[str, tuple[str, ...]]:
  """``{group: (set key, ...)}`` checked against the evaluator's sets."""
  groups = groups.to_dict() if hasattr(groups, "to_dict") else groups
  if not groups:
    return {}
  if not hasattr(groups, "items"):
    raise RegistryError(f"{where}: give {{group: (set, ...)}}, got {groups!r}.")
  out = {}
  for name, members in dict(groups).items():
    key = f"{where}.{name}"
    if not isinstance(name, str) or not name or "/" in name or name == "mean" or name in sets:
      raise RegistryError(f"{key}: a group name must be a non-empty string without '/', "
                          f"other than 'mean' and the set names {sorted(sets)}.")
    members = (members,) if isinstance(members, str) else tuple(members or ())
    if not members:
      raise RegistryError(f"{key}: no sets.")
    unknown = [m for m in members if m not in sets]
    if unknown:
      raise RegistryError(f"{key}: unknown set(s) {unknown}; the sets are {sorted(sets)}.")
    if len(set(members)) != len(members):
      raise RegistryError(f"{key}: a set twice in {list(members)}.")
    out[name] = members
  return out


@EVALUATORS.register("ood")
class OOD(Evaluator):
  """OOD detection of ``sets`` against the task's ``split``.

  Args:
    sets: ``{name: 'dataset[/config]:split'}`` of OOD data.
    scores: score specs (see the module docstring); default MSP and energy.
    split: the in-distribution split of ``config.data.name``.
    preset: metric convention: hendrycks | energy | openood | lee (result
      names: :data:`METRICS`).
    fraction: OOD examples per draw as a fraction of the in-distribution
      count (0: all of them, once); None: the preset's protocol.
    draws: number of seeded draws averaged when ``fraction > 0``; None: the
      preset's protocol.
    prefix: the first part of the result keys.
    groups: ``{group: (set key, ...)}``: also the average of each metric
      over each group's sets, ``<prefix>/<score>/<group>/<metric>``.
    id_accuracy: also ``<prefix>/id_accuracy``, the top-1 accuracy on
      ``split``; None: on for the ``openood`` preset.
    gray_to_rgb: repeat the one-channel images of OOD sets into three when
      the model takes three (OpenOOD reads every image with
      ``convert('RGB')``; MNIST for a CIFAR model).
    save: at the end, write ``<prefix>_scores_<split>.npz`` and
      ``<prefix>_scores_<set>.npz`` (one array per score, in dataset order;
      with ``fraction > 0``, of the drawn examples only) to the run's
      artifacts.
  """

  def __init__(self, ctx: EvalContext, sets: Mapping[str, str] | None = None,
               scores: Any = ("msp", "energy"), split: str = "test",
               preset: str = "hendrycks", fraction: float | None = None,
               draws: int | None = None, groups: Mapping[str, Any] | None = None,
               id_accuracy: bool | None = None, gray_to_rgb: bool = False,
               save: bool = False, prefix: str = "ood"):
    super().__init__(ctx)
    self.save, self.prefix = bool(save), str(prefix)
    where = ctx.where
    if preset not in ood_metrics.PRESETS:
      raise RegistryError(f"{where}.preset={preset!r}; known: {', '.join(ood_metrics.PRESETS)}.")
    fraction = PROTOCOLS[preset][0] if fraction is None else fraction
    draws = PROTOCOLS[preset][1] if draws is None else draws
    if fraction < 0 or draws < 1:
      raise RegistryError(f"{where}: fraction must be >= 0 and draws >= 1.")
    self.preset, self.fraction, self.draws = preset, float(fraction), int(draws)
    self.groups = _groups(groups, dict(sets or {}), f"{where}.groups")
    self.id_accuracy = preset == "openood" if id_accuracy is None else bool(id_accuracy)
    self.sets = {}
    for key, entry in dict(sets or {}).items():
      name, set_split = parse_set(entry, f"{where}.sets.{key}")
      self.sets[key] = self.ctx.load(name, set_split, key=f"sets.{key}",
                                     rgb=bool(gray_to_rgb) and ctx.image_shape[-1] == 3)
      if len(self.sets[key]) == 0:
        raise RegistryError(f"{where}.sets.{key}: {entry!r} is empty.")
    self.in_split = split
    self.in_source = ctx.load(ctx.data.name, split, key="split") if self.sets else None
    self.scores = {}
    for name, s in _score_specs(scores, f"{where}.scores").items():
      spec = s["score"]
      if artifacts_lib.is_ref(spec):
        spec = (ctx.artifacts or artifacts_lib.Artifacts()).load(spec, f"{where}.scores.{name}")
      method = scores_lib.build(spec, where=f"{where}.scores.{name}")
      if s["perturb"]:
        perturb = attacks.build(s["perturb"], where=f"{where}.scores.{name}.perturb")
        key = str(s["perturb"])
      else:
        perturb, key = method.perturb, (method.key if method.perturb is not None else "")
      self.scores[name] = (method, perturb, key)
    n_in = len(self.in_source) if self.in_source is not None else 0
    self.draws_of: dict[str, list[np.ndarray]] = {}
    for key, src in list(self.sets.items()):
      if self.fraction <= 0:
        continue
      k = max(1, int(n_in * self.fraction))
      if k > len(src):
        raise RegistryError(f"{where}.fraction={self.fraction} asks for {k} OOD examples; "
                            f"set {key!r} has {len(src)}.")
      rng = np.random.default_rng([ctx.data.seed, zlib.crc32(key.encode())])
      draws = [rng.permutation(len(src))[:k] for _ in range(self.draws)]
      union = np.unique(np.concatenate(draws))
      self.sets[key] = pipeline.subset(src, union)  # only the drawn examples are scored
      self.draws_of[key] = [np.searchsorted(union, d) for d in draws]

  def _scores(self, state: Any, source: Any, extra: tuple[str, ...] = ()
              ) -> dict[str, np.ndarray]:
    """Every score on ``source`` (and the prediction fields ``extra``): the
    unperturbed ones in one pass, each perturbed one in its own (the
    perturbation depends on the score)."""
    out = {}
    plain = {n: m for n, (m, perturb, _) in self.scores.items() if perturb is None}
    if plain or extra:
      out.update(self.ctx.predict(state, source, tuple(plain) + extra, scores=plain))
    for n, (m, perturb, key) in self.scores.items():
      if perturb is not None:
        out[n] = self.ctx.predict(state, source, (n,), perturb=perturb, perturb_key=key,
                                  scores={n: m})[n]
    return out

  def _metrics(self, s_in: np.ndarray, s_out: np.ndarray, set_key: str) -> dict[str, float]:
    draws = [s_out[d] for d in self.draws_of[set_key]] if set_key in self.draws_of else [s_out]
    per_draw = [ood_metrics.ood_metrics(s_in, d, preset=self.preset) for d in draws]
    renamed = RENAMED.get(self.preset, {})
    return {renamed.get(k, k): float(np.mean([float(m[k]) for m in per_draw]))
            for k in per_draw[0]}

  def evaluate(self, state: Any, *, plots_dir: str | None = None, final: bool = False
               ) -> dict[str, float]:
    if not self.sets:
      return {}
    results: dict[str, float] = {}
    in_scores = self._scores(state, self.in_source,
                             ("logits", "label") if self.id_accuracy else ())
    if self.id_accuracy:
      logits, labels = in_scores.pop("logits"), in_scores.pop("label")
      labelled = labels >= 0
      if not labelled.any():
        raise ValueError(f"{self.ctx.where}: id_accuracy needs labels; "
                         f"{self.ctx.data.name}:{self.in_split} has none.")
      results[f"{self.prefix}/id_accuracy"] = float(np.mean(
          np.argmax(logits[labelled], axis=-1) == labels[labelled]))
    out_scores = {key: self._scores(state, src) for key, src in self.sets.items()}
    for name in self.scores:
      for key in self.sets:
        for metric, value in self._metrics(in_scores[name], out_scores[key][name], key).items():
          results[f"{self.prefix}/{name}/{key}/{metric}"] = value
      for metric in {k.rsplit("/", 1)[1] for k in results
                     if k.startswith(f"{self.prefix}/{name}/")}:
        per_set = {key: results[f"{self.prefix}/{name}/{key}/{metric}"] for key in self.sets}
        results[f"{self.prefix}/{name}/mean/{metric}"] = float(np.mean(list(per_set.values())))
        for group, members in self.groups.items():
          results[f"{self.prefix}/{name}/{group}/{metric}"] = float(np.mean(
              [per_set[key] for key in members]))
    if self.save and final:
      self.ctx.save(f"{self.prefix}_scores_{self.in_split}", in_scores)
      for key, scores in out_scores.items():
        self.ctx.save(f"{self.prefix}_scores_{key}", scores)
    if plots_dir and jax.process_index() == 0:
      self._plots(plots_dir, in_scores, out_scores)
    return results

  def _plots(self, plots_dir: str, in_scores, out_scores) -> None:
    from jaxrobust import plots
    task = f"{self.ctx.data.name}:{self.in_split}"
    for name in self.scores:
      plots.ood_summary(
          in_scores[name], {key: out_scores[key][name] for key in self.sets}, score=name,
          in_label=task, title=f"OOD detection by {name}: {task} vs each OOD set",
          path=os.path.join(plots_dir, f"{self.prefix}_{name}.png"))
