"""The evaluation report of one run on one test set.

`write_report` writes to its output folder:

  predictions.csv       knee_id, side, [subject_id,] kl (true grade), p0..p{C-1}
  metrics.json          every metric with its point estimate and stratified
                        bootstrap interval, the confusion matrix and counts
  confusion_matrix.png  counts and row-normalised rates
  roc.png, pr.png       ROC and precision-recall curves of KL >= 2

predictions.csv is the ground truth of a report: `metrics_from_predictions`
recomputes the point metrics from it, and `koajax.evaluation.compare` tests two
runs against each other from their predictions files. Undefined metrics (NaN)
are written to metrics.json as null.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from koajax.evaluation import bootstrap
from koajax.evaluation import metrics as metrics_lib
from koajax.evaluation import plots

PREDICTIONS_CSV = 'predictions.csv'
METRICS_JSON = 'metrics.json'
CONFUSION_PNG = 'confusion_matrix.png'
ROC_PNG = 'roc.png'
PR_PNG = 'pr.png'

TRUE_COLUMN = 'kl'
_PROB_COLUMN = re.compile(r'^p(\d+)$')
# Identifier columns are read as text so that ids such as '0012' keep their
# leading zeros.
_TEXT_COLUMNS = {'knee_id': str, 'side': str, 'subject_id': str}


def predictions_frame(*, knee_ids: Sequence[str], sides: Sequence[str],
                      y_true, probs,
                      subject_ids: Sequence[str] | None = None
                      ) -> pd.DataFrame:
  """One row per knee: ids, true grade and class probabilities."""
  probs = np.asarray(probs, np.float64)
  y = np.asarray(y_true)
  columns = {'knee_id': np.asarray(knee_ids, str),
             'side': np.asarray(sides, str)}
  if subject_ids is not None:
    columns['subject_id'] = np.asarray(subject_ids, str)
  columns[TRUE_COLUMN] = y.astype(np.int64)
  columns.update({f'p{k}': probs[:, k] for k in range(probs.shape[1])})
  lengths = {name: len(values) for name, values in columns.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'columns differ in length: {lengths}')
  return pd.DataFrame(columns)


def read_predictions(csv_path: str | Path
                     ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
  """(frame, true grades (n,), probabilities (n, C)) of a predictions.csv."""
  frame = pd.read_csv(csv_path, dtype=_TEXT_COLUMNS)
  prob_columns = sorted((c for c in frame.columns if _PROB_COLUMN.match(c)),
                        key=lambda c: int(c[1:]))
  if [int(c[1:]) for c in prob_columns] != list(range(len(prob_columns))):
    raise ValueError(f'{csv_path}: probability columns must be p0..pC-1; got '
                     f'{prob_columns}')
  if TRUE_COLUMN not in frame.columns or not prob_columns:
    raise ValueError(f'{csv_path}: needs a {TRUE_COLUMN!r} column and p0.. '
                     'columns')
  y = frame[TRUE_COLUMN].to_numpy(np.int64)
  return frame, y, frame[prob_columns].to_numpy(np.float64)


def metrics_from_predictions(csv_path: str | Path, *,
                             positive_from: int | None = metrics_lib.KL_OA_FROM
                             ) -> dict:
  """Point metrics (`metrics.classification_metrics`) of a predictions.csv."""
  _, y, probs = read_predictions(csv_path)
  return metrics_lib.classification_metrics(y, probs,
                                            positive_from=positive_from)


def headline(result: dict) -> str:
  """The point estimates worth printing from a `write_report` result."""
  return json.dumps({k: round(v['estimate'], 4)
                     for k, v in result['metrics'].items()
                     if k in ('balanced_accuracy', 'kappa', 'mse', 'roc_auc')})


def json_ready(value):
  """NumPy scalars/arrays -> Python; NaN -> None (JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [json_ready(v) for v in value]
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    return None if math.isnan(value) else float(value)
  return value


def _write_plots(out_dir: Path, confusion: np.ndarray, y, probs,
                 positive_from: int | None) -> dict[str, str]:
  files = {'confusion_matrix': plots.confusion_matrix_png(
      confusion, out_dir / CONFUSION_PNG,
      title=f'Confusion matrix, {TRUE_COLUMN.upper()}')}
  if positive_from is not None:
    positive, score = metrics_lib.binary_target(y, probs, positive_from)
    task = f'{TRUE_COLUMN.upper()} >= {positive_from}'
    files['roc'] = plots.roc_png(positive, score, out_dir / ROC_PNG,
                                 title=f'ROC, {task}')
    files['pr'] = plots.pr_png(positive, score, out_dir / PR_PNG,
                               title=f'Precision-recall, {task}')
  return {name: path.name for name, path in files.items()}


def write_report(out_dir: str | Path, *, knee_ids: Sequence[str],
                 sides: Sequence[str], y_true, probs,
                 subject_ids: Sequence[str] | None = None,
                 n_resamples: int = 1000, seed: int = 0,
                 positive_from: int | None = metrics_lib.KL_OA_FROM,
                 level: float = 0.95) -> dict:
  """Writes predictions, metrics with bootstrap intervals and figures.

  Args:
    out_dir: folder to write into (created if missing).
    knee_ids: (n,) knee keys ('<subject>_v<visit:02d>_<side>').
    sides: (n,) 'R' / 'L'.
    y_true: (n,) true grades 0..C-1.
    probs: (n, C) predicted class probabilities.
    subject_ids: (n,) optional subjects; stored in predictions.csv and counted.
    n_resamples: stratified bootstrap resamples for the intervals.
    seed: bootstrap seed.
    positive_from: threshold of the binary task (2: KL >= 2); None skips ROC
      AUC, average precision and their curves.
    level: confidence level of the intervals.

  Returns:
    The content of metrics.json.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  frame = predictions_frame(knee_ids=knee_ids, sides=sides, y_true=y_true,
                            probs=probs, subject_ids=subject_ids)
  frame.to_csv(out_dir / PREDICTIONS_CSV, index=False)
  # Evaluate what was written, so metrics.json and predictions.csv agree.
  _, y, probs = read_predictions(out_dir / PREDICTIONS_CSV)
  metric_set = metrics_lib.MetricSet(positive_from=positive_from)
  point = metric_set(y, probs)
  intervals = bootstrap.stratified_ci(metric_set, y, probs,
                                      n_resamples=n_resamples, seed=seed,
                                      level=level)
  report = {
      'n_knees': int(y.size),
      'n_subjects': (None if subject_ids is None
                     else int(np.unique(np.asarray(subject_ids, str)).size)),
      'class_counts': np.bincount(y, minlength=probs.shape[1]),
      'positive_from': positive_from,
      'bootstrap': {'n_resamples': n_resamples, 'seed': seed, 'level': level,
                    'method': 'stratified by true grade, percentile interval'},
      'metrics': {name: {'estimate': ci.estimate, 'ci_low': ci.low,
                         'ci_high': ci.high}
                  for name, ci in intervals.items()},
      'confusion_matrix': point['confusion_matrix'],
      'files': {'predictions': PREDICTIONS_CSV,
                **_write_plots(out_dir, point['confusion_matrix'], y, probs,
                               positive_from)},
  }
  report = json_ready(report)
  # allow_nan=False: a NaN that escaped conversion should fail loudly here
  # rather than produce a file other JSON readers reject.
  (out_dir / METRICS_JSON).write_text(
      json.dumps(report, indent=2, allow_nan=False) + '\n')
  return report
