"""The evaluation report of one run on one test set.

A model has one head (KL grades) or several (KL and the six OARSI grades, a
binary KL 0 vs 2 task, ...); the first head is the primary one. A knee that a
head does not grade has label -1 (`metrics.MASKED`): it stays a row of
predictions.csv but is left out of that head's metrics and counts.

`write_report` writes to its output folder, for one head:

  predictions.csv       knee_id, side, [subject_id,] <head> (true grade, e.g.
                        kl), p0..p{C-1}
  metrics.json          every metric with its point estimate and stratified
                        bootstrap interval, the confusion matrix and counts
  confusion_matrix.png  counts and row-normalised rates
  roc.png, pr.png       ROC and precision-recall curves of grade >= t, with
                        positive_from t (2 for KL: radiographic OA)

and for several heads:

  predictions.csv       knee_id, side, [subject_id,] then per head <head>
                        (true grade) and <head>_p0..<head>_p{C-1}
  metrics.json          the metrics, confusion matrix and counts of every
                        head under 'heads'; with mean_heads, under 'mean' the
                        metrics averaged over those heads, their intervals from
                        resampling knees jointly for all heads
  confusion_matrix_<head>.png, roc_<head>.png, pr_<head>.png

predictions.csv is the ground truth of a report: the metrics are computed from
what was written to it, `metrics_from_predictions` recomputes them, and
`koajax.evaluation.compare` tests two runs against each other from their
predictions files. Undefined metrics (NaN) are written to metrics.json as null.
Every file is written under a temporary name and then renamed, so an
interrupted report never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
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

# The head of `predictions_frame(y_true=..., probs=...)`: the KL grade.
TRUE_COLUMN = 'kl'
_PROB_COLUMN = re.compile(r'^p(\d+)$')
# Head names become CSV columns and parts of file names.
_HEAD_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')
# A head named like a probability column would make the CSV ambiguous.
_PROB_LIKE = re.compile(r'(^|_)p\d+$')
# Identifier columns are read as text so that ids such as '0012' keep their
# leading zeros.
_TEXT_COLUMNS = {'knee_id': str, 'side': str, 'subject_id': str}
# Metrics `headline` prints.
_HEADLINE = ('balanced_accuracy', 'kappa', 'mse', 'roc_auc')


def _check_head_names(heads: Sequence[str]) -> None:
  for head in heads:
    if (not isinstance(head, str) or not _HEAD_NAME.match(head)
        or _PROB_LIKE.search(head) or head in _TEXT_COLUMNS
        or head == metrics_lib.MEAN):
      raise ValueError(
          f'bad head name {head!r}: use letters, digits, _ . -, not ending in '
          f'p<k> or _p<k>, and not one of {[*_TEXT_COLUMNS, metrics_lib.MEAN]}')


def predictions_frame(*, knee_ids: Sequence[str], sides: Sequence[str],
                      labels: Mapping[str, np.ndarray] | None = None,
                      probs, subject_ids: Sequence[str] | None = None,
                      y_true=None) -> pd.DataFrame:
  """One row per knee: ids, then each head's true grade and probabilities.

  Args:
    knee_ids: (n,) knee keys.
    sides: (n,) 'R' / 'L'.
    labels: head -> (n,) grades, metrics.MASKED (-1) where ungraded; the
      first head is the primary one.
    probs: head -> (n, C_head) class probabilities; or, with y_true, one
      (n, C) array.
    subject_ids: (n,) optional subjects.
    y_true: instead of labels, the (n,) grades of the single head TRUE_COLUMN.

  Returns:
    Columns knee_id, side, [subject_id,] then for one head <head>, p0..pC-1,
    for several heads <head>, <head>_p0..<head>_pC-1 per head.
  """
  if y_true is not None:
    if labels is not None:
      raise ValueError('pass labels or y_true, not both')
    labels, probs = {TRUE_COLUMN: y_true}, {TRUE_COLUMN: probs}
  if labels is None:
    raise ValueError('labels are missing')
  heads = metrics_lib.check_heads(labels, probs)
  _check_head_names(heads)
  columns = {'knee_id': np.asarray(knee_ids, str),
             'side': np.asarray(sides, str)}
  if subject_ids is not None:
    columns['subject_id'] = np.asarray(subject_ids, str)
  for head in heads:
    p = np.asarray(probs[head], np.float64)
    y = np.asarray(labels[head])
    metrics_lib.graded_rows(y, p)  # checks shapes and grade range
    columns[head] = y.astype(np.int64)
    prefix = 'p' if len(heads) == 1 else f'{head}_p'
    columns.update({f'{prefix}{k}': p[:, k] for k in range(p.shape[1])})
  lengths = {name: len(values) for name, values in columns.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'columns differ in length: {lengths}')
  return pd.DataFrame(columns)


def _prob_columns(csv_path, head: str, columns: Sequence[str],
                  pattern: re.Pattern) -> list[str]:
  """The probability columns of `head` in class order, checked to be 0..C-1."""
  found = sorted((c for c in columns if pattern.match(c)),
                 key=lambda c: int(pattern.match(c)[1]))
  classes = [int(pattern.match(c)[1]) for c in found]
  if not found or classes != list(range(len(found))):
    raise ValueError(f'{csv_path}: the probability columns of {head!r} must '
                     f'be classes 0..C-1; got {found}')
  return found


def read_heads(csv_path: str | Path
               ) -> tuple[pd.DataFrame, dict[str, np.ndarray],
                          dict[str, np.ndarray]]:
  """(frame, {head: grades (n,)}, {head: probabilities (n, C)}) of a
  predictions.csv, heads in column order; ungraded knees have grade -1.

  Reads both layouts: one head (<head>, p0..) as every single-head run writes,
  and several heads (<head>, <head>_p0.. each).
  """
  frame = pd.read_csv(csv_path, dtype=_TEXT_COLUMNS)
  data = [c for c in frame.columns if c not in _TEXT_COLUMNS]
  if any(_PROB_COLUMN.match(c) for c in data):
    heads = [c for c in data if not _PROB_COLUMN.match(c)]
    if len(heads) != 1:
      raise ValueError(f'{csv_path}: a file with p0.. columns has one grade '
                       f'column; got {heads}')
    prob_columns = {heads[0]: _prob_columns(csv_path, heads[0], data,
                                            _PROB_COLUMN)}
  else:
    heads = [c for c in data if not re.search(r'_p\d+$', c)]
    prob_columns = {
        head: _prob_columns(csv_path, head, data,
                            re.compile(rf'^{re.escape(head)}_p(\d+)$'))
        for head in heads}
  if not heads:
    raise ValueError(f'{csv_path}: no grade column')
  unknown = set(data) - set(heads) - {c for cs in prob_columns.values()
                                      for c in cs}
  if unknown:
    raise ValueError(f'{csv_path}: columns {sorted(unknown)} belong to no head')
  labels = {head: frame[head].to_numpy(np.int64) for head in heads}
  probs = {head: frame[prob_columns[head]].to_numpy(np.float64)
           for head in heads}
  return frame, labels, probs


def read_predictions(csv_path: str | Path, head: str | None = None
                     ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
  """(frame, true grades (n,), probabilities (n, C)) of one head.

  Args:
    csv_path: a predictions.csv of one or several heads.
    head: the head to read; None: the only head, or the first (primary) one.
  """
  frame, labels, probs = read_heads(csv_path)
  if head is None:
    head = next(iter(labels))
  if head not in labels:
    raise ValueError(f'{csv_path} has no head {head!r}; it has {list(labels)}')
  return frame, labels[head], probs[head]


def metrics_from_predictions(csv_path: str | Path, *, head: str | None = None,
                             positive_from: int | None = metrics_lib.KL_OA_FROM
                             ) -> dict:
  """Point metrics (`metrics.classification_metrics`) of one head of a
  predictions.csv, on its graded knees.

  Args:
    csv_path: a predictions.csv.
    head: as in `read_predictions`.
    positive_from: binary threshold for ROC AUC and average precision; the
      default suits KL, pass None (or the head's own threshold) for others.
  """
  _, y, probs = read_predictions(csv_path, head)
  graded = metrics_lib.graded_rows(y, probs)
  return metrics_lib.classification_metrics(y[graded], probs[graded],
                                            positive_from=positive_from)


def _estimates(entries: Mapping[str, Mapping]) -> dict[str, float]:
  """metric -> estimate of metrics.json entries, null read back as NaN."""
  return {name: math.nan if entry['estimate'] is None
          else float(entry['estimate']) for name, entry in entries.items()}


def report_scores(result: Mapping) -> dict[str, float]:
  """The point estimates of a metrics.json dict under `head_scores` names.

  The first (or only) head's metrics under their bare names,
  '<head>/<metric>' for every head, 'mean/<metric>' when the report has a
  mean, and 'loss' (mean log_loss over heads). A single-head report does not
  record its head's name, so it gives the bare names only. Undefined metrics
  are NaN.
  """
  mean = _estimates(result.get('mean', {}))
  if 'heads' in result:
    return metrics_lib.flat_scores(
        {head: _estimates(entry['metrics'])
         for head, entry in result['heads'].items()}, mean)
  scores = _estimates(result['metrics'])
  scores.update({f'{metrics_lib.MEAN}/{name}': value
                 for name, value in mean.items()})
  scores['loss'] = scores.get('log_loss', math.nan)
  return scores


def headline(result: Mapping) -> str:
  """The point estimates worth printing from a `write_report` result."""
  if 'heads' in result:
    first = next(iter(result['heads']))
    wanted = (f'{first}/balanced_accuracy', f'{first}/kappa',
              f'{metrics_lib.MEAN}/kappa',
              f'{metrics_lib.MEAN}/balanced_accuracy')
  else:
    wanted = _HEADLINE
  scores = report_scores(result)
  return json.dumps({name: None if math.isnan(scores[name])
                     else round(scores[name], 4)
                     for name in wanted if name in scores})


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


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
  """Calls write(temporary path) and renames the result to `path`."""
  # Same folder, so os.replace is an atomic rename.
  partial = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    write(partial)
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)


def _plot_name(kind_file: str, head: str | None) -> str:
  """'roc.png' for a single-head report, 'roc_<head>.png' otherwise."""
  if head is None:
    return kind_file
  stem, suffix = kind_file.rsplit('.', 1)
  return f'{stem}_{head}.{suffix}'


def _write_plots(out_dir: Path, head: str, suffix_head: str | None,
                 confusion: np.ndarray, y: np.ndarray, probs: np.ndarray,
                 positive_from: int | None) -> dict[str, str]:
  """The figures of one head on its graded knees; name -> file name."""
  files = {'confusion_matrix': plots.confusion_matrix_png(
      confusion, out_dir / _plot_name(CONFUSION_PNG, suffix_head),
      title=f'Confusion matrix, {head.upper()}')}
  if positive_from is not None:
    # Not metrics.binary_target: a head may have no graded knee, and the
    # plots then say the curve is undefined.
    positive = y >= positive_from
    score = probs[:, positive_from:].sum(axis=1)
    task = f'{head.upper()} >= {positive_from}'
    files['roc'] = plots.roc_png(
        positive, score, out_dir / _plot_name(ROC_PNG, suffix_head),
        title=f'ROC, {task}')
    files['pr'] = plots.pr_png(
        positive, score, out_dir / _plot_name(PR_PNG, suffix_head),
        title=f'Precision-recall, {task}')
  return {name: path.name for name, path in files.items()}


def _intervals_json(intervals: Mapping[str, bootstrap.Interval]) -> dict:
  return {name: {'estimate': ci.estimate, 'ci_low': ci.low,
                 'ci_high': ci.high}
          for name, ci in intervals.items()}


def _head_report(out_dir: Path, head: str, suffix_head: str | None,
                 y: np.ndarray, probs: np.ndarray,
                 positive_from: int | None, *, n_resamples: int, seed: int,
                 level: float) -> dict:
  """Counts, metrics with intervals, confusion matrix and figures of a head."""
  num_classes = probs.shape[1]
  graded = metrics_lib.graded_rows(y, probs)
  y, probs = y[graded], probs[graded]
  metric_set = metrics_lib.MetricSet(positive_from=positive_from)
  if y.size:
    confusion = metric_set(y, probs)['confusion_matrix']
    intervals = bootstrap.stratified_ci(metric_set, y, probs,
                                        n_resamples=n_resamples, seed=seed,
                                        level=level)
  else:
    confusion = np.zeros((num_classes, num_classes), np.int64)
    undefined = bootstrap.Interval(math.nan, math.nan, math.nan)
    intervals = dict.fromkeys(
        metrics_lib.metric_names(num_classes, positive_from), undefined)
  return {
      'n_knees': int(y.size),
      'class_counts': np.bincount(y, minlength=num_classes),
      'positive_from': positive_from,
      'metrics': _intervals_json(intervals),
      'confusion_matrix': confusion,
      'files': _write_plots(out_dir, head, suffix_head, confusion, y, probs,
                            positive_from),
  }


def write_report(out_dir: str | Path, *, knee_ids: Sequence[str],
                 sides: Sequence[str], labels: Mapping[str, np.ndarray],
                 probs: Mapping[str, np.ndarray],
                 positive_from: Mapping[str, int | None] | None = None,
                 mean_heads: Sequence[str] = (),
                 subject_ids: Sequence[str] | None = None,
                 n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
  """Writes predictions, metrics with bootstrap intervals and figures.

  Args:
    out_dir: folder to write into (created if missing).
    knee_ids: (n,) knee keys ('<subject>_v<visit:02d>_<side>').
    sides: (n,) 'R' / 'L'.
    labels: head -> (n,) true grades 0..C-1, -1 where the knee is ungraded
      for that head. The order of heads is that of the files; the first head
      is the primary one.
    probs: head -> (n, C_head) predicted class probabilities.
    positive_from: head -> threshold of its binary task (2 for KL: KL >= 2);
      None or absent skips ROC AUC, average precision and their curves.
    mean_heads: heads whose metrics are also averaged, with intervals from
      resampling knees jointly.
    subject_ids: (n,) optional subjects; stored in predictions.csv and counted.
    n_resamples: bootstrap resamples for the intervals.
    seed: bootstrap seed.
    level: confidence level of the intervals.

  Returns:
    The content of metrics.json; see the module docstring for the layouts.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  heads = metrics_lib.check_heads(labels, probs, positive_from, mean_heads)
  _check_head_names(heads)
  mean_heads = list(mean_heads)
  thresholds = {head: (positive_from or {}).get(head) for head in heads}
  for head in heads:
    metrics_lib.metric_names(np.shape(probs[head])[-1], thresholds[head])
  frame = predictions_frame(knee_ids=knee_ids, sides=sides, labels=labels,
                            probs=probs, subject_ids=subject_ids)
  _write_atomically(out_dir / PREDICTIONS_CSV,
                    lambda path: frame.to_csv(path, index=False))
  # Evaluate what was written, so metrics.json and predictions.csv agree.
  frame, labels, probs = read_heads(out_dir / PREDICTIONS_CSV)
  single = len(heads) == 1
  options = dict(n_resamples=n_resamples, seed=seed, level=level)
  per_head = {head: _head_report(out_dir, head, None if single else head,
                                 labels[head], probs[head], thresholds[head],
                                 **options)
              for head in heads}
  subjects = (frame['subject_id'].to_numpy(str) if 'subject_id' in frame
              else None)
  bootstrap_info = {'n_resamples': n_resamples, 'seed': seed, 'level': level,
                    'method': 'stratified by true grade, percentile interval'}
  mean = None
  if mean_heads:
    # The primary head among those averaged defines the strata.
    strata_head = mean_heads[0]
    mean = _intervals_json(bootstrap.joint_mean_ci(
        [(metrics_lib.MetricSet(positive_from=thresholds[head]),
          labels[head], probs[head]) for head in mean_heads],
        labels[strata_head], **options))
    bootstrap_info['mean_heads'] = mean_heads
    bootstrap_info['mean_method'] = (
        'knees resampled jointly for all heads, stratified by the '
        f'{strata_head} grade (ungraded knees as one stratum), percentile '
        'interval of the mean over heads')
  if single:
    (head_report,) = per_head.values()
    graded = metrics_lib.graded_rows(labels[heads[0]], probs[heads[0]])
    report = {
        'n_knees': head_report['n_knees'],
        'n_subjects': (None if subjects is None
                       else int(np.unique(subjects[graded]).size)),
        'class_counts': head_report['class_counts'],
        'positive_from': head_report['positive_from'],
        'bootstrap': bootstrap_info,
        'metrics': head_report['metrics'],
        'confusion_matrix': head_report['confusion_matrix'],
        'files': {'predictions': PREDICTIONS_CSV, **head_report['files']},
    }
  else:
    report = {
        'n_knees': int(len(frame)),
        'n_subjects': (None if subjects is None
                       else int(np.unique(subjects).size)),
        'bootstrap': bootstrap_info,
        'heads': per_head,
    }
  if mean is not None:
    report['mean'] = mean
  report = json_ready(report)
  # allow_nan=False: a NaN that escaped conversion should fail loudly here
  # rather than produce a file other JSON readers reject.
  text = json.dumps(report, indent=2, allow_nan=False) + '\n'
  _write_atomically(out_dir / METRICS_JSON,
                    lambda path: path.write_text(text))
  return report
