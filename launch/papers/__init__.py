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
of the tables, and their claims are marked **not run**.
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
  """
  key: str
  label: str
  higher_is_better: bool
  bootstrap: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], float] | None = None


@dataclasses.dataclass(frozen=True)
class Claim:
  """``better`` beats ``worse`` on ``metric`` (the paper's statement in ``text``).

  ``better`` and ``worse`` are arms, or ``'arm:metric'`` to compare two
  metrics (two scores of one model, say), or sums and differences of those
  (``'sup_s1-rand_s1'``: the gain of one arm over another, so a claim can
  compare gains, seed by seed and bootstrap round by round); ``metric`` gives
  the direction and the default metric of every term. With ``margin > 0`` the
  claim is one of non-inferiority: ``better`` is at most ``margin`` worse
  (e.g. "accuracy drops by at most about a point": margin 0.01).
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
  # More tables: (title, metrics) or (title, metrics, arms) -- only those arms.
  tables: Sequence[tuple] = ()
  main_arms: Sequence[str] = ()  # the arms of the first table (default: every arm)


# --- metrics recomputed from a classification evaluator's saved predictions ------

_PER_EXAMPLE: dict[tuple[int, str], np.ndarray] = {}


def _per_example(arts: Mapping[str, Any], what: str) -> np.ndarray:
  """Per-example correctness or NLL from ``predictions_test`` (cached)."""
  key = (id(arts), what)
  if key not in _PER_EXAMPLE:
    from scipy import special
    p = arts["predictions_test"]
    logp = special.log_softmax(p["logits"].astype(np.float64), axis=1)
    _PER_EXAMPLE[key] = ((logp.argmax(1) == p["label"]).astype(np.float64) if what == "correct"
                         else -logp[np.arange(len(p["label"])), p["label"]])
  return _PER_EXAMPLE[key]


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


def run_seeds(paper: Paper, workdir: str, seeds: Sequence[int], quick: bool) -> None:
  from jaxrobust import stages
  for seed in seeds:
    t = time.time()
    stages.run(paper.recipe(seed, quick), os.path.join(workdir, f"seed{seed}"))
    print(f"seed {seed}: done in {time.time() - t:.0f} s", flush=True)


def _results_path(workdir: str, seed: int, arm: str) -> str | None:
  """A train/evaluate stage's ``results.json``, else a method task's
  ``DONE.json`` (whose ``results`` entry holds what the task returned)."""
  stage = os.path.join(workdir, f"seed{seed}", arm)
  for name in ("results.json", "DONE.json"):
    if os.path.exists(os.path.join(stage, name)):
      return os.path.join(stage, name)
  return None


def _load_arm(workdir: str, seed: int, arm: str) -> tuple[dict[str, float], dict[str, Any]]:
  stage = os.path.join(workdir, f"seed{seed}", arm)
  path = _results_path(workdir, seed, arm)
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  if path.endswith("DONE.json"):
    results = results["results"]
  arts = {}
  adir = os.path.join(stage, "artifacts")
  for fname in sorted(os.listdir(adir)) if os.path.isdir(adir) else []:
    if fname.endswith(".npz"):
      with np.load(os.path.join(adir, fname), allow_pickle=False) as z:
        arts[fname[:-4]] = {k: z[k] for k in z.files}
  return results, arts


def summarize(paper: Paper, workdir: str, seeds: Sequence[int], *,
              bootstrap: int = BOOTSTRAP) -> dict[str, Any]:
  """Mean, std and bootstrap intervals per arm and metric; claim verdicts."""
  ran = [arm for arm in paper.arms if all(_results_path(workdir, s, arm) for s in seeds)]
  data = {arm: [_load_arm(workdir, s, arm) for s in seeds] for arm in ran}
  rng = np.random.default_rng(12345)
  # One set of resampled test indices per bootstrap round, shared by arms and
  # seeds (they all use the same test examples): paired comparisons.
  first = data[ran[0]][0][1]
  rounds = [paper.resample(first, rng) for _ in range(bootstrap)] if paper.resample else []
  table: dict[str, dict[str, Any]] = {}
  boot: dict[tuple[str, str], np.ndarray] = {}
  every = list(paper.metrics) + [m for t in paper.tables for m in t[1]]
  for arm, runs in data.items():
    table[arm] = {}
    for m in every:
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
  claims = []
  metrics = {m.key: m for m in every}
  for c in paper.claims:
    sign = 1.0 if metrics[c.metric].higher_is_better else -1.0
    parts = [(s_, a, k) for s_, a, k in c.side("better")] + [
        (-s_, a, k) for s_, a, k in c.side("worse")]
    if any(a not in table for _, a, _ in parts):  # an arm this mode does not run (quick)
      claims.append({"claim": c.text, "source": c.source, "metric": c.metric,
                     "better": c.better, "worse": c.worse, "verdict": "not run"})
      continue
    # In the claimed direction, shifted by the margin: > 0 means the claim holds.
    per_seed = sign * sum(s_ * np.array(table[a][k]["seeds"]) for s_, a, k in parts) + c.margin
    diff = float(per_seed.mean())
    entry = {"claim": c.text, "source": c.source, "metric": c.metric, "better": c.better,
             "worse": c.worse, "margin": c.margin, "difference": float(diff - c.margin),
             "per_seed": (per_seed - c.margin).tolist(),
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
    claims.append(entry)
  return {"paper": paper.name, "title": paper.title, "seeds": list(seeds), "table": table,
          "claims": claims, "bootstrap_rounds": bootstrap if rounds else 0}


def _fmt(row: Mapping[str, Any] | None) -> str:
  if row is None:
    return "—"
  s = f"{row['mean']:.4f} ± {row['std']:.4f}"
  if "ci95" in row:
    s += f" [{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]"
  return s


def write_report(paper: Paper, summary: Mapping[str, Any], workdir: str, quick: bool) -> str:
  lines = [f"# Reproduction: {paper.title}", "",
           f"`python -m launch.reproduce {paper.name} --workdir {workdir}"
           + (" --quick" if quick else "") + f"`: {len(summary['seeds'])} seeds "
           f"({', '.join(map(str, summary['seeds']))})" + (" — **quick mode: reduced training, "
                                                            "not the reference numbers**" if quick
                                                            else "") + ".", "",
           "## Protocol", "", paper.protocol, "",
           "## Results", "",
           "Mean ± std over seeds (training randomness)" + (
               ", then in brackets the 95% interval of the seed mean over test examples "
               f"({summary['bootstrap_rounds']} bootstrap rounds, seeds fixed) where the metric "
               "can be recomputed from saved per-example outputs." if summary["bootstrap_rounds"]
               else "."), ""]
  for title, metrics, *arms in [("", paper.metrics, paper.main_arms)] + list(paper.tables):
    if title:
      lines += ["", f"**{title}**", ""]
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
  for c in summary["claims"]:
    if c["verdict"] == "not run":
      lines.append(f"- **not run** — {c['claim']}: {c['better']} or {c['worse']} is not part "
                   "of this run (quick mode).")
      continue
    ci = ""
    for key, what in (("seed_ci95", "over seeds"), ("test_ci95", "over test examples")):
      if key in c:
        ci += f", 95% interval {what} [{c[key][0]:+.4f}, {c[key][1]:+.4f}]"
    margin = (f" (non-inferiority: holds unless worse by more than {c['margin']:g})"
              if c.get("margin") else "")
    what = (f"`{c['metric']}`" if ":" not in c["better"] + c["worse"] else
            f"Each side's metric (direction of `{c['metric']}`)")
    lines.append(
        f"- **{c['verdict']}** — {c['claim']} ({c['source']}). {what}: {c['better']} vs "
        f"{c['worse']}{margin}, improvement {c['difference']:+.4f}{ci}; in the claimed "
        f"direction for {c['seeds_in_direction']} of {len(c['per_seed'])} seeds "
        f"({', '.join(f'{d:+.4f}' for d in c['per_seed'])}).")
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


