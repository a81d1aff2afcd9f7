"""The papers of ``python -m launch.reproduce <paper>``: one module per paper,
each defining ``PAPER`` (a :class:`Paper`), and the machinery they share --
running a paper's recipe over seeds, tabulating mean ± std with paired
bootstrap intervals over test examples, and judging each claim.

A claim compares two arms on one metric; its difference (in the claimed
direction) is averaged over seeds and gets two 95% intervals, one per source
of noise:

* **seeds** (training randomness): a t-interval of the per-seed differences
  (the arms of one seed share a recipe run, e.g. the same pre-trained model);
* **test examples** (the finite test set): a paired bootstrap -- the same
  resampled test examples for both arms, every seed -- where the metric can
  be recomputed from saved per-example outputs.

It **holds** when the mean difference is in the claimed direction and every
interval excludes 0, is **inconclusive** when the direction is right but an
interval includes 0, and **does not hold** when the mean difference goes the
other way. Arms that a mode does not run (``--quick`` runs fewer) are left out
of the tables, and their claims are marked **not run**; so are the arms of a
run not yet finished (a report of a run still going), which the report names
(:func:`unfinished_arms`: in a seed's recipe, without results).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.stats import t as t_dist

BOOTSTRAP = 1000
QUICK_BOOTSTRAP = 200  # --quick: a smoke test, with wider Monte-Carlo error on the intervals

#: The kinds of OOD set, shared by every report: group -> (title, the OOD
#: evaluators' set names in it). Each report gives every ``<prefix>/<score>/
#: mean/<metric>`` also per group, as ``<prefix>/<score>/mean_<group>/<metric>``
#: (the mean over the group's sets that the arm scored), and judges every claim
#: on such a metric per group as well as over all sets.
OOD_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "near": ("near OOD: glyph letters", ("letters",)),
    "natural": ("natural images: photo patches", ("photo",)),
    "noise": ("synthetic noise", ("gaussian", "rademacher", "blobs", "uniform")),
}
OOD_GROUP_OF = {s: g for g, (_, sets) in OOD_GROUPS.items() for s in sets}
_SET_KEY = re.compile(r"^(?P<head>[^/]+/[^/]+)/(?P<set>[^/]+)/(?P<metric>[^/]+)$")

# Ceiling effects: a value past one of these leaves little room for any arm to
# improve, so a claim on it says little. metric-key suffix -> (higher is the
# ceiling, threshold). Papers add their own with ``Paper.ceilings``.
CEILINGS: dict[str, tuple[bool, float]] = {
    "accuracy": (True, 0.97), "auroc": (True, 0.99), "aupr_in": (True, 0.99),
    "aupr_out": (True, 0.99), "tnr95": (True, 0.98), "fpr95": (False, 0.02),
}


def ood_group_means(results: Mapping[str, float]) -> dict[str, float]:
  """``<prefix>/<score>/mean_<group>/<metric>`` for every group of
  :data:`OOD_GROUPS` with a set in ``results`` (``<prefix>/<score>/<set>/<metric>``)."""
  per: dict[str, list[float]] = {}
  for key, value in results.items():
    m = _SET_KEY.match(key)
    if m and m["set"] in OOD_GROUP_OF and isinstance(value, (int, float)):
      per.setdefault(f"{m['head']}/mean_{OOD_GROUP_OF[m['set']]}/{m['metric']}", []).append(
          float(value))
  return {k: float(np.mean(v)) for k, v in per.items()}


def group_key(key: str, group: str) -> str:
  """``'ood/msp/mean/fpr95'`` -> ``'ood/msp/mean_near/fpr95'`` (others unchanged)."""
  return key.replace("/mean/", f"/mean_{group}/")


def group_metric(m: Metric, group: str) -> Metric:
  return Metric(group_key(m.key, group), f"{m.label} — {OOD_GROUPS[group][0]}",
                m.higher_is_better,
                m.group_bootstrap(group) if m.group_bootstrap is not None else None)


@dataclasses.dataclass(frozen=True)
class Metric:
  """A result key of an arm, how to print it, and how to bootstrap it.

  Attributes:
    key: the key in the stage's results (``test/accuracy``).
    label: column title.
    higher_is_better: the direction of improvement.
    bootstrap: ``fn(artifacts, idx) -> value`` recomputing the metric on
      resampled test examples (``idx`` maps each artifact name to index
      arrays), or None (seed spread only).
    group_bootstrap: for a metric averaged over OOD sets (``.../mean/...``),
      ``fn(group) -> bootstrap`` of its mean over that group's sets (see
      :data:`OOD_GROUPS`), or None (the group figures get seed spread only).
  """
  key: str
  label: str
  higher_is_better: bool
  bootstrap: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], float] | None = None
  group_bootstrap: Callable[[str], Callable[..., float]] | None = None


@dataclasses.dataclass(frozen=True)
class Claim:
  """``better`` beats ``worse`` on ``metric`` (the paper's statement in ``text``).

  ``better`` and ``worse`` are arms, or ``'arm:metric'`` to compare two
  metrics (two scores of one model, say), or sums and differences of those
  (``'sup_s1-rand_s1'``: the gain of one arm over another, so a claim can
  compare gains, seed by seed and bootstrap round by round); ``metric`` gives
  the direction and the default metric of every term. With ``margin > 0`` the
  claim is one of non-inferiority: ``better`` is at most ``margin`` worse
  (e.g. "accuracy drops by at most about a point": margin 0.01); with
  ``margin < 0`` one of superiority by ``-margin`` ("at least 10 points
  below": margin -0.1).
  """
  text: str
  metric: str
  better: str
  worse: str
  source: str = ""
  margin: float = 0.0

  def side(self, which: str) -> list[tuple[float, str, str]]:
    """``[(sign, arm, metric), ...]`` of ``better`` or ``worse``."""
    out = []
    for sign, term in re.findall(r"([+-]?)\s*([^+-]+)", getattr(self, which)):
      arm, _, metric = term.strip().partition(":")
      out.append((-1.0 if sign == "-" else 1.0, arm, metric or self.metric))
    return out


@dataclasses.dataclass(frozen=True)
class Paper:
  """What ``launch.reproduce <name>`` runs and reports."""
  name: str
  title: str
  recipe: Callable[[int, bool], Any]  # (seed, quick) -> recipe ConfigDict
  arms: Mapping[str, str]  # stage name -> description
  metrics: Sequence[Metric]
  claims: Sequence[Claim]
  protocol: str
  not_covered: str = ""
  resample: Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, np.ndarray]] | None = None
  plots: Sequence[str] = ()
  # More tables: (title, metrics) or (title, metrics, arms) -- only those arms --
  # or (title, metrics, arms, "transposed"): one row per metric, one column per arm.
  tables: Sequence[tuple] = ()
  main_arms: Sequence[str] = ()  # the arms of the first table (default: every arm)
  # (summary) -> notes on the paper's own ceiling effects, added to the generic ones.
  ceilings: Callable[[Mapping[str, Any]], list[str]] | None = None
  # Stage names (fnmatch patterns) whose length ``--pretrain`` sets; non-empty:
  # ``recipe`` takes ``pretrain=`` (epochs or 'plateau', launch/pretrain_study.py).
  pretrain_stages: Sequence[str] = ()
  # The arm whose fine-tuning rate is chosen on the target's validation split
  # per pre-training length (it fine-tunes from one of ``pretrain_stages``).
  tune_arm: str = ""
  # The stages (fnmatch patterns) that take the rate chosen on ``tune_arm``:
  # those trained like it. Empty: every stage fine-tuning from a pre-training
  # stage. Others fine-tuning from one keep the recipe's rate.
  tuned_arms: Sequence[str] = ()


# --- metrics recomputed from a classification evaluator's saved predictions ------

_ARTS_CACHES: list[dict] = []


def arts_cache() -> dict:
  """A cache of values computed from one arm's loaded artifacts, for
  :func:`cached`; :func:`summarize` empties every such cache when it starts."""
  cache: dict = {}
  _ARTS_CACHES.append(cache)
  return cache


def cached(cache: dict, arts: Mapping[str, Any], what: str, compute: Callable[[], Any]) -> Any:
  """``compute()`` once per artifacts object and ``what``. The entry keeps
  the object itself and is used only for that object: an id alone can be
  reused by the artifacts of another arm once the first is freed (another
  length of a study), which returned that arm's numbers."""
  entry = cache.get((id(arts), what))
  if entry is None or entry[0] is not arts:
    entry = cache[(id(arts), what)] = (arts, compute())
  return entry[1]


_PER_EXAMPLE = arts_cache()


def _per_example(arts: Mapping[str, Any], what: str) -> np.ndarray:
  """Per-example correctness or NLL from ``predictions_test`` (cached)."""
  def compute():
    from scipy import special
    p = arts["predictions_test"]
    logp = special.log_softmax(p["logits"].astype(np.float64), axis=1)
    return ((logp.argmax(1) == p["label"]).astype(np.float64) if what == "correct"
            else -logp[np.arange(len(p["label"])), p["label"]])
  return cached(_PER_EXAMPLE, arts, what, compute)


def _by_size(what: str):
  def fn(arts, idx):
    values = _per_example(arts, what)
    return float(values[idx[str(len(values))]].mean())
  return fn


def resample_test_sets(sizes: Sequence[int]):
  """A ``Paper.resample`` for papers whose arms are tested on test sets of
  different sizes (one per target): one draw per size, shared by every arm
  and seed of that size (paired); pair it with :data:`ACCURACY` / :data:`NLL`."""
  def resample(arts, rng):
    del arts
    return {str(n): rng.integers(0, n, n) for n in sizes}
  return resample


ACCURACY = Metric("test/accuracy", "test accuracy", True, _by_size("correct"))
NLL = Metric("test/nll", "test NLL", False, _by_size("nll"))


def papers() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_paper(name: str) -> Paper:
  if name not in papers():
    from jaxrobust.registry import suggest
    raise ValueError(f"unknown paper {name!r}{suggest(name, papers())}; known: "
                     f"{', '.join(papers())}.")
  return importlib.import_module(f"launch.papers.{name}").PAPER


def select_claims(paper: Paper, spec: str) -> list[int]:
  """``--claims``: the claims (0-based indices into ``paper.claims``) named by
  ``spec``, comma-separated terms each a claim's number as the report lists
  them (1-based) or a piece of its text (case-insensitive); a term naming no
  claim is an error that lists them."""
  terms = [t.strip() for t in str(spec).split(",") if t.strip()]
  listing = "; ".join(f"{i + 1}: {c.text}" for i, c in enumerate(paper.claims))
  if not terms:
    raise ValueError(f"--claims: give claim numbers or pieces of their text; {paper.name}'s "
                     f"claims are {listing}.")
  chosen: set[int] = set()
  for term in terms:
    hits = ([int(term) - 1] if term.isdigit() and 1 <= int(term) <= len(paper.claims) else
            [] if term.isdigit() else
            [i for i, c in enumerate(paper.claims) if term.lower() in c.text.lower()])
    if not hits:
      raise ValueError(f"--claims: {term!r} names none of {paper.name}'s claims: {listing}.")
    chosen.update(hits)
  return sorted(chosen)


def claim_arms(paper: Paper, claims: Sequence[int]) -> set[str]:
  """The arms (stages) the claims compare."""
  c = paper.claims
  return {a for i in claims for _, a, _ in c[i].side("better") + c[i].side("worse")}


def stages_needed(stages: Mapping[str, Any], roots: Sequence[str] | set[str]) -> set[str]:
  """``roots`` (those of them in ``stages``, a recipe's stages as a dict) and
  every stage they take an artifact from or run after, transitively."""
  from jaxrobust import artifacts
  needed = {r for r in roots if r in stages}
  todo = list(needed)
  while todo:
    stage = stages[todo.pop()]
    after = stage.get("after", ())
    deps = [artifacts.parse_ref(ref)[0] for _, ref in artifacts.find_refs(stage)]
    for dep in deps + ([after] if isinstance(after, str) else list(after or ())):
      if dep not in needed:
        needed.add(dep)
        todo.append(dep)
  return needed


def tuned_stages(paper: Paper, stages: Mapping[str, Any]) -> list[str]:
  """The stages of a recipe's ``stages`` (a dict) that take the fine-tuning
  rate chosen on ``paper.tune_arm`` (:attr:`Paper.tuned_arms`); refuses
  patterns naming no stage that fine-tunes from a pre-training stage, and a
  ``tune_arm`` they leave out."""
  import fnmatch
  from configs import default
  from_pre = [n for n, s in stages.items()
              if default._from_stage((s or {}).get("config") or {}, paper.pretrain_stages)]
  patterns = paper.tuned_arms or ("*",)
  for p in patterns:
    if not any(fnmatch.fnmatchcase(n, p) for n in from_pre):
      raise ValueError(f"{paper.name}: tuned_arms pattern {p!r} names no stage fine-tuning from "
                       f"a pre-training stage; those are: {', '.join(from_pre)}.")
  tuned = [n for n in from_pre if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
  if paper.tune_arm and paper.tune_arm not in tuned:
    raise ValueError(f"{paper.name}: tune_arm {paper.tune_arm!r} is not among the stages its "
                     f"rate goes to (tuned_arms {', '.join(patterns)}).")
  return tuned


def run_seeds(paper: Paper, workdir: str, seeds: Sequence[int], quick: bool,
              pretrain: float | str | None = None, finetune_lr: float | None = None,
              claims: Sequence[int] | None = None, reuse_from: Sequence[str] = (),
              pretraining_only: bool = False) -> None:
  """Runs the recipe of every seed in ``<workdir>/seed<k>``; ``pretrain``: a
  pre-training length for the paper's recipe (papers with ``pretrain_stages``);
  ``finetune_lr``: the rate of the stages fine-tuning from those stages that
  ``paper.tuned_arms`` names (all when it names none);
  ``claims`` (indices, :func:`select_claims`): only the stages those claims'
  arms need -- unchanged, so they give the numbers of the whole recipe;
  ``reuse_from``: other workdirs (other pre-training lengths, a plain
  reproduction), whose finished stages with the same configs are copied, not
  re-run, as are those of this length's rate selection (seed 0)
  (:func:`launch.pretrain_study.reuse_stages`); ``pretraining_only``: only
  the pre-training stages (and what they need), which no rate reaches."""
  from configs import default
  from jaxrobust import stages
  if pretrain is not None and not paper.pretrain_stages:
    raise ValueError(f"{paper.name} has no pre-training stages whose length --pretrain could "
                     "set.")
  for seed in seeds:
    t = time.time()
    recipe = (paper.recipe(seed, quick) if pretrain is None
              else paper.recipe(seed, quick, pretrain=pretrain))
    if finetune_lr is not None:
      every = recipe.stages.to_dict()
      recipe.stages = default.with_finetune_lr(every, finetune_lr, paper.pretrain_stages,
                                               tuned_stages(paper, every))
    if claims is not None or pretraining_only:
      import fnmatch
      every = recipe.stages.to_dict()
      keep = stages_needed(every, claim_arms(paper, claims) if claims is not None else set(every))
      if pretraining_only:
        keep = stages_needed(every, {n for n in keep if any(
            fnmatch.fnmatchcase(n, p) for p in paper.pretrain_stages)})
      recipe.stages = {n: s for n, s in every.items() if n in keep}
    if pretrain is not None or reuse_from:
      from launch import pretrain_study  # the length's rate selection ran seed 0's pre-training
      copied = pretrain_study.reuse_stages(
          recipe, os.path.join(workdir, f"seed{seed}"),
          [os.path.join(workdir, pretrain_study.SELECT_DIR)]
          + [os.path.join(d, f"seed{seed}") for d in reuse_from])
      if copied:
        print(f"seed {seed}: {len(copied)} finished stage(s) with the same configs copied, not "
              f"run: {', '.join(copied)}", flush=True)
    stages.run(recipe, os.path.join(workdir, f"seed{seed}"))
    print(f"seed {seed}: {'pre-training ' if pretraining_only else ''}done in "
          f"{time.time() - t:.0f} s", flush=True)


def _results_path(workdir: str, seed: int, arm: str) -> str | None:
  """A train/evaluate stage's ``results.json``, else a method task's
  ``DONE.json`` (whose ``results`` entry holds what the task returned)."""
  stage = os.path.join(workdir, f"seed{seed}", arm)
  for name in ("results.json", "DONE.json"):
    if os.path.exists(os.path.join(stage, name)):
      return os.path.join(stage, name)
  return None


def _recipe_stages(workdir: str, seed: int) -> set[str]:
  """The stage names of the recipe a seed's run was started with (its
  ``config.json``), empty when it has not started."""
  path = os.path.join(workdir, f"seed{seed}", "config.json")
  if not os.path.exists(path):
    return set()
  with open(path, encoding="utf-8") as f:
    return set(json.load(f).get("stages") or ())


def unfinished_arms(paper: Paper, workdir: str, seeds: Sequence[int]) -> dict[str, list[int]]:
  """Arms whose stage is in a seed's recipe but has no results there yet (an
  interrupted or still running reproduction) -> those seeds. Arms a mode does
  not run (``--quick``, ``--claims``) are not in the recipe, hence not here."""
  stages = {s: _recipe_stages(workdir, s) for s in seeds}
  out = {arm: [s for s in seeds if arm in stages[s] and not _results_path(workdir, s, arm)]
         for arm in paper.arms}
  return {arm: missing for arm, missing in out.items() if missing}


def _load_arm(workdir: str, seed: int, arm: str) -> tuple[dict[str, float], dict[str, Any]]:
  stage = os.path.join(workdir, f"seed{seed}", arm)
  path = _results_path(workdir, seed, arm)
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  if path.endswith("DONE.json"):
    results = results["results"]
  results = {**results, **ood_group_means(results)}
  arts = {}
  adir = os.path.join(stage, "artifacts")
  for fname in sorted(os.listdir(adir)) if os.path.isdir(adir) else []:
    if fname.endswith(".npz"):
      with np.load(os.path.join(adir, fname), allow_pickle=False) as z:
        arts[fname[:-4]] = {k: z[k] for k in z.files}
  return results, arts


def _grouped(metrics: Sequence[Metric]) -> list[Metric]:
  """The per-group variants of the metrics averaged over OOD sets."""
  return [group_metric(m, g) for m in metrics if "/mean/" in m.key for g in OOD_GROUPS]


def _judge(c: Claim, sign: float, table: Mapping[str, Any],
           boot: Mapping[tuple[str, str], np.ndarray], group: str = "") -> dict[str, Any] | None:
  """A claim's difference, intervals and verdict (on ``group``'s sets only
  when given: every ``/mean/`` key of the claim becomes ``/mean_<group>/``);
  None when an arm did not report a metric of it."""
  parts = [(s_, a, k) for s_, a, k in c.side("better")] + [
      (-s_, a, k) for s_, a, k in c.side("worse")]
  if group:
    parts = [(s_, a, group_key(k, group)) for s_, a, k in parts]
  if any(k not in table.get(a, {}) for _, a, k in parts):
    return None
  # In the claimed direction, shifted by the margin: > 0 means the claim holds.
  per_seed = sign * sum(s_ * np.array(table[a][k]["seeds"]) for s_, a, k in parts) + c.margin
  diff = float(per_seed.mean())
  entry = {"difference": float(diff - c.margin), "per_seed": (per_seed - c.margin).tolist(),
           "seeds_in_direction": int((per_seed > 0).sum())}
  lows = []
  if len(per_seed) > 1:
    half = float(t_dist.ppf(0.975, len(per_seed) - 1) * per_seed.std(ddof=1)
                 / np.sqrt(len(per_seed)))
    entry["seed_ci95"] = [float(diff - half - c.margin), float(diff + half - c.margin)]
    lows.append(diff - half)
  if all((a, k) in boot for _, a, k in parts):
    d = sign * sum(s_ * boot[(a, k)] for s_, a, k in parts)
    entry["test_ci95"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
    lows.append(entry["test_ci95"][0] + c.margin)
  entry["verdict"] = ("does not hold" if diff <= 0 else
                      "holds" if lows and min(lows) > 0 else "inconclusive")
  return entry


def ceiling_notes(paper: Paper, summary: Mapping[str, Any]) -> list[str]:
  """The ceiling effects a summary meets: every tabulated mean past
  :data:`CEILINGS` (one note per metric, naming the arms), then the paper's own."""
  hits: dict[str, list[str]] = {}
  for arm, row in summary["table"].items():
    for key, cell in row.items():
      rule = CEILINGS.get(key.rsplit("/", 1)[-1])
      single = _SET_KEY.match(key)
      if rule is None or (single and single["set"] in OOD_GROUP_OF):
        continue  # single OOD sets: their groups speak for them
      high, limit = rule
      if (cell["mean"] >= limit) if high else (cell["mean"] <= limit):
        hits.setdefault(key, []).append(f"{arm} {cell['mean']:.4f}")
  notes = [f"`{key}` at the ceiling ({'≥' if CEILINGS[key.rsplit('/', 1)[-1]][0] else '≤'} "
           f"{CEILINGS[key.rsplit('/', 1)[-1]][1]:g}): {', '.join(arms)} -- little room to "
           "improve, so claims on it say little." for key, arms in sorted(hits.items())]
  return notes + (list(paper.ceilings(summary)) if paper.ceilings else [])


def summarize(paper: Paper, workdir: str, seeds: Sequence[int], *,
              bootstrap: int = BOOTSTRAP, claims: Sequence[int] | None = None) -> dict[str, Any]:
  """Mean, std and bootstrap intervals per arm and metric (and per kind of
  OOD set, :data:`OOD_GROUPS`); claim verdicts, over all sets and per group;
  ceiling effects. ``claims`` (indices): judge only those, the others are
  "not run"."""
  for cache in _ARTS_CACHES:
    cache.clear()
  ran = [arm for arm in paper.arms if all(_results_path(workdir, s, arm) for s in seeds)]
  if not ran:
    raise ValueError(f"no arm of {paper.name} has finished in every seed of {workdir} "
                     f"(seeds {list(seeds)}).")
  data = {arm: [_load_arm(workdir, s, arm) for s in seeds] for arm in ran}
  rng = np.random.default_rng(12345)
  # One set of resampled test indices per bootstrap round, shared by arms and
  # seeds (they all use the same test examples): paired comparisons.
  first = data[ran[0]][0][1]
  rounds = [paper.resample(first, rng) for _ in range(bootstrap)] if paper.resample else []
  table: dict[str, dict[str, Any]] = {}
  boot: dict[tuple[str, str], np.ndarray] = {}
  every = list(paper.metrics) + [m for t in paper.tables for m in t[1]]
  metrics = {m.key: m for m in every}
  metrics.update({m.key: m for m in _grouped(list(metrics.values())) if m.key not in metrics})
  for arm, runs in data.items():
    table[arm] = {}
    for m in metrics.values():
      if any(m.key not in r for r, _ in runs):
        continue  # this arm does not report the metric (e.g. a score only one arm uses)
      values = np.array([r[m.key] for r, _ in runs], np.float64)
      row = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
             else 0.0, "seeds": values.tolist()}
      if m.bootstrap is not None and rounds:
        dist = np.array([np.mean([m.bootstrap(a, idx) for _, a in runs]) for idx in rounds])
        boot[(arm, m.key)] = dist
        row["ci95"] = [float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5))]
      table[arm][m.key] = row
  unfinished = unfinished_arms(paper, workdir, seeds)
  judged_claims = []
  for i, c in enumerate(paper.claims):
    sign = 1.0 if metrics[c.metric].higher_is_better else -1.0
    head = {"claim": c.text, "source": c.source, "metric": c.metric, "better": c.better,
            "worse": c.worse}
    arms = {a for _, a, _ in c.side("better") + c.side("worse")}
    # A claim --claims leaves out, an arm this mode does not run (quick), or
    # one that has not finished in every seed (the run is incomplete).
    if claims is not None and i not in claims:
      judged_claims.append({**head, "verdict": "not run"})
      continue
    if any(a not in table for a in arms):
      waiting = sorted(arms & unfinished.keys())  # an unfinished arm is never in the table
      judged_claims.append({**head, "verdict": "not run",
                            **({"unfinished": waiting} if waiting else {})})
      continue
    judged = _judge(c, sign, table, boot)
    if judged is None:  # an arm ran but did not report the metric
      judged_claims.append({**head, "verdict": "not run"})
      continue
    entry = {**head, "margin": c.margin, **judged}
    groups = {g: _judge(c, sign, table, boot, g) for g in OOD_GROUPS
              if "/mean/" in c.metric + c.better + c.worse}
    if any(groups.values()):
      entry["groups"] = {g: v for g, v in groups.items() if v is not None}
    judged_claims.append(entry)
  summary = {"paper": paper.name, "title": paper.title, "seeds": list(seeds), "table": table,
             "claims": judged_claims, "bootstrap_rounds": bootstrap if rounds else 0,
             "unfinished": unfinished,
             "ood_groups": {g: list(sets) for g, (_, sets) in OOD_GROUPS.items()}}
  summary["ceilings"] = ceiling_notes(paper, summary)
  return summary


def _fmt(row: Mapping[str, Any] | None) -> str:
  if row is None:
    return "—"
  s = f"{row['mean']:.4f} ± {row['std']:.4f}"
  if "ci95" in row:
    s += f" [{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]"
  return s


def write_report(paper: Paper, summary: Mapping[str, Any], workdir: str, quick: bool,
                 claims: str | None = None) -> str:
  """``report.md`` and ``report.json`` in ``workdir``; ``claims``: the
  ``--claims`` the run was given (shown in its command)."""
  lines = [f"# Reproduction: {paper.title}", "",
           f"`python -m launch.reproduce {paper.name} --workdir {workdir}"
           + (" --quick" if quick else "") + (f" --claims '{claims}'" if claims else "")
           + f"`: {len(summary['seeds'])} seeds "
           f"({', '.join(map(str, summary['seeds']))})" + (" — **quick mode: reduced training, "
                                                            "not the reference numbers**" if quick
                                                            else "") + ".", ""]
  if summary.get("unfinished"):
    lines += ["**Incomplete run:** " + "; ".join(
        f"{arm} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
        for arm, seeds in summary["unfinished"].items())
        + " ha" + ("ve" if len(summary["unfinished"]) > 1 else "s") + " not finished, so "
        "their rows and the claims that need them are missing from this report; the same "
        "command resumes the run.", ""]
  lines += ["## Protocol", "", paper.protocol, "",
           "## Results", "",
           "Mean ± std over seeds (training randomness)" + (
               ", then in brackets the 95% interval of the seed mean over test examples "
               f"({summary['bootstrap_rounds']} bootstrap rounds, seeds fixed) where the metric "
               "can be recomputed from saved per-example outputs." if summary["bootstrap_rounds"]
               else "."), ""]
  grouped = [(f"By kind of OOD set: {m.label} (all sets, then per group)",
              [m] + [group_metric(m, g) for g in OOD_GROUPS], paper.main_arms)
             for m in paper.metrics if "/mean/" in m.key]
  for title, metrics, *arms in ([("", paper.metrics, paper.main_arms)] + list(paper.tables)
                                + grouped):
    if title:
      lines += ["", f"**{title}**", ""]
    if len(arms) > 1 and arms[1] == "transposed":  # one row per metric, one column per arm
      shown = [a for a in arms[0] if a in summary["table"]]
      lines += ["| | " + " | ".join(f"**{a}**" for a in shown) + " |",
                "|" + "---|" * (len(shown) + 1)]
      lines += [f"| {m.label} | " + " | ".join(_fmt(summary["table"][a].get(m.key))
                                             for a in shown) + " |" for m in metrics]
      continue
    lines += ["| arm | " + " | ".join(m.label for m in metrics) + " |",
              "|" + "---|" * (len(metrics) + 1)]
    for arm, desc in paper.arms.items():
      if arm not in summary["table"] or (arms and arms[0] and arm not in arms[0]):
        continue
      cells = [_fmt(summary["table"][arm].get(m.key)) for m in metrics]
      if any(cell != "—" for cell in cells):  # arms without these metrics: no row
        lines.append(f"| **{arm}** ({desc}) | " + " | ".join(cells) + " |")
  lines += ["", "## Claims", "",
            "Verdicts: **holds** when the difference is in the claimed direction and every 95% "
            "interval excludes 0; **inconclusive** when the direction is right but an interval "
            "includes 0; **does not hold** when the mean difference goes the other way.", ""]
  for n, c in enumerate(summary["claims"], 1):  # numbered as --claims takes them
    if c["verdict"] == "not run":
      lines.append(f"{n}. **not run** — {c['claim']}: " + (
          f"{' and '.join(c['unfinished'])} ha{'ve' if len(c['unfinished']) > 1 else 's'} not "
          "finished in every seed (incomplete run)." if c.get("unfinished") else
          "not among this run's --claims." if claims else
          f"{c['better']} or {c['worse']} is not part of this run (quick mode)."))
      continue
    ci = ""
    for key, what in (("seed_ci95", "over seeds"), ("test_ci95", "over test examples")):
      if key in c:
        ci += f", 95% interval {what} [{c[key][0]:+.4f}, {c[key][1]:+.4f}]"
    margin = (f" (non-inferiority: holds unless worse by more than {c['margin']:g})"
              if c.get("margin", 0) > 0 else
              f" (superiority by a margin: holds when better by more than {-c['margin']:g})"
              if c.get("margin", 0) < 0 else "")
    what = (f"`{c['metric']}`" if ":" not in c["better"] + c["worse"] else
            f"Each side's metric (direction of `{c['metric']}`)")
    lines.append(
        f"{n}. **{c['verdict']}** — {c['claim']} ({c['source']}). {what}: {c['better']} vs "
        f"{c['worse']}{margin}, improvement {c['difference']:+.4f}{ci}; in the claimed "
        f"direction for {c['seeds_in_direction']} of {len(c['per_seed'])} seeds "
        f"({', '.join(f'{d:+.4f}' for d in c['per_seed'])}).")
    for g, v in c.get("groups", {}).items():
      ci = "".join(f", {what} [{v[key][0]:+.4f}, {v[key][1]:+.4f}]" for key, what in (
          ("seed_ci95", "over seeds"), ("test_ci95", "over test examples")) if key in v)
      lines.append(f"   - {OOD_GROUPS[g][0]}: **{v['verdict']}**, improvement "
                   f"{v['difference']:+.4f}{ci}; {v['seeds_in_direction']} of "
                   f"{len(v['per_seed'])} seeds in the claimed direction.")
  if any("/mean/" in m.key for m in paper.metrics) or any("groups" in c for c in
                                                          summary["claims"]):
    groups = "; ".join(f"**{g}** ({title}): {', '.join(sets)}"
                       for g, (title, sets) in OOD_GROUPS.items())
    lines += ["", "## Kinds of OOD set", "",
              "Claims and tables on a mean over OOD sets are also given per kind of set "
              "(`launch/papers.OOD_GROUPS`; a group's figure averages the sets of it that the "
              f"arm scored): {groups}."]
  if summary.get("ceilings"):
    lines += ["", "## Ceiling effects", ""] + [f"- {n}" for n in summary["ceilings"]]
  if paper.not_covered:
    lines += ["", "## Not covered here", "", paper.not_covered]
  plots = [p for p in paper.plots
           if os.path.exists(os.path.join(workdir, f"seed{summary['seeds'][0]}", p))]
  if plots:
    lines += ["", f"## Plots (seed {summary['seeds'][0]})", ""]
    lines += [f"- [{p}](seed{summary['seeds'][0]}/{p})" for p in plots]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return text


