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
(hendrycks2019, zoph2020, ngiam2018). The fine-tuning learning rates stay the
recipes' (chosen on digits:validation after the default pre-training); they
are not re-selected per length here (docs/reproduce.md, "Pre-training length").
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from configs import default
from jaxrobust import files
from launch.papers import Paper


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


def length_dir(workdir: str, length: float | str) -> str:
  return os.path.join(workdir, f"pretrain_{default.pretrain_label(length)}")


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
          stages: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """Per claim, its entry at each length (``summaries``: length label -> a
  :func:`launch.papers.summarize` result, in the order given)."""
  labels = list(summaries)
  claims = []
  for i, c in enumerate(paper.claims):
    per = {}
    for label in labels:
      entry = summaries[label]["claims"][i]
      per[label] = {k: entry[k] for k in ("verdict", "difference", "seed_ci95", "test_ci95",
                                          "seeds_in_direction", "per_seed") if k in entry}
    ran = [v["verdict"] for v in per.values() if v["verdict"] != "not run"]
    claims.append({"claim": c.text, "metric": c.metric, "better": c.better, "worse": c.worse,
                   "lengths": per, "verdicts_agree": len(set(ran)) <= 1 if ran else None})
  return {"paper": paper.name, "title": paper.title, "lengths": labels, "claims": claims,
          "seeds": {label: summaries[label]["seeds"] for label in labels},
          "pretrain_stages": dict(stages or {}), "stopping_rule": {
              **default.PRETRAIN_STOPPING, "max_epochs": default.PRETRAIN_MAX_EPOCHS}}


def _cell(entry: Mapping[str, Any]) -> str:
  if entry["verdict"] == "not run":
    return "not run"
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


def write_study(paper: Paper, result: Mapping[str, Any], workdir: str) -> str:
  """``pretrain_study.md`` and ``.json`` in ``workdir``; returns the markdown."""
  labels = result["lengths"]
  rule = result["stopping_rule"]
  head = [f"pre-training {lab} epochs" if lab != default.PLATEAU else "until plateau"
          for lab in labels]
  lines = [f"# Pre-training length: {result['title']}", "",
           f"`python -m launch.reproduce {paper.name} --workdir {workdir} --pretrain "
           f"{','.join(labels)}`. Each length's runs and full report: "
           + ", ".join(f"[pretrain_{lab}](pretrain_{lab}/report.md)" for lab in labels) + ".",
           "", f"Pre-training stages set by the length: {', '.join(paper.pretrain_stages)}. "
           f"`plateau`: `{rule['metric']}` on the source's validation split every source "
           f"epoch; stop when it has not improved by more than {rule['min_delta']:g} for "
           f"{rule['patience']} epochs, at most {rule['max_epochs']} epochs, the best epoch's "
           "checkpoint handed on (configs/default.py PRETRAIN_STOPPING, fixed before any claim "
           "was examined). Fine-tuning rates: the recipes' own, not re-selected per length.", "",
           "## Claims by pre-training length", "",
           "Each cell: verdict, mean difference in the claimed direction over seeds, and its "
           "95% interval over seeds (the per-length reports add the bootstrap over test "
           "examples).", "",
           "| claim | " + " | ".join(head) + " | verdicts agree |",
           "|" + "---|" * (len(labels) + 2)]
  for c in result["claims"]:
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
