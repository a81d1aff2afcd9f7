"""Re-measure a paper's claims on the embedded benchmark, over seeds.

  python -m launch.reproduce hendrycks2019 --workdir runs/repro_hendrycks [--quick] [--seeds 3]

or one process per seed (``--only_seed 0``, ``1``, ``2`` side by side), then
``--report_only``.

Each paper (``launch/papers/<paper>.py``) defines a recipe per seed, the arms
to compare (stages of that recipe), the metrics to tabulate and its claims.
The runs go to ``<workdir>/seed<k>/`` (re-running the command resumes: finished
stages are skipped, an interrupted one resumes from its checkpoint); then

* ``<workdir>/report.md`` -- the protocol, a table of mean ± std over seeds
  with a 95% bootstrap interval over test examples next to every mean, and each
  claim marked **holds** / **inconclusive** / **does not hold** with its
  numbers;
* ``<workdir>/report.json`` -- the same, machine-readable.

With ``--pretrain 2,8,16,plateau`` (papers with pre-training stages:
hendrycks2019, zoph2020, ngiam2018) the whole reproduction runs once per
pre-training length in ``<workdir>/pretrain_<length>/`` and
``<workdir>/pretrain_study.md`` tabulates each claim's verdict per length
(:mod:`launch.pretrain_study`).

How claims are judged: :mod:`launch.papers`. Nothing is tuned here:
hyperparameters come from the recipes, chosen on validation splits.
"""

import os
import sys

from absl import app, flags

from jaxrobust.xla_flags import with_cpu_conv_tuning

_WORKDIR = flags.DEFINE_string("workdir", None, "Where runs and the report go.", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "A reduced version (shorter training), for a smoke test.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (0, 1, ...).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite the report from finished runs.")
_ONLY_SEED = flags.DEFINE_integer(
    "only_seed", None, "Run this one seed's recipe and no report, so that seeds can run as "
    "parallel processes (one per seed, same --workdir); then --report_only writes the report.")
_PRETRAIN = flags.DEFINE_string(
    "pretrain", None, "Pre-training lengths, comma-separated: source epochs or 'plateau' (the "
    "stopping rule of configs/default.py PRETRAIN_STOPPING), e.g. 2,8,16,plateau; each in "
    "<workdir>/pretrain_<length>/, then <workdir>/pretrain_study.md.")
_SELECT_LR = flags.DEFINE_bool(
    "select_lr", True, "With --pretrain: choose the fine-tuning rate per length on the target's "
    "validation split (seed 0, --lr_grid) before the seeds run; --noselect_lr: the recipes' rates.")
_LR_GRID = flags.DEFINE_string("lr_grid", "0.003,0.01,0.03,0.1,0.3",
                               "With --pretrain --select_lr: the fine-tuning rates tried.")
_REUSE_FROM = flags.DEFINE_string(
    "reuse_from", None, "Comma-separated workdirs of earlier runs of this paper (a plain "
    "reproduction, another study's pretrain_<length>/): each seed copies their finished stages "
    "whose configs, and those of every stage they need, equal its own, instead of re-running "
    "them (same configs and seed, same numbers).")
_CLAIMS = flags.DEFINE_string(
    "claims", None, "Only these claims: comma-separated claim numbers (as the report lists "
    "them) or pieces of their text, e.g. 'calibration,OOD'; runs only the stages their arms "
    "need (the same stages, so the same numbers, as the whole recipe) and judges only them.")


def main(argv):
  from jaxrobust.preemption import PreemptedError
  try:
    _reproduce(argv)
  except PreemptedError as e:  # finished stages are kept; the same command resumes
    sys.stderr.write(f"{e}\n")
    sys.exit(143)  # 128 + SIGTERM, as launch.train


def _reproduce(argv):
  if len(argv) != 2:
    from launch.papers import papers
    raise app.UsageError(f"usage: python -m launch.reproduce PAPER --workdir DIR; papers: "
                         f"{', '.join(papers())}")
  os.environ["XLA_FLAGS"] = with_cpu_conv_tuning(os.environ.get("XLA_FLAGS", "")).strip()
  workdir = os.path.abspath(_WORKDIR.value)
  # Every seed (and stage) compiles the same programs: keep them on disk.
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if not flags.FLAGS["verbosity"].present:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  from launch import papers
  try:
    paper = papers.load_paper(argv[1])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  claims = None
  if _CLAIMS.value is not None:
    try:
      claims = papers.select_claims(paper, _CLAIMS.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  reuse = [os.path.abspath(d) for d in (_REUSE_FROM.value or "").split(",") if d.strip()]
  for d in reuse:
    if not os.path.isdir(d):
      raise app.UsageError(f"--reuse_from: {d} is not a directory.")
  lengths = None
  if _PRETRAIN.value is not None:
    from launch import pretrain_study
    try:
      lengths = pretrain_study.parse_lengths(_PRETRAIN.value)
      grid = pretrain_study.parse_grid(_LR_GRID.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    if not paper.pretrain_stages:
      raise app.UsageError(f"--pretrain: {paper.name} has no pre-training stages; papers with "
                           "them: " + ", ".join(n for n in papers.papers()
                                               if papers.load_paper(n).pretrain_stages))
  if _ONLY_SEED.value is not None:
    if _REPORT_ONLY.value or (lengths is not None and len(lengths) != 1):
      raise app.UsageError("--only_seed runs one seed of a plain reproduction or of one --pretrain "
                           "length; it does not go with --report_only or several lengths.")
    if not 0 <= _ONLY_SEED.value < _SEEDS.value:
      raise app.UsageError(f"--only_seed={_ONLY_SEED.value}: the seeds are 0 to "
                           f"{_SEEDS.value - 1} (--seeds={_SEEDS.value}).")
    if lengths is None:
      papers.run_seeds(paper, workdir, [_ONLY_SEED.value], _QUICK.value, claims=claims,
                       reuse_from=reuse)
    else:
      sub = _length_dir(paper, workdir, lengths[0], _QUICK.value, _SELECT_LR.value)
      if not pretrain_study.one_seed_at_length(paper, workdir, sub, lengths[0], _ONLY_SEED.value,
                                               grid, claims, _QUICK.value, _SELECT_LR.value,
                                               reuse):
        sys.stderr.write(
            f"seed {_ONLY_SEED.value}: pre-training done; the fine-tuning rate of this length is "
            f"not chosen yet ({os.path.join(sub, pretrain_study.LR_FILE)}: the --only_seed 0 "
            "process chooses it). Run this command again once it exists.\n")
        sys.exit(75)  # EX_TEMPFAIL: not done, nothing wrong
    print(f"seed {_ONLY_SEED.value} done; when every seed is, write the "
          f"{'report' if lengths is None else 'study'} with: python -m "
          f"launch.reproduce {paper.name} --workdir {_WORKDIR.value} --report_only"
          + (f" --pretrain {_PRETRAIN.value}" if lengths is not None else "")
          + (" --noselect_lr" if lengths is not None and not _SELECT_LR.value else "")
          + (" --quick" if _QUICK.value else "") + (f" --seeds {_SEEDS.value}"
                                                    if _SEEDS.value != 3 else "")
          + (f" --claims '{_CLAIMS.value}'" if claims is not None else ""))
    return
  os.makedirs(workdir, exist_ok=True)
  seeds = list(range(_SEEDS.value))
  if len(seeds) < 3:
    print(f"warning: {len(seeds)} seed(s); one seed proves nothing on this benchmark.")
  rounds = papers.QUICK_BOOTSTRAP if _QUICK.value else papers.BOOTSTRAP
  if lengths is None:
    if not _REPORT_ONLY.value:
      papers.run_seeds(paper, workdir, seeds, _QUICK.value, claims=claims, reuse_from=reuse)
    summary = papers.summarize(paper, workdir, seeds, bootstrap=rounds, claims=claims)
    print(papers.write_report(paper, summary, workdir, _QUICK.value, _CLAIMS.value))
    print(f"report: {os.path.join(workdir, 'report.md')}")
    return
  summaries, stages, lrs = {}, {}, {}
  for length in lengths:
    label = pretrain_study.default.pretrain_label(length)
    sub = _length_dir(paper, workdir, length, _QUICK.value, _SELECT_LR.value)
    lrs[label] = (pretrain_study.select_lr(paper, sub, length, grid, _QUICK.value,
                                           report_only=_REPORT_ONLY.value)
                  if _SELECT_LR.value else None)
    if not _REPORT_ONLY.value:
      print(f"pre-training length {label}: {sub}" + (
          f", fine-tuning lr {lrs[label]['finetune_lr']:g}" if lrs[label] else ""), flush=True)
      papers.run_seeds(paper, sub, seeds, _QUICK.value, pretrain=length,
                       finetune_lr=lrs[label]["finetune_lr"] if lrs[label] else None,
                       claims=claims,
                       reuse_from=pretrain_study.other_length_dirs(workdir, length) + reuse)
    summaries[label] = papers.summarize(paper, sub, seeds, bootstrap=rounds, claims=claims)
    papers.write_report(paper, summaries[label], sub, _QUICK.value, _CLAIMS.value)
    stages[label] = pretrain_study.pretrain_stages(paper, sub, seeds)
  print(pretrain_study.write_study(paper, pretrain_study.study(paper, summaries, stages, lrs),
                                   workdir, _CLAIMS.value, _QUICK.value, seeds))
  print(f"study: {os.path.join(workdir, 'pretrain_study.md')}")


def _length_dir(paper, workdir: str, length: float | str, quick: bool, select: bool) -> str:
  from launch import pretrain_study
  try:
    return pretrain_study.checked_length_dir(paper, workdir, length, quick, select)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
