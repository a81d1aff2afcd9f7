"""Figures for calibration and OOD detection results.

matplotlib (and scikit-learn, for curve points) are imported inside the
functions, so importing this module costs nothing; figures are built on
``matplotlib.figure.Figure`` directly (no pyplot state), which works with any
backend including Agg on headless hosts. Every function returns the Figure and
saves it when ``path`` is given.

Score convention for the OOD plots: scores are "higher = more
in-distribution" (max softmax probability, max logit, negative energy).
``positive='out'`` (default, as Hendrycks' ``get_measures`` and OpenOOD v1.5)
treats OOD examples as the positive class and ranks them by ``-score``;
``positive='in'`` treats in-distribution examples as positive.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxrobust.metrics.calibration import reliability_diagram_data

_POSITIVES = ("in", "out")


def _scores(name: str, x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array, got shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf.")
  return x


def _binary_problem(in_scores, out_scores, positive: str):
  """(y_true, score) with the positive class ranked by higher score."""
  if positive not in _POSITIVES:
    raise ValueError(f"positive must be one of {_POSITIVES}, got {positive!r}.")
  s_in = _scores("in_scores", in_scores)
  s_out = _scores("out_scores", out_scores)
  y = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
  score = -np.concatenate([s_in, s_out])
  if positive == "in":
    y, score = 1 - y, -score
  return y, score


def _figure(ax, figsize):
  """Returns (figure, axes), drawing into ``ax`` when one is given."""
  if ax is not None:
    return ax.figure, ax
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, layout="constrained")
  return fig, fig.add_subplot()


def _finish(fig, path: Optional[str]):
  """Saves ``fig`` atomically (its directory made; a failed write is a
  :class:`jaxrobust.files.WriteError` naming the path)."""
  if path is not None:
    import os

    from jaxrobust import files
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150), what="plot",
                       suffix=os.path.splitext(path)[1])
  return fig


def roc_curve_plot(in_scores, out_scores, *, positive: str = "out",
                   label: Optional[str] = None, ax=None, path: Optional[str] = None,
                   title: Optional[str] = "ROC"):
  """ROC curve of separating OOD from in-distribution scores.

  The line is ``sklearn.metrics.roc_curve`` (every threshold kept); its
  legend shows the AUROC. The dashed diagonal is chance.
  """
  from sklearn.metrics import roc_auc_score, roc_curve
  y, score = _binary_problem(in_scores, out_scores, positive)
  fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
  auroc = roc_auc_score(y, score)
  fig, ax = _figure(ax, (4.0, 4.0))
  name = f"{label} " if label else ""
  ax.plot(fpr, tpr, label=f"{name}AUROC = {100 * auroc:.2f}%", gid="roc")
  ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, gid="chance")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel("False positive rate")
  ax.set_ylabel("True positive rate")
  ax.set_title(title or "")
  ax.legend(loc="lower right")
  return _finish(fig, path)


def pr_curve_plot(in_scores, out_scores, *, positive: str = "out",
                  label: Optional[str] = None, ax=None, path: Optional[str] = None,
                  title: Optional[str] = None):
  """Precision-recall curve; the legend shows the average precision.

  AUPR-Out with the default ``positive='out'``, AUPR-In with
  ``positive='in'``. Points are ``sklearn.metrics.precision_recall_curve``;
  the dotted line is the positive-class fraction (chance precision).
  """
  from sklearn.metrics import average_precision_score, precision_recall_curve
  y, score = _binary_problem(in_scores, out_scores, positive)
  precision, recall, _ = precision_recall_curve(y, score, drop_intermediate=False)
  ap = average_precision_score(y, score)
  fig, ax = _figure(ax, (4.0, 4.0))
  name = f"{label} " if label else ""
  ax.step(recall, precision, where="post", label=f"{name}AP = {100 * ap:.2f}%", gid="pr")
  ax.axhline(y.mean(), linestyle=":", color="grey", linewidth=0.8, gid="chance")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel("Recall")
  ax.set_ylabel("Precision")
  ax.set_title(title if title is not None else f"PR ({positive}-distribution positive)")
  ax.legend(loc="lower left")
  return _finish(fig, path)


def score_histograms(in_scores, out_scores, *, bins: int = 50,
                     labels: Sequence[str] = ("in-distribution", "out-of-distribution"),
                     density: bool = True, xlabel: str = "score", ax=None,
                     path: Optional[str] = None, title: Optional[str] = None):
  """Overlaid histograms of in- and out-of-distribution scores on shared bins
  (the score-distribution figure of Liu et al. 2020, energy OOD)."""
  s_in = _scores("in_scores", in_scores)
  s_out = _scores("out_scores", out_scores)
  if len(labels) != 2:
    raise ValueError(f"labels must name the two distributions, got {labels!r}.")
  edges = np.histogram_bin_edges(np.concatenate([s_in, s_out]), bins=bins)
  fig, ax = _figure(ax, (5.0, 3.5))
  for scores, name, gid in ((s_in, labels[0], "in"), (s_out, labels[1], "out")):
    ax.hist(scores, bins=edges, density=density, alpha=0.5, label=name, gid=gid)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("density" if density else "count")
  ax.set_title(title or "")
  ax.legend()
  return _finish(fig, path)


def histograms(values: dict, *, bins: int = 50, xlabel: str = "score", density: bool = True,
               ax=None, path: Optional[str] = None, title: Optional[str] = None):
  """Overlaid histograms of several named score sets on shared bins (e.g. a
  classifier's MSP on real, generated and OOD images, Lee et al. 2018)."""
  sets = {name: _scores(name, v) for name, v in values.items()}
  if not sets:
    raise ValueError("histograms: no score set given.")
  edges = np.histogram_bin_edges(np.concatenate(list(sets.values())), bins=bins)
  fig, ax = _figure(ax, (5.0, 3.5))
  for name, v in sets.items():
    ax.hist(v, bins=edges, density=density, alpha=0.45, label=f"{name} (n={len(v)})", gid=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("density" if density else "count")
  ax.set_title(title or "")
  ax.legend()
  return _finish(fig, path)


def reliability_diagram(confidences, correct, *, num_bins: int = 15, mask=None,
                        path: Optional[str] = None, title: Optional[str] = None):
  """Reliability diagram (Guo et al. 2017; Hendrycks et al. figures).

  Top: accuracy per equal-width confidence bin (bars, label 'Accuracy'), the
  gap from accuracy to the bin's mean confidence (red hatched bars, label
  'Gap'), and the diagonal of perfect calibration. Bottom: number of examples
  per bin. Bars come from
  :func:`jaxrobust.metrics.calibration.reliability_diagram_data` (same bins as ``expected_calibration_error``);
  empty bins are drawn with zero height. The title reports the ECE.
  """
  data = {k: np.asarray(v) for k, v in
          reliability_diagram_data(confidences, correct, num_bins=num_bins, mask=mask).items()}
  edges, count = data["bin_edges"].astype(np.float64), data["bin_count"]
  acc = np.nan_to_num(data["bin_accuracy"].astype(np.float64))
  conf = np.nan_to_num(data["bin_confidence"].astype(np.float64))
  ece = np.sum(count * np.abs(acc - conf)) / np.sum(count)

  from matplotlib.figure import Figure
  fig = Figure(figsize=(4.0, 5.0), layout="constrained")
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  left, width = edges[:-1], np.diff(edges)
  top.bar(left, acc, width=width, align="edge", edgecolor="black", color="tab:blue",
          label="Accuracy")
  top.bar(left, conf - acc, bottom=acc, width=width, align="edge", edgecolor="red",
          color="red", alpha=0.3, hatch="//", label="Gap")
  top.plot([0, 1], [0, 1], linestyle="--", color="grey", gid="diagonal")
  top.set_xlim(0, 1)
  top.set_ylim(0, 1)
  top.set_ylabel("Accuracy")
  top.set_title(title if title is not None else f"ECE = {100 * ece:.2f}%")
  top.legend(loc="upper left")
  bottom.bar(left, count, width=width, align="edge", edgecolor="black", color="grey",
             label="Count")
  bottom.set_xlabel("Confidence")
  bottom.set_ylabel("Count")
  return _finish(fig, path)


def ood_summary(in_scores, out_scores: dict[str, np.ndarray], *, score: str = "score",
                in_label: str = "in-distribution", positive: str = "out", bins: int = 50,
                path: Optional[str] = None, title: Optional[str] = None):
  """One figure per OOD score: the ROC curves of every OOD set (left) and,
  for each set, the in- vs out-of-distribution score histograms.

  ``score`` names the score on the axes (higher = more in-distribution);
  ``positive`` is the class counted as positive in the ROC curves.
  """
  from matplotlib.figure import Figure
  sets = list(out_scores)
  if not sets:
    raise ValueError("out_scores is empty: no OOD set to plot.")
  cols = 1 + len(sets)
  fig = Figure(figsize=(3.6 * cols, 3.6), layout="constrained")
  axes = fig.subplots(1, cols, squeeze=False)[0]
  for name in sets:
    roc_curve_plot(in_scores, out_scores[name], positive=positive, label=name, ax=axes[0],
                   title=f"ROC ({positive}-distribution positive)")
  for ax, name in zip(axes[1:], sets):
    score_histograms(in_scores, out_scores[name], bins=bins, labels=(in_label, name),
                     xlabel=f"{score} (higher = in-dist.)", ax=ax, title=f"{score}: {name}")
  fig.suptitle(title if title is not None else f"OOD detection by {score}")
  return _finish(fig, path)


def class_bars(values, *, class_names: Optional[Sequence[str]] = None, top: int = 0,
               ylabel: str = "value", ax=None, path: Optional[str] = None,
               title: Optional[str] = None):
  """A bar per class (e.g. Ngiam et al.'s importance weights ``P_t(y)/P_s(y)``
  per source class); ``top > 0`` shows only the ``top`` largest, in
  decreasing order, named on the x axis."""
  v = np.asarray(values, np.float64).reshape(-1)
  names = list(class_names) if class_names is not None else [str(i) for i in range(len(v))]
  if len(names) != len(v):
    raise ValueError(f"class_names has {len(names)} entries for {len(v)} values.")
  order = np.argsort(-v, kind="stable")[:top] if top > 0 else np.arange(len(v))
  fig, ax = _figure(ax, (max(4.0, 0.22 * len(order) + 1.5), 3.2))
  ax.bar(np.arange(len(order)), v[order], color="tab:blue")
  ax.set_xticks(np.arange(len(order)), [names[i] for i in order], fontsize=7)
  ax.set_xlim(-0.6, len(order) - 0.4)
  ax.set_ylabel(ylabel)
  ax.set_title(title or "")
  return _finish(fig, path)


def sample_grid(images, *, labels: Optional[Sequence] = None, columns: int = 8,
                max_images: int = 32, ax=None, path: Optional[str] = None,
                title: Optional[str] = None):
  """A grid of images ``[N, H, W, C]`` in ``[0, 1]`` (e.g. a stream's batch
  after its augmentation chain), gray for one channel, labels as captions."""
  x = np.clip(np.asarray(images, np.float32)[:max_images], 0.0, 1.0)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"sample_grid expects [N, H, W, 1 or 3] images, got shape {x.shape}.")
  n, h, w, c = x.shape
  cols = max(1, min(columns, n))
  rows = -(-n // cols)
  pad = 2
  grid = np.ones(((h + pad) * rows - pad, (w + pad) * cols - pad, c), np.float32)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = x[i]
  fig, ax = _figure(ax, (1.1 * cols + 0.4, 1.1 * rows + 0.6))
  ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
            interpolation="nearest")
  if labels is not None:
    for i, lab in enumerate(list(labels)[:n]):
      r, k = divmod(i, cols)
      ax.text(k * (w + pad) + 1, r * (h + pad) + 4, str(lab), color="yellow", fontsize=6)
  ax.set_axis_off()
  ax.set_title(title or "", fontsize=9)
  return _finish(fig, path)


def _saliency_image(m: np.ndarray, signed: bool) -> np.ndarray:
  """One map ``[H, W, C]`` -> an image in ``[0, 1]``, normalised by its own
  largest magnitude (an all-zero map stays black, or grey when signed)."""
  if signed:
    return 0.5 + 0.5 * m / max(float(np.abs(m).max()), np.finfo(np.float64).tiny)
  mag = np.abs(m).max(axis=-1, keepdims=True)
  return mag / max(float(mag.max()), np.finfo(np.float64).tiny)


def saliency_grid(images, maps_by_model: dict[str, np.ndarray], *,
                  row_labels: Sequence[str] | None = None, signed: bool = False,
                  path: str | None = None, title: str | None = None):
  """Saliency maps of several models side by side (the guided
  back-propagation figure of Lee et al. 2018: a cross-entropy and a
  joint-confidence model on in- and out-of-distribution images).

  One row per image; the columns are the input (``images`` ``[N, H, W, 1 or
  3]`` in ``[0, 1]``), then, in the dict's order, each model's map ``[N, H, W,
  C]`` (e.g. :func:`jaxrobust.saliency.guided_backprop`). Each map is
  normalised per image: by default its magnitude, the maximum over channels of
  ``|g|`` divided by that image's largest (gray, black = 0); ``signed=True``
  shows ``0.5 + 0.5 g / max|g|`` per channel (gray = 0). ``row_labels`` (one
  per image, e.g. ``'in: 3'``, ``'out: noise'``) name the rows.
  """
  x = np.asarray(images, np.float64)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"saliency_grid expects images [N, H, W, 1 or 3], got shape {x.shape}.")
  if not maps_by_model:
    raise ValueError("maps_by_model is empty: no saliency map to plot.")
  maps = {name: np.asarray(m, np.float64) for name, m in maps_by_model.items()}
  for name, m in maps.items():
    if m.ndim != 4 or m.shape[:3] != x.shape[:3]:
      raise ValueError(f"maps_by_model[{name!r}] must be [N, H, W, C] with [N, H, W] = "
                       f"{x.shape[:3]} of the images, got shape {m.shape}.")
    if not np.all(np.isfinite(m)):
      raise ValueError(f"maps_by_model[{name!r}] contains NaN or inf.")
    if signed and m.shape[-1] not in (1, 3):
      raise ValueError(f"signed maps are drawn as gray or RGB: maps_by_model[{name!r}] has "
                       f"{m.shape[-1]} channels.")
  labels = list(row_labels) if row_labels is not None else None
  if labels is not None and len(labels) != x.shape[0]:
    raise ValueError(f"row_labels has {len(labels)} entries for {x.shape[0]} images.")

  from matplotlib.figure import Figure
  rows, cols = x.shape[0], 1 + len(maps)
  fig = Figure(figsize=(1.4 * cols + 0.6, 1.4 * rows + 0.8), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  columns = [("input", np.clip(x, 0.0, 1.0))] + [
      (name, np.stack([_saliency_image(mi, signed) for mi in m])) for name, m in maps.items()]
  for c, (name, panel) in enumerate(columns):
    for r in range(rows):
      ax, img = axes[r, c], panel[r]
      gray = img.shape[-1] == 1
      ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1,
                interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=8)
      if c == 0 and labels is not None:
        ax.set_ylabel(str(labels[r]), fontsize=8)
  what = "signed gradient" if signed else "|gradient|, max over channels"
  fig.suptitle(title if title is not None else
               f"Guided back-propagation of the target logit ({what}, normalised per image)",
               fontsize=9)
  return _finish(fig, path)
