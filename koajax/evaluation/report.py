"""The evaluation report of one run on one test set.

A model has one head (KL grades) or several (KL and the six OARSI grades, a
binary KL 0 vs 2 task, ...); the first head is the primary one. A knee that a
head does not grade has label -1 (`heads.MASKED`): it stays a row of
predictions.csv but is left out of that head's metrics and counts.

`write_report` writes to its output folder, for one head:

  predictions.csv       knee_id, side, [subject_id,] <head> (true grade, e.g.
                        kl), p0..p{C-1}
  metrics.json          every metric with its point estimate and stratified
                        bootstrap interval, the confusion matrix and counts
  confusion_matrix.png  counts and row-normalised rates
  roc.png, pr.png       ROC and precision-recall curves of grade >= t, with
                        positive_from t (2 for KL: radiographic OA)
  confidence_curves.png 2-class heads: each class's p(true class), sorted
                        (the confidence-driven paper's figure)

and for several heads:

  predictions.csv       knee_id, side, [subject_id,] then per head <head>
                        (true grade) and <head>_p0..<head>_p{C-1}
  metrics.json          the metrics, confusion matrix and counts of every
                        head under 'heads'; with mean_heads, under 'mean' the
                        metrics averaged over those heads, their intervals from
                        resampling knees jointly for all heads; under 'files'
                        predictions.csv and the heads table
  confusion_matrix_<head>.png, roc_<head>.png, pr_<head>.png,
  confidence_curves_<head>.png (2-class heads)
  heads_table.md, heads_table.png
                        one row per head: knees, kappa, balanced accuracy,
                        weighted F1, MSE, ROC AUC and AP with their intervals
                        (`koajax.evaluation.heads_table`), and one per pooled
                        task with ROC AUC and AP

With pooled_binary (either layout), binary tasks pooled over heads: the
osteophytes of the lateral tibia and femur as one task, say. The rows
(grade >= positive_from, summed probabilities from positive_from on) of every
listed head's graded knees are concatenated, and the report adds

  metrics.json          under 'pooled', per task: 'heads', 'positive_from'
                        (per head), 'n' (rows), 'n_positive', 'n_knees'
                        (knees with a row), 'metrics' (roc_auc and
                        average_precision: estimate, ci_low, ci_high; the
                        interval from resampling knees with all their rows,
                        stratified by each knee's rows and positive rows) and
                        'files'
  roc_<task>.png, pr_<task>.png

Every head's metrics are those of `metrics.metric_names`: balanced_accuracy,
kappa, mse, rmse, accuracy, f1_weighted, log_loss, recall_<k> and, with a binary
task, roc_auc and average_precision.

With sections (a method's own measures, e.g. the coherence of the
predictions under coherence learning's mixture), metrics.json also holds
each under its name.

predictions.csv is the ground truth of a report: the metrics are computed from
what was written to it, `predictions.metrics_from_predictions` recomputes
them, and `koajax.evaluation.compare` tests two runs against each other from
their predictions files. Undefined metrics (NaN) are written to metrics.json
as null.
Every file is written under a temporary name and then renamed, so an
interrupted report never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from koajax.evaluation import bootstrap
from koajax.evaluation import heads as heads_lib
from koajax.evaluation import heads_table
from koajax.evaluation import metrics as metrics_lib
from koajax.evaluation import plots
from koajax.evaluation import predictions as predictions_lib
from koajax.evaluation import readers as readers_lib

PREDICTIONS_CSV = 'predictions.csv'
METRICS_JSON = 'metrics.json'
CONFUSION_PNG = 'confusion_matrix.png'
ROC_PNG = 'roc.png'
PR_PNG = 'pr.png'
CONFIDENCE_PNG = 'confidence_curves.png'
HEADS_TABLE_MD = heads_table.HEADS_TABLE_MD
HEADS_TABLE_PNG = heads_table.HEADS_TABLE_PNG
# A pooled task's name becomes part of file names, as head names do.
_POOLED_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')

# Metrics `headline` prints.
_HEADLINE = ('balanced_accuracy', 'kappa', 'mse', 'roc_auc')
# A 2-class head: accuracy, F1 of the positive class, sensitivity
# (recall_1), specificity (recall_0) and ROC AUC, as binary papers report.
_BINARY_HEADLINE = ('accuracy', 'f1', 'recall_1', 'recall_0', 'roc_auc')


def _estimates(entries: Mapping[str, Mapping]) -> dict[str, float]:
  """metric -> estimate of metrics.json entries, null read back as NaN."""
  return {name: math.nan if entry['estimate'] is None
          else float(entry['estimate']) for name, entry in entries.items()}


def report_scores(result: Mapping) -> dict[str, float]:
  """The point estimates of a metrics.json dict under `heads.head_scores` names.

  The first (or only) head's metrics under their bare names,
  '<head>/<metric>' for every head, 'mean/<metric>' when the report has a
  mean, and 'loss' (mean log_loss over heads). A single-head report does not
  record its head's name, so it gives the bare names only. Undefined metrics
  are NaN.
  """
  mean = _estimates(result.get('mean', {}))
  if 'heads' in result:
    return heads_lib.flat_scores(
        {head: _estimates(entry['metrics'])
         for head, entry in result['heads'].items()}, mean)
  scores = _estimates(result['metrics'])
  scores.update({f'{heads_lib.MEAN}/{name}': value
                 for name, value in mean.items()})
  scores['loss'] = scores.get('log_loss', math.nan)
  return scores


def headline(result: Mapping) -> str:
  """The point estimates worth printing from a `write_report` result."""
  if 'heads' in result:
    first = next(iter(result['heads']))
    wanted = (f'{first}/balanced_accuracy', f'{first}/kappa',
              f'{heads_lib.MEAN}/kappa',
              f'{heads_lib.MEAN}/balanced_accuracy')
  else:
    wanted = (_BINARY_HEADLINE if len(result.get('class_counts', ())) == 2
              else _HEADLINE)
  scores = report_scores(result)
  return json.dumps({name: None if math.isnan(scores[name])
                     else round(scores[name], 4)
                     for name in wanted if name in scores})


def json_ready(value):
  """NumPy scalars/arrays -> Python; NaN and +-Inf -> None (JSON has
  neither)."""
  if isinstance(value, dict):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [json_ready(v) for v in value]
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


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
  if probs.shape[1] == 2:
    files['confidence_curves'] = plots.confidence_curves_png(
        y, probs, out_dir / _plot_name(CONFIDENCE_PNG, suffix_head),
        title=f'Sorted confidence, {head.upper()}')
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
  graded = heads_lib.graded_rows(y, probs)
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


def _check_pooled(pooled_binary: Mapping[str, Sequence[str]],
                  heads: Sequence[str],
                  thresholds: Mapping[str, int | None]
                  ) -> dict[str, list[str]]:
  """Task name -> its heads, after checking them against the report's heads.

  Checked before anything is written, as the heads are, so that a bad
  argument leaves no partial report.
  """
  pooled = {}
  for name, task_heads in pooled_binary.items():
    if not isinstance(name, str) or not _POOLED_NAME.match(name):
      raise ValueError(f'bad pooled task name {name!r}: use letters, digits '
                       'and _ . -')
    if name in heads:
      # roc_<name>.png would overwrite the head's own curve.
      raise ValueError(f'pooled task {name!r} is named like a head')
    if isinstance(task_heads, str):
      raise ValueError(f'pooled task {name!r}: give a sequence of heads, not '
                       f'the string {task_heads!r}')
    task_heads = list(task_heads)
    unknown = [head for head in task_heads if head not in heads]
    if not task_heads or unknown:
      raise ValueError(f'pooled task {name!r} needs some of the heads '
                       f'{list(heads)}; got {task_heads}')
    if len(set(task_heads)) != len(task_heads):
      raise ValueError(f'pooled task {name!r} repeats a head: {task_heads}')
    binary = [head for head in task_heads if thresholds[head] is None]
    if binary:
      raise ValueError(f'pooled task {name!r}: heads {binary} have no '
                       'positive_from, so no binary task to pool')
    pooled[name] = task_heads
  return pooled


def _pooled_report(out_dir: Path, name: str, task_heads: Sequence[str],
                   labels: Mapping[str, np.ndarray],
                   probs: Mapping[str, np.ndarray],
                   thresholds: Mapping[str, int], *, n_resamples: int,
                   seed: int, level: float) -> dict:
  """Counts, ROC AUC and AP with intervals, and curves of a pooled task."""
  positive, score, knees = [], [], []
  for head in task_heads:
    graded = heads_lib.graded_rows(labels[head], probs[head])
    threshold = thresholds[head]
    positive.append(labels[head][graded] >= threshold)
    score.append(probs[head][graded, threshold:].sum(axis=1))
    knees.append(np.flatnonzero(graded))
  positive = np.concatenate(positive)
  score = np.concatenate(score)
  knees = np.concatenate(knees)
  intervals = bootstrap.clustered_ranking_ci(
      positive, score, knees, n_resamples=n_resamples, seed=seed, level=level)
  task = ', '.join(f'{head.upper()} >= {thresholds[head]}'
                   for head in task_heads)
  files = {
      'roc': plots.roc_png(positive, score,
                           out_dir / _plot_name(ROC_PNG, name),
                           title=f'ROC, {name}: {task}'),
      'pr': plots.pr_png(positive, score, out_dir / _plot_name(PR_PNG, name),
                         title=f'Precision-recall, {name}: {task}'),
  }
  return {
      'heads': list(task_heads),
      'positive_from': {head: thresholds[head] for head in task_heads},
      'n': int(positive.size),
      'n_positive': int(positive.sum()),
      'n_knees': int(np.unique(knees).size),
      'metrics': _intervals_json(intervals),
      'files': {kind: path.name for kind, path in files.items()},
  }


def write_report(out_dir: str | Path, *, knee_ids: Sequence[str],
                 sides: Sequence[str], labels: Mapping[str, np.ndarray],
                 probs: Mapping[str, np.ndarray],
                 positive_from: Mapping[str, int | None] | None = None,
                 mean_heads: Sequence[str] = (),
                 subject_ids: Sequence[str] | None = None,
                 pooled_binary: Mapping[str, Sequence[str]] | None = None,
                 n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95,
                 readers: Mapping[str, np.ndarray] | None = None,
                 sections: Mapping[str, object] | None = None) -> dict:
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
    pooled_binary: task name -> heads whose binary tasks are pooled into one
      (e.g. {'ost_lateral': ('ost_tl', 'ost_fl')}); every listed head needs a
      positive_from. None or empty: no pooled tasks.
    n_resamples: bootstrap resamples for the intervals.
    seed: bootstrap seed.
    level: confidence level of the intervals.
    readers: reader name -> (n,) the reader's grades as labels of the
      primary head, -1 where the reader gave another grade or none. When
      given, the model is compared with every reader on the knees both the
      reference and the reader grade: readers.csv, readers.md and a
      'readers' section in metrics.json (`koajax.evaluation.readers`).
    sections: further top-level entries of metrics.json, JSON-ready (a
      method's measures of the predictions, e.g. their coherence); a name
      the report uses itself is an error.

  Returns:
    The content of metrics.json; see the module docstring for the layouts.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  heads = heads_lib.check_heads(labels, probs, positive_from, mean_heads)
  predictions_lib.check_head_names(heads)
  mean_heads = list(mean_heads)
  thresholds = {head: (positive_from or {}).get(head) for head in heads}
  for head in heads:
    metrics_lib.metric_names(np.shape(probs[head])[-1], thresholds[head])
  pooled_binary = _check_pooled(pooled_binary or {}, heads, thresholds)
  if readers:
    readers_lib.check_readers(readers, len(knee_ids),
                              np.shape(probs[heads[0]])[-1])
  frame = predictions_lib.predictions_frame(
      knee_ids=knee_ids, sides=sides, labels=labels, probs=probs,
      subject_ids=subject_ids)
  plots.write_atomically(out_dir / PREDICTIONS_CSV,
                         lambda path: frame.to_csv(path, index=False))
  # Evaluate what was written, so metrics.json and predictions.csv agree.
  frame, labels, probs = predictions_lib.read_heads(out_dir / PREDICTIONS_CSV)
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
  pooled = {name: _pooled_report(out_dir, name, task_heads, labels, probs,
                                 thresholds, **options)
            for name, task_heads in pooled_binary.items()}
  if pooled:
    bootstrap_info['pooled_method'] = (
        'knees resampled with all their rows of the pooled heads, stratified '
        "by each knee's number of rows and of positive rows, percentile "
        'interval')
  if single:
    (head_report,) = per_head.values()
    graded = heads_lib.graded_rows(labels[heads[0]], probs[heads[0]])
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
  if pooled:
    report['pooled'] = pooled
  if readers:
    report['readers'] = readers_lib.write_reader_table(
        out_dir, labels[heads[0]], probs[heads[0]], readers,
        positive_from=thresholds[heads[0]])
  for name, value in (sections or {}).items():
    if name in report or name == 'files':
      raise ValueError(f'report section {name!r} is one the report writes '
                       'itself')
    report[name] = value
  report = json_ready(report)
  if not single:
    # Written before metrics.json, which lists them: a report whose table
    # failed has no metrics.json claiming it exists.
    report['files'] = {'predictions': PREDICTIONS_CSV,
                       **heads_table.write_heads_table(report, out_dir)}
  # allow_nan=False: a NaN that escaped conversion should fail loudly here
  # rather than produce a file other JSON readers reject.
  text = json.dumps(report, indent=2, allow_nan=False) + '\n'
  plots.write_atomically(out_dir / METRICS_JSON,
                         lambda path: path.write_text(text))
  return report
