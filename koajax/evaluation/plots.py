"""Evaluation figures written as PNG files.

Figures are built with `matplotlib.figure.Figure` and its Agg canvas rather
than pyplot, so nothing depends on (or changes) the global backend and no
figure outlives its function. Each file is written under a temporary name and
then renamed (`write_atomically`, which the reports use for their other files
too), so a crash never leaves a truncated PNG behind.
"""

from __future__ import annotations

import os
import textwrap
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as sk_metrics

_DPI = 130


def write_atomically(path: str | Path, write: Callable[[Path], object]
                     ) -> Path:
  """Calls write(temporary path) and renames the result to `path`.

  The temporary file is a hidden one in the same folder, so os.replace is an
  atomic rename and an interrupted write leaves `path` as it was.
  """
  path = Path(path)
  partial = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    write(partial)
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)
  return path


def _save(fig: Figure, path: str | Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The format is passed because the temporary name's suffix is not the
  # image type.
  return write_atomically(path, lambda partial: fig.savefig(
      partial, dpi=_DPI, format=path.suffix.lstrip('.') or 'png'))


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


def sorted_confidence(labels, probs) -> dict[int, np.ndarray]:
  """Class -> p(true class) of that class's knees, highest first: the
  confidence-driven paper's sorted confidence curves. Labels < 0 (masked)
  are left out; a class without knees is absent."""
  labels, probs = np.asarray(labels), np.asarray(probs)
  return {k: np.sort(probs[labels == k, k])[::-1]
          for k in range(probs.shape[1]) if np.any(labels == k)}


def confidence_curves_png(labels, probs, path: str | Path, *,
                          class_names: Sequence[str] | None = None,
                          title: str = 'Sorted confidence') -> Path:
  """Each class's p(true class), sorted, against the knee's rank as a
  fraction of the class: how many knees the model is sure of, and how
  unsure it is of the rest."""
  curves = sorted_confidence(labels, probs)
  names = list(class_names or [str(k) for k in range(np.shape(probs)[1])])
  fig, ax = _curve_axes(title, 'knees of the class, most confident first',
                        'p(true class)')
  ax.axhline(0.5, color='grey', lw=0.8, ls='--')
  for k, values in curves.items():
    ranks = (np.arange(len(values)) + 0.5) / len(values)
    ax.plot(ranks, values, lw=1.5, label=f'{names[k]} (n = {len(values)})')
  if curves:
    ax.legend(loc='lower left')
  fig.tight_layout()
  return _save(fig, path)


def table_png(columns: Sequence[str], rows: Sequence[Sequence[str]],
              path: str | Path, *, title: str = '',
              shaded_rows: Sequence[int] = (), footnote: str = '') -> Path:
  """A table of text cells as an image, header row in bold.

  Args:
    columns: the header cells.
    rows: the body, each row as many cells as `columns`.
    path: PNG file to write.
    title: drawn above the table.
    shaded_rows: indices into `rows` drawn on a grey background (to set off
      rows of another kind, such as pooled tasks below per-head rows).
    footnote: small text below the table.
  """
  if not rows or any(len(row) != len(columns) for row in rows):
    raise ValueError(f'need rows of {len(columns)} cells; got '
                     f'{[len(row) for row in rows]}')
  # Sized from the text: about 0.075 inch per character at 9 points (two
  # characters of padding per column), and a fixed height per row, so that
  # wide tables do not shrink their font.
  widths = [max(len(str(cell)) for cell in column) + 2
            for column in zip(columns, *rows)]
  width = max(4.0, 0.075 * sum(widths))
  # The footnote wraps to the table's width (about 0.06 inch per character
  # at 7.5 points) rather than widening the figure.
  footnote = textwrap.fill(footnote, max(20, int(width / 0.06)))
  # Inches above and below the table.
  above = 0.45 if title else 0.1
  below = 0.12 + 0.13 * (footnote.count('\n') + 1) if footnote else 0.0
  height = 0.3 * (len(rows) + 1) + above + below
  fig = Figure(figsize=(width, height))
  ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
  ax.axis('off')
  top, bottom = 1.0 - above / height, below / height
  table = ax.table(cellText=[[str(cell) for cell in row] for row in rows],
                   colLabels=list(columns), cellLoc='center',
                   colWidths=[w / sum(widths) for w in widths],
                   bbox=(0.01, bottom, 0.98, top - bottom))
  table.auto_set_font_size(False)
  table.set_fontsize(9)
  shaded = set(shaded_rows)
  for (row, _), cell in table.get_celld().items():
    cell.set_edgecolor('#b0b0b0')
    if row == 0:
      cell.set_text_props(fontweight='bold')
      cell.set_facecolor('#dde6f0')
    elif row - 1 in shaded:
      cell.set_facecolor('#f0f0f0')
  if title:
    fig.text(0.5, 1.0 - 0.22 / height, title, ha='center', va='center',
             fontsize=10)
  if footnote:
    fig.text(0.01, 0.03 / height, footnote, ha='left', va='bottom',
             fontsize=7.5, color='#404040')
  return _save(fig, path)
