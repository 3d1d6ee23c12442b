"""Evaluation figures written as PNG files.

Figures are built with `matplotlib.figure.Figure` and its Agg canvas rather
than pyplot, so nothing depends on (or changes) the global backend and no
figure outlives its function. Each file is written under a temporary name and
then renamed, so a crash never leaves a truncated PNG behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as sk_metrics

_DPI = 130


def _save(fig: Figure, path: str | Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Same folder, so os.replace is an atomic rename; the format is passed
  # because the temporary name's suffix is not the image type.
  partial = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    fig.savefig(partial, dpi=_DPI, format=path.suffix.lstrip('.') or 'png')
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)
  return path


def _draw_matrix(ax, values: np.ndarray, text: np.ndarray, title: str,
                 class_names: Sequence[str], vmax: float) -> None:
  ax.imshow(values, cmap='Blues', vmin=0, vmax=vmax)
  ticks = np.arange(len(class_names))
  ax.set_xticks(ticks, class_names)
  ax.set_yticks(ticks, class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title, fontsize=10)
  for (row, col), label in np.ndenumerate(text):
    dark = values[row, col] > 0.6 * vmax
    ax.text(col, row, label, ha='center', va='center', fontsize=8,
            color='white' if dark else 'black')


def confusion_matrix_png(confusion, path: str | Path, *,
                         class_names: Sequence[str] | None = None,
                         title: str = 'Confusion matrix') -> Path:
  """Counts and row-normalised (per true class) confusion matrices side by side.

  Rows of classes absent from the data are left empty in the normalised panel.
  """
  confusion = np.asarray(confusion)
  num_classes = confusion.shape[0]
  names = list(class_names or [str(k) for k in range(num_classes)])
  support = confusion.sum(axis=1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    rates = np.where(support > 0, confusion / support, 0.0)
  fig = Figure(figsize=(2.2 + 1.4 * num_classes, 1.0 + 0.7 * num_classes))
  count_ax, rate_ax = fig.subplots(1, 2)
  _draw_matrix(count_ax, confusion, confusion.astype(int).astype(str),
               'counts', names, max(confusion.max(), 1))
  rate_text = np.where(support > 0, np.char.mod('%.2f', rates), '')
  _draw_matrix(rate_ax, rates, rate_text, 'fraction of true class', names, 1.0)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  return _save(fig, path)


def _undefined(ax, positive: np.ndarray) -> bool:
  """Marks the axes when the curve is undefined (one binary class only)."""
  if positive.all() or not positive.any():
    ax.text(0.5, 0.5, 'undefined: only one class present', ha='center',
            va='center', transform=ax.transAxes)
    return True
  return False


def _curve_axes(title: str, xlabel: str, ylabel: str):
  fig = Figure(figsize=(4.2, 4.0))
  ax = fig.subplots()
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  return fig, ax


def roc_png(positive, score, path: str | Path, *,
            title: str = 'ROC, radiographic OA (KL >= 2)') -> Path:
  """ROC curve of binary targets `positive` scored by `score`, AUC in legend."""
  positive = np.asarray(positive, bool)
  fig, ax = _curve_axes(title, 'false positive rate', 'true positive rate')
  ax.plot([0, 1], [0, 1], color='grey', lw=0.8, ls='--', label='chance')
  if not _undefined(ax, positive):
    fpr, tpr, _ = sk_metrics.roc_curve(positive, score)
    auc = sk_metrics.roc_auc_score(positive, score)
    ax.plot(fpr, tpr, lw=1.5, label=f'AUC = {auc:.3f}')
  ax.legend(loc='lower right')
  fig.tight_layout()
  return _save(fig, path)


def pr_png(positive, score, path: str | Path, *,
           title: str = 'Precision-recall, radiographic OA (KL >= 2)') -> Path:
  """Precision-recall curve with average precision and prevalence in legend."""
  positive = np.asarray(positive, bool)
  fig, ax = _curve_axes(title, 'recall', 'precision')
  if not _undefined(ax, positive):
    precision, recall, _ = sk_metrics.precision_recall_curve(positive, score)
    ap = sk_metrics.average_precision_score(positive, score)
    # Precision is a step function of recall, hence the step plot.
    ax.step(recall, precision, where='post', lw=1.5, label=f'AP = {ap:.3f}')
    prevalence = positive.mean()
    ax.axhline(prevalence, color='grey', lw=0.8, ls='--',
               label=f'prevalence = {prevalence:.3f}')
    ax.legend(loc='lower left')
  fig.tight_layout()
  return _save(fig, path)
