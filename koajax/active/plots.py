"""Active-learning figures written as PNG files.

Histograms of the uncertainty scores, and grids of the most (or least)
uncertain knees drawn as their Siamese patch pairs.

As in koajax.evaluation.plots, figures are built with
`matplotlib.figure.Figure` on an Agg canvas rather than pyplot, so nothing
depends on (or changes) the global backend and no figure outlives its function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from pathlib import Path
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 130
_BINS = 40
# Score names become file names.
_SAFE_NAME = re.compile(r'[A-Za-z0-9_.-]+')


def _save(fig: Figure, path: str | Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=_DPI)
  # Not registered with pyplot, so there is nothing to close; clearing frees
  # the artists now rather than when the caller drops the figure.
  fig.clear()
  return path


def score_histograms(out_dir: str | Path,
                     score_table: Mapping[str, np.ndarray]) -> dict[str, str]:
  """One histogram PNG per score, `hist_<name>.png` in `out_dir`.

  Args:
    out_dir: folder for the PNGs (created if missing).
    score_table: {score name: scores (N,)}, e.g. from `uncertainty.scores`.

  Returns:
    {score name: PNG file name relative to out_dir}.
  """
  out_dir = Path(out_dir)
  written = {}
  for name, values in score_table.items():
    if not _SAFE_NAME.fullmatch(name):
      raise ValueError(f'score name {name!r} is not usable in a file name; '
                       'use letters, digits, "_", "." or "-"')
    values = np.asarray(values, np.float64)
    if values.ndim != 1:
      raise ValueError(f'scores {name!r} have shape {values.shape}; expected '
                       'one score per sample, shaped (N,)')
    fig = Figure(figsize=(4.2, 3.2))
    ax = fig.subplots()
    ax.hist(values, bins=_BINS, color='tab:blue', alpha=0.85)
    if values.size:
      ax.axvline(np.median(values), color='black', lw=0.8, ls='--',
                 label=f'median = {np.median(values):.3g}')
      ax.legend(loc='upper right', fontsize=8)
    ax.set_xlabel(name)
    ax.set_ylabel('knees')
    ax.set_title(f'{name} (n = {values.size})', fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    filename = f'hist_{name}.png'
    _save(fig, out_dir / filename)
    written[name] = filename
  return written


def uncertain_grid(path: str | Path, images, titles: Sequence[str], *,
                   columns: int = 8) -> Path:
  """Grid of knees, each drawn as its two Siamese patches side by side.

  Args:
    path: PNG file to write.
    images: uint8 (K, 2, H, W): per knee the lateral patch and the mirrored
      medial patch, as fed to the Siamese model.
    titles: K short captions (e.g. knee id and score).
    columns: knees per grid row.

  Returns:
    The path written.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1] != 2:
    raise ValueError(f'images have shape {images.shape}; expected Siamese '
                     'pairs shaped (K, 2, H, W)')
  if images.dtype != np.uint8:
    raise ValueError(f'images have dtype {images.dtype}; expected uint8')
  num_knees = images.shape[0]
  if num_knees == 0:
    raise ValueError('images hold no knees (K = 0); nothing to draw')
  if len(titles) != num_knees:
    raise ValueError(f'{len(titles)} titles for {num_knees} knees')
  if columns < 1:
    raise ValueError(f'columns = {columns}; need at least 1')
  columns = min(columns, num_knees)
  rows = math.ceil(num_knees / columns)
  height, width = images.shape[2:]
  cell_height = 1.6
  cell_width = cell_height * (2 * width) / height
  fig = Figure(figsize=(columns * cell_width, rows * (cell_height + 0.5)))
  axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
  for ax in axes:
    ax.set_axis_off()
  for ax, pair, title in zip(axes, images, titles):
    # Lateral on the left, mirrored medial on the right, as the model sees them.
    ax.imshow(np.concatenate([pair[0], pair[1]], axis=-1), cmap='gray',
              vmin=0, vmax=255, interpolation='nearest')
    ax.set_title(str(title), fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def learning_curves(path: str | Path, curves: Mapping[str, object], *,
                    full_data: Mapping[str, float] | None = None) -> Path:
  """Balanced accuracy and kappa against labeled knees, one line per run.

  Args:
    path: PNG to write.
    curves: {label: DataFrame with n_labeled, balanced_accuracy, kappa and
      optionally their *_ci_low / *_ci_high columns}.
    full_data: {metric: value} of a model trained on all labeled data,
      drawn as a dashed horizontal line.
  """
  if not curves:
    raise ValueError('no learning curves to plot')
  fig = Figure(figsize=(9, 3.6))
  axes = fig.subplots(1, 2)
  for ax, metric, title in zip(axes, ('balanced_accuracy', 'kappa'),
                               ('Balanced accuracy', 'Quadratic kappa')):
    for name, curve in curves.items():
      x = curve['n_labeled'].to_numpy()
      line, = ax.plot(x, curve[metric].to_numpy(), marker='o', ms=3,
                      label=name)
      if f'{metric}_ci_low' in curve:
        ax.fill_between(x, curve[f'{metric}_ci_low'].to_numpy(dtype=float),
                        curve[f'{metric}_ci_high'].to_numpy(dtype=float),
                        color=line.get_color(), alpha=0.15, lw=0)
    if full_data and metric in full_data:
      ax.axhline(full_data[metric], color='k', ls='--', lw=1,
                 label='supervised, all labels')
    ax.set_xlabel('labeled knees')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)
