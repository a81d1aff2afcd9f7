"""Plots: the figure data equals the metrics; imports stay light."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxrobust import plots
from jaxrobust.metrics import calibration as cal


def _scores(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)


def _mann_whitney_auroc(pos, neg):
  """P(pos > neg) + P(pos == neg) / 2, by brute force."""
  diff = np.asarray(pos)[:, None] - np.asarray(neg)[None, :]
  return np.mean(diff > 0) + 0.5 * np.mean(diff == 0)


def _line(ax, gid):
  (line,) = [l for l in ax.get_lines() if l.get_gid() == gid]
  return line.get_xdata(), line.get_ydata()


def test_reliability_diagram_bars_equal_reliability_data(tmp_path):
  rng = np.random.default_rng(1)
  conf = rng.uniform(0.2, 1.0, 400).astype(np.float32)
  correct = (rng.random(400) < conf ** 2).astype(np.float32)
  path = tmp_path / "reliability.png"
  fig = plots.reliability_diagram(conf, correct, num_bins=10, path=str(path))
  assert path.stat().st_size > 1000
  data = {k: np.asarray(v) for k, v in cal.reliability_diagram_data(conf, correct,
                                                                   num_bins=10).items()}
  top, bottom = fig.axes
  acc_bars, gap_bars = top.containers
  assert acc_bars.get_label() == "Accuracy" and gap_bars.get_label() == "Gap"
  acc = np.nan_to_num(data["bin_accuracy"])
  conf_bin = np.nan_to_num(data["bin_confidence"])
  np.testing.assert_allclose([b.get_height() for b in acc_bars], acc, rtol=1e-6)
  np.testing.assert_allclose([b.get_height() for b in gap_bars], conf_bin - acc, atol=1e-6)
  np.testing.assert_allclose([b.get_y() + b.get_height() for b in gap_bars], conf_bin,
                             atol=1e-6)
  np.testing.assert_allclose([b.get_x() for b in acc_bars], data["bin_edges"][:-1], atol=1e-7)
  np.testing.assert_array_equal([b.get_height() for b in bottom.containers[0]],
                                data["bin_count"])
  ece = float(cal.expected_calibration_error(conf, correct, num_bins=10))
  assert top.get_title() == f"ECE = {100 * ece:.2f}%"


def test_roc_curve_plot_auc_matches_brute_force():
  s_in, s_out = _scores()
  fig = plots.roc_curve_plot(s_in, s_out, label="MSP")
  fpr, tpr = _line(fig.axes[0], "roc")
  assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  # OOD positive, ranked by -score.
  want = _mann_whitney_auroc(-s_out, -s_in)
  np.testing.assert_allclose(np.trapezoid(tpr, fpr), want, rtol=1e-12)
  assert f"{100 * want:.2f}%" in fig.axes[0].get_legend().get_texts()[0].get_text()
  fig_in = plots.roc_curve_plot(s_in, s_out, positive="in")
  fpr_in, tpr_in = _line(fig_in.axes[0], "roc")
  np.testing.assert_allclose(np.trapezoid(tpr_in, fpr_in), _mann_whitney_auroc(s_in, s_out),
                             rtol=1e-12)


def test_pr_curve_plot_matches_average_precision_by_rank():
  s_in, s_out = _scores(2)
  for positive, pos, neg in (("out", -s_out, -s_in), ("in", s_in, s_out)):
    fig = plots.pr_curve_plot(s_in, s_out, positive=positive)
    recall, precision = _line(fig.axes[0], "pr")
    # AP = mean over positives of the precision at their rank (no ties here).
    allscores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-allscores)
    hits = np.cumsum(is_pos[order])
    ap = np.mean((hits / np.arange(1, allscores.size + 1))[is_pos[order] == 1])
    np.testing.assert_allclose(np.sum(-np.diff(recall) * precision[:-1]), ap, rtol=1e-12)
    (chance,) = [l for l in fig.axes[0].get_lines() if l.get_gid() == "chance"]
    np.testing.assert_allclose(chance.get_ydata()[0], pos.size / allscores.size)


def test_score_histograms_are_densities_on_shared_bins(tmp_path):
  s_in, s_out = _scores(3)
  path = tmp_path / "hist.pdf"
  fig = plots.score_histograms(s_in, s_out, bins=20, path=str(path))
  assert path.stat().st_size > 1000
  ax = fig.axes[0]
  edges = np.histogram_bin_edges(np.concatenate([s_in, s_out]), bins=20)
  by_gid = {}
  for patch in ax.patches:
    by_gid.setdefault(patch.get_gid(), []).append(patch.get_height())
  for gid, scores in (("in", s_in), ("out", s_out)):
    want, _ = np.histogram(scores, bins=edges, density=True)
    np.testing.assert_allclose(by_gid[gid], want, rtol=1e-12)


def test_histograms_of_several_sets_share_bins_and_name_their_sizes(tmp_path):
  r = np.random.default_rng(0)
  sets = {"real": r.normal(0, 1, 50), "generated": r.normal(1, 1, 30), "ood": r.normal(2, 1, 20)}
  fig = plots.histograms(sets, bins=10, path=str(tmp_path / "h.png"), title="t")
  assert (tmp_path / "h.png").stat().st_size > 1000
  ax = fig.axes[0]
  edges = np.histogram_bin_edges(np.concatenate(list(sets.values())), bins=10)
  for name, v in sets.items():
    got = [p.get_height() for p in ax.patches if p.get_gid() == name]
    np.testing.assert_allclose(got, np.histogram(v, bins=edges, density=True)[0], rtol=1e-12)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      "real (n=50)", "generated (n=30)", "ood (n=20)"]
  with pytest.raises(ValueError, match="no score set"):
    plots.histograms({})


def test_plots_draw_into_a_given_axes_and_reject_bad_input():
  from matplotlib.figure import Figure
  fig = Figure()
  ax1, ax2 = fig.subplots(1, 2)
  s_in, s_out = _scores()
  assert plots.roc_curve_plot(s_in, s_out, ax=ax1) is fig
  assert plots.score_histograms(s_in, s_out, ax=ax2) is fig
  assert len(ax1.get_lines()) == 2 and len(ax2.patches) == 100
  with pytest.raises(ValueError):
    plots.roc_curve_plot(s_in, s_out, positive="ood")
  with pytest.raises(ValueError):
    plots.pr_curve_plot(np.array([]), s_out)
  with pytest.raises(ValueError):
    plots.score_histograms(s_in, np.array([0.0, np.nan]))
  with pytest.raises(ValueError):
    plots.reliability_diagram(np.array([0.5, 1.5]), np.array([1.0, 0.0]))


def test_metrics_import_pulls_in_neither_matplotlib_nor_tensorflow():
  code = (
      "import sys\n"
      "import jaxrobust.metrics, jaxrobust.metrics.calibration, "
      "jaxrobust.metrics.classification, jaxrobust.metrics.temperature, jaxrobust.plots\n"
      "heavy = [m for m in ('matplotlib', 'tensorflow', 'tensorflow_datasets', 'flax', "
      "'torch') if m in sys.modules]\n"
      "print(','.join(heavy))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def test_sample_grid_class_bars_and_the_trainers_augmentation_samples(tmp_path):
  """The grid places every image; class bars sort by value; the trainer's
  step-0 samples are the pp chain's output with the step's key, views side by
  side."""
  import jax
  from jaxrobust import trainer
  from jaxrobust import train_step as step_lib
  from jaxrobust.data import pp
  x = np.random.default_rng(0).uniform(size=(5, 6, 6, 1))
  fig = plots.sample_grid(x, labels=[0, 1, 2, 3, 4], columns=2, title="five")
  img = fig.axes[0].get_images()[0].get_array()
  assert img.shape == (3 * 6 + 2 * 2, 2 * 6 + 2) and fig.axes[0].get_title() == "five"
  np.testing.assert_allclose(img[:6, 8:14], x[1, ..., 0])
  with pytest.raises(ValueError, match="sample_grid expects"):
    plots.sample_grid(np.zeros((2, 6, 6, 2)))
  fig = plots.class_bars([0.1, 3.0, 2.0], class_names=["a", "b", "c"], top=2)
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["b", "c"]

  class Cfg:
    streams = {"train": {"pp": "pad_crop(2)"}, "two": {"pp": "flip"}}
  streams = {"train": step_lib.StreamStep("train", pp=pp.build("pad_crop(2)")),
             "two": step_lib.StreamStep("two", pp=pp.build("flip"), views=2),
             "plain": step_lib.StreamStep("plain")}
  images = (np.random.default_rng(1).uniform(size=(4, 8, 8, 1)) * 255).astype(np.uint8)
  batch = {n: {"image": images, "label": np.arange(4)} for n in streams}
  rng = np.asarray(jax.random.PRNGKey(3))
  trainer._plot_stream_samples(Cfg, streams, batch, rng, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["samples_train.png", "samples_two.png"]
