"""How a paper's claims change with the length of pre-training.

  python -m launch.reproduce hendrycks2019 --workdir runs/ptlen --pretrain 2,8,16,plateau

runs the paper's recipe over seeds once per pre-training length -- a number
of source epochs, or ``plateau``: until the source's own validation accuracy
stops improving (:data:`configs.default.PRETRAIN_STOPPING`, fixed before any
claim was looked at) -- in ``<workdir>/pretrain_<length>/`` (each with its own
``report.md``), then writes

* ``<workdir>/pretrain_study.md`` -- per claim, its verdict and difference at
  each length, and whether the verdicts agree; per pre-training stage, how
  long it trained (epochs, and where the rule stopped) and its best
  validation accuracy;
* ``<workdir>/pretrain_study.json`` -- the same, machine-readable.

Only papers whose ``Paper.pretrain_stages`` is set take ``--pretrain``
(hendrycks2019, zoph2020, ngiam2018).

**The fine-tuning rate per length** (``--select_lr``, the default): before a
length's seeds run, :func:`lr_selection_recipe` -- seed 0, the length's
pre-training, then the paper's ``tune_arm`` (a fine-tuning arm) once per rate
of the grid, evaluated on the target's validation split only -- runs in
``pretrain_<length>/select_lr/``; the rate with the lowest validation NLL
(:func:`pick_lr`) is written to ``pretrain_<length>/finetune_lr.json`` and
every stage that fine-tunes from a pre-training stage uses it
(:func:`configs.default.with_finetune_lr`). ``--noselect_lr`` keeps the
recipes' rates (chosen on digits:validation after the default pre-training).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

from configs import default
from jaxrobust import config as config_lib
from jaxrobust import files
from launch import papers
from launch.papers import Paper

LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
LR_METRIC = "validation/nll"  # lower is better; accuracy breaks ties
LR_FILE = "finetune_lr.json"
SELECT_DIR = "select_lr"  # in pretrain_<length>/: the rate selection's run (seed 0)


def parse_lengths(text: str) -> list[float | str]:
  """``'2,8,16,plateau'`` -> ``[2.0, 8.0, 16.0, 'plateau']`` (each checked)."""
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  if not items:
    raise ValueError("--pretrain: give one or more lengths, e.g. 2,8,16,plateau.")
  lengths = [default.parse_pretrain(t) for t in items]
  labels = [default.pretrain_label(x) for x in lengths]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--pretrain: a length is given twice in {text!r}.")
  return lengths


def parse_grid(text: str) -> tuple[float, ...]:
  try:
    grid = tuple(float(t) for t in str(text).split(",") if t.strip())
  except ValueError:
    grid = ()
  if not grid or min(grid) <= 0 or len(set(grid)) != len(grid):
    raise ValueError(f"--lr_grid: distinct positive learning rates joined by ',', got {text!r}.")
  return grid


def _lr_stage(lr: float) -> str:
  """``ft_lr0p03``: stage names take no dots."""
  return "ft_lr" + f"{lr:g}".replace(".", "p")


def lr_selection_recipe(paper: Paper, length: float | str, grid: Sequence[float],
                        quick: bool = False) -> Any:
  """Seed 0 of ``paper`` at pre-training ``length``, cut down to what its
  ``tune_arm`` needs (the stages it takes artifacts from, transitively), and
  that arm once per rate of ``grid`` (stages ``ft_lr<rate>``), each evaluated
  on the target's validation split only (no OOD sets, no attacks)."""
  if not paper.tune_arm:
    raise ValueError(f"{paper.name} names no tune_arm: no fine-tuning rate to select.")
  c = paper.recipe(0, quick, pretrain=length)
  stages = c.stages.to_dict()
  papers.tuned_stages(paper, stages)
  arm = stages[paper.tune_arm]
  needed = papers.stages_needed(stages, {paper.tune_arm}) - {paper.tune_arm}
  out = {n: stages[n] for n in stages if n in needed}
  evaluators = set(c.evaluators.keys()) | set((arm.get("config") or {}).get("evaluators", {}))
  for lr in grid:
    out[_lr_stage(lr)] = {**arm, "config": config_lib.merge(arm.get("config") or {}, {
        "optimizer": {"learning_rate": float(lr)},
        "evaluators": {**{k: None for k in evaluators if k != "classification"},
                       "classification": {"splits": ("validation",)}}})}
  c.stages = out
  return c


def pick_lr(results: Mapping[str, float], grid: Sequence[float]) -> dict[str, Any]:
  """The rate of ``grid`` with the lowest ``ft_lr<rate>/validation/nll`` in a
  selection recipe's ``results`` (higher validation accuracy, then the
  smaller rate, break ties)."""
  scores = {}
  for lr in grid:
    key = f"{_lr_stage(lr)}/{LR_METRIC}"
    if key not in results:
      raise ValueError(f"lr selection: no {key} in the selection runs' results.")
    scores[lr] = (results[key], -results.get(f"{_lr_stage(lr)}/validation/accuracy", 0.0), lr)
  best = min(scores, key=lambda lr: scores[lr])
  return {"finetune_lr": best, "metric": LR_METRIC, "grid": list(grid),
          "scores": {f"{lr:g}": scores[lr][0] for lr in grid}}


def select_lr(paper: Paper, sub: str, length: float | str, grid: Sequence[float],
              quick: bool = False, report_only: bool = False) -> dict[str, Any]:
  """Runs (or, ``report_only``, reads) the selection of ``length`` in
  ``<sub>/select_lr`` (:data:`SELECT_DIR`) and records it in ``<sub>/finetune_lr.json``; a
  recorded choice from another grid is an error (the seeds ran with it)."""
  path = os.path.join(sub, LR_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      chosen = json.load(f)
    if [float(x) for x in chosen["grid"]] != [float(x) for x in grid]:
      raise ValueError(f"{path} chose the fine-tuning rate from the grid {chosen['grid']}, not "
                       f"{list(grid)}; use that grid or a new --workdir.")
    return chosen
  if report_only:
    raise ValueError(f"--report_only: no {path} (the selection has not run).")
  from jaxrobust import stages
  results = stages.run(lr_selection_recipe(paper, length, grid, quick),
                       os.path.join(sub, SELECT_DIR))
  chosen = pick_lr(results, grid)
  files.write_json(path, chosen, what="fine-tuning rate")
  return chosen


def check_lr_choice(sub: str, select: bool, tuned: Sequence[str] = ()) -> None:
  """A length's seeds must all run with one fine-tuning rate: refuses to
  select one for seeds that already ran a ``tuned`` stage (those taking the
  chosen rate, :func:`launch.papers.tuned_stages`) without it, or to run
  without the one already chosen. Seeds that ran only their pre-training
  (``--only_seed`` before the choice) took no rate."""
  chosen = os.path.exists(os.path.join(sub, LR_FILE))
  ran = os.path.isdir(sub) and any(
      os.path.isdir(os.path.join(sub, n, t)) for n in os.listdir(sub) if n.startswith("seed")
      for t in tuned)
  if chosen and not select:
    raise ValueError(f"{sub} ran with the fine-tuning rate chosen in {LR_FILE}; drop "
                     "--noselect_lr or use a new --workdir.")
  if select and not chosen and ran:
    raise ValueError(f"{sub} has seeds that ran with the recipes' fine-tuning rates; pass "
                     "--noselect_lr or use a new --workdir.")


def length_dir(workdir: str, length: float | str) -> str:
  return os.path.join(workdir, f"pretrain_{default.pretrain_label(length)}")


def checked_length_dir(paper: Paper, workdir: str, length: float | str, quick: bool,
                       select: bool) -> str:
  """``pretrain_<length>/``, made once its seeds' rate choice is consistent
  (:func:`check_lr_choice`: a ValueError otherwise)."""
  sub = length_dir(workdir, length)
  tuned = papers.tuned_stages(paper, paper.recipe(0, quick, pretrain=length).stages.to_dict())
  check_lr_choice(sub, select, tuned)
  os.makedirs(sub, exist_ok=True)
  return sub


def one_seed_at_length(paper: Paper, workdir: str, sub: str, length: float | str, seed: int,
                       grid: Sequence[float], claims: Sequence[int] | None, quick: bool,
                       select: bool, reuse: Sequence[str] = ()) -> bool:
  """``--only_seed k --pretrain L`` in ``sub`` (:func:`checked_length_dir`):
  seed 0 chooses the length's rate (when ``select``) and runs; another seed
  waits for no one: before the rate is chosen it runs its pre-training (which
  no rate reaches) and returns False, to be run again once seed 0's process
  has written the choice. True when the seed's recipe ran."""
  others = other_length_dirs(workdir, length) + list(reuse)
  lr = None
  if select:
    if seed != 0 and not os.path.exists(os.path.join(sub, LR_FILE)):
      papers.run_seeds(paper, sub, [seed], quick, pretrain=length, claims=claims,
                       reuse_from=others, pretraining_only=True)
      return False
    lr = select_lr(paper, sub, length, grid, quick)["finetune_lr"]
  papers.run_seeds(paper, sub, [seed], quick, pretrain=length, finetune_lr=lr,
                   claims=claims, reuse_from=others)
  return True


def other_length_dirs(workdir: str, length: float | str) -> list[str]:
  """The study's other ``pretrain_<length>/`` directories in ``workdir``
  (lengths run in this command or by another process)."""
  mine = os.path.basename(length_dir(workdir, length))
  return sorted(os.path.join(workdir, n) for n in os.listdir(workdir)
                if n.startswith("pretrain_") and n != mine
                and os.path.isdir(os.path.join(workdir, n))) if os.path.isdir(workdir) else []


def reuse_stages(recipe: Any, seed_dir: str, others: Sequence[str]) -> list[str]:
  """Copies into ``seed_dir`` every stage of ``recipe`` that one of
  ``others`` (the same seed's runs elsewhere: other pre-training lengths,
  this length's rate selection, a plain reproduction) has finished, when that
  run's recipe had this base config and gave the stage and every stage it
  needs the same config (so the copy holds the numbers this run would
  compute: same configs, same seed). A stage downstream of pre-training
  matches only where the pre-training's config (its length) and the rate are
  the same; the stages no pre-training reaches (scratch arms, random-init
  teachers) match at every length. Returns the stages copied; a copy lands
  whole or not at all (written aside, then renamed)."""
  mine = json.loads(recipe.to_json_best_effort())
  stages, base = mine["stages"], {k: v for k, v in mine.items() if k != "stages"}
  recipes = {}  # each other run's recipe, read once; only those with this base config
  for other in others:
    try:
      with open(os.path.join(other, "config.json"), encoding="utf-8") as f:
        theirs = json.load(f)
    except (OSError, ValueError):
      continue
    if {k: v for k, v in theirs.items() if k != "stages"} == base:
      recipes[other] = theirs["stages"]
  copied = []
  for name in sorted(stages):
    if os.path.exists(os.path.join(seed_dir, name)):
      continue
    needed = papers.stages_needed(stages, {name})
    for other, theirs in recipes.items():
      src = os.path.join(other, name)
      same = all(theirs.get(m) == stages[m] for m in needed)
      if same and os.path.exists(os.path.join(src, "DONE.json")):
        os.makedirs(seed_dir, exist_ok=True)
        tmp = os.path.join(seed_dir, f".{name}.copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.rename(tmp, os.path.join(seed_dir, name))
        copied.append(name)
        break
  return copied


def _steps_per_epoch(stage_dir: str) -> int | None:
  """One source epoch in steps, from the stage's resolved config."""
  try:
    with open(os.path.join(stage_dir, "config.json"), encoding="utf-8") as f:
      cfg = json.load(f)
    return default.source_steps_per_epoch(cfg["data"]["name"],
                                          int(cfg["streams"]["train"]["batch_size"]))
  except (OSError, KeyError, ValueError, TypeError):
    return None


def pretrain_stages(paper: Paper, workdir: str, seeds: Sequence[int]) -> dict[str, Any]:
  """Per pre-training stage of ``paper`` that finished in every seed: epochs
  trained (``train/steps`` over one source epoch), the stopping and best
  steps where the rule ran, and the final validation accuracy; each a list
  over seeds."""
  found: dict[str, dict[str, list]] = {}
  names = sorted({n for s in seeds if os.path.isdir(os.path.join(workdir, f"seed{s}"))
                  for n in os.listdir(os.path.join(workdir, f"seed{s}"))
                  if any(fnmatch.fnmatchcase(n, p) for p in paper.pretrain_stages)})
  for name in names:
    rows = []
    for s in seeds:
      stage = os.path.join(workdir, f"seed{s}", name)
      path = os.path.join(stage, "results.json")
      if not os.path.exists(path):
        break
      with open(path, encoding="utf-8") as f:
        r = json.load(f)
      spe = _steps_per_epoch(stage)
      rows.append({
          "epochs": r["train/steps"] / spe if spe and "train/steps" in r else None,
          "best_epoch": r["train/best_step"] / spe if spe and "train/best_step" in r else None,
          "stopped_at_step": r.get("train/stopped_at_step"),
          "best_step": r.get("train/best_step"),
          "validation_accuracy": r.get("validation/accuracy")})
    else:
      found[name] = {k: [row[k] for row in rows] for k in rows[0]} if rows else {}
  return found


def study(paper: Paper, summaries: Mapping[str, Mapping[str, Any]],
          stages: Mapping[str, Mapping[str, Any]] | None = None,
          lrs: Mapping[str, Mapping[str, Any] | None] | None = None) -> dict[str, Any]:
  """Per claim, its entry at each length (``summaries``: length label -> a
  :func:`launch.papers.summarize` result, in the order given)."""
  labels = list(summaries)
  claims = []
  for i, c in enumerate(paper.claims):
    per = {}
    for label in labels:
      entry = summaries[label]["claims"][i]
      per[label] = {k: entry[k] for k in ("verdict", "difference", "seed_ci95", "test_ci95",
                                          "seeds_in_direction", "per_seed", "unfinished")
                    if k in entry}
    ran = [v["verdict"] for v in per.values() if v["verdict"] != "not run"]
    claims.append({"claim": c.text, "metric": c.metric, "better": c.better, "worse": c.worse,
                   "lengths": per, "verdicts_agree": len(set(ran)) <= 1 if ran else None})
  return {"paper": paper.name, "title": paper.title, "lengths": labels, "claims": claims,
          "seeds": {label: summaries[label]["seeds"] for label in labels},
          "pretrain_stages": dict(stages or {}), "finetune_lr": dict(lrs or {}),
          "stopping_rule": {
              **default.PRETRAIN_STOPPING, "max_epochs": default.PRETRAIN_MAX_EPOCHS}}


def _lr_line(paper: Paper, labels: Sequence[str], lrs: Mapping[str, Any]) -> str:
  if not any(lrs.get(lab) for lab in labels):
    return "Fine-tuning rates: the recipes' own (chosen on digits:validation after the default " \
           "pre-training), not re-selected per length."
  parts = []
  for lab in labels:
    sel = lrs.get(lab)
    parts.append(f"{lab}: {sel['finetune_lr']:g}" if sel else f"{lab}: the recipe's")
  grid = next(lrs[lab]["grid"] for lab in labels if lrs.get(lab))
  which = ("every stage fine-tuning from a pre-training stage" if not paper.tuned_arms else
           f"the stages trained like `{paper.tune_arm}` ({', '.join(paper.tuned_arms)}; other "
           "stages fine-tuning from pre-training keep the recipe's rate)")
  return (f"Fine-tuning rate of {which}, chosen per length on the target's validation split "
          f"(`{paper.tune_arm}`, seed 0, lowest {LR_METRIC} over "
          f"{', '.join(f'{x:g}' for x in grid)}): " + "; ".join(parts) + ".")


def _cell(entry: Mapping[str, Any]) -> str:
  if entry["verdict"] == "not run":
    return f"unfinished ({', '.join(entry['unfinished'])})" if entry.get("unfinished") \
        else "not run"
  s = f"**{entry['verdict']}** {entry['difference']:+.4f}"
  if "seed_ci95" in entry:
    s += f" [{entry['seed_ci95'][0]:+.4f}, {entry['seed_ci95'][1]:+.4f}]"
  return s


def _mean(values: Sequence[Any], fmt: str) -> str:
  v = [x for x in values if x is not None]
  if not v:
    return "—"
  text = format(float(np.mean(v)), fmt)
  return text + (f" ({format(min(v), fmt)}–{format(max(v), fmt)})" if len(v) > 1 else "")


def write_study(paper: Paper, result: Mapping[str, Any], workdir: str,
                claims: str | None = None, quick: bool = False,
                seeds: Sequence[int] | None = None) -> str:
  """``pretrain_study.md`` and ``.json`` in ``workdir``; returns the markdown.
  ``claims``: the ``--claims`` the study ran with (the claims it left out get
  no row); ``quick``, ``seeds``: its mode and seeds (shown with its command)."""
  labels = result["lengths"]
  rows = [c for c in result["claims"]
          if any(c["lengths"][lab]["verdict"] != "not run" or c["lengths"][lab].get("unfinished")
                 for lab in labels)]
  rule = result["stopping_rule"]
  head = [f"pre-training {lab} epochs" if lab != default.PLATEAU else "until plateau"
          for lab in labels]
  lines = [f"# Pre-training length: {result['title']}", "",
           f"`python -m launch.reproduce {paper.name} --workdir {workdir} --pretrain "
           f"{','.join(labels)}" + (" --quick" if quick else "")
           + (f" --seeds {len(seeds)}" if seeds is not None and len(seeds) != 3 else "")
           + (f" --claims '{claims}'" if claims else "") + "`"
           + (f": {len(seeds)} seeds ({', '.join(map(str, seeds))})" if seeds is not None else "")
           + (" — **quick mode: reduced training, not the reference numbers**" if quick else "")
           + ". "
           + (f"Only the claims named by `--claims` ran ({len(rows)} of "
              f"{len(result['claims'])}), and only the stages their arms need. " if claims else "")
           + "Each length's runs and full report: "
           + ", ".join(f"[pretrain_{lab}](pretrain_{lab}/report.md)" for lab in labels) + ".",
           "", f"Pre-training stages set by the length: {', '.join(paper.pretrain_stages)}. "
           f"`plateau`: `{rule['metric']}` on the source's validation split every source "
           f"epoch; stop when it has not improved by more than {rule['min_delta']:g} for "
           f"{rule['patience']} epochs, at most {rule['max_epochs']} epochs, the best epoch's "
           "checkpoint handed on (configs/default.py PRETRAIN_STOPPING, fixed before any claim "
           "was examined).", "", _lr_line(paper, labels, result.get("finetune_lr") or {}), "",
           "## Claims by pre-training length", "",
           "Each cell: verdict, mean difference in the claimed direction over seeds, and its "
           "95% interval over seeds (the per-length reports add the bootstrap over test "
           "examples).", "",
           "| claim | " + " | ".join(head) + " | verdicts agree |",
           "|" + "---|" * (len(labels) + 2)]
  for c in rows:
    agree = {True: "yes", False: "**no**", None: "—"}[c["verdicts_agree"]]
    lines.append(f"| {c['claim']} (`{c['better']}` vs `{c['worse']}`) | "
                 + " | ".join(_cell(c["lengths"][lab]) for lab in labels) + f" | {agree} |")
  stages = result.get("pretrain_stages") or {}
  if stages:
    lines += ["", "## How long each pre-training stage trained", "",
              "Mean over seeds (min–max): epochs of the source trained (where the rule stopped, "
              "for plateau), the best epoch (plateau only), final validation accuracy of the "
              "checkpoint handed on.", "",
              "| length | stage | epochs trained | best epoch | validation accuracy |",
              "|---|---|---|---|---|"]
    for lab in labels:
      for name, s in sorted(stages.get(lab, {}).items()):
        lines.append(f"| {lab} | {name} | {_mean(s.get('epochs', []), '.1f')} | "
                     f"{_mean(s.get('best_epoch', []), '.1f')} | {_mean(s.get('validation_accuracy', []), '.4f')} |")
  text = "\n".join(lines) + "\n"
  files.write_json(os.path.join(workdir, "pretrain_study.json"), result, what="study", indent=1)

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  files.atomic_write(os.path.join(workdir, "pretrain_study.md"), write, what="study")
  return text
