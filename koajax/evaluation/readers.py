"""The model against human readers: the reader table of a report.

The confidence-driven paper compares its KL-0 vs KL-2 model with three
radiologists on the test knees they graded. For every reader, on the knees
that the reference (the labels the model is scored against) and the reader
both grade within the task's classes, the table gives

  knees                     how many such knees
  reader accuracy, sensitivity, specificity
                            the reader's grades against the reference
  model accuracy, sensitivity, specificity
                            the model's (argmax) on the same knees
  kappa model-reader        Cohen's kappa between the model and the reader
  kappa reader-reference    Cohen's kappa between the reader and the reference
  model only / reader only  knees only the model / only the reader got right
  McNemar p                 exact two-sided McNemar test of the paired
                            correctness: a binomial test of `model only` out
                            of the discordant knees with p = 1/2
                            (scipy.stats.binomtest via `significance.mcnemar`)

Sensitivity and specificity are the recall of the positive class (class >=
positive_from; class 1 of a two-class head) and of the rest. Kappa is
unweighted for two classes and quadratic-weighted for more (KL grading), as
the report's own kappa. A value that is undefined (no common knees, one
class only) is NaN: empty in readers.csv, null in metrics.json, '—' in
readers.md.

`write_reader_table` writes readers.csv and readers.md into the report folder
and returns the 'readers' section of metrics.json; `index_readers` takes the
readers' grades from a cache index (columns kl_reader_<name>).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn import exceptions as sklearn_exceptions
from sklearn.metrics import cohen_kappa_score

from koajax.data import schema
from koajax.evaluation import plots
from koajax.evaluation import significance

READERS_CSV = 'readers.csv'
READERS_MD = 'readers.md'
MASKED = -1
MISSING = '—'
DECIMALS = 3
TEST = ('exact two-sided McNemar test on the paired correctness against the '
        'reference (binomial test of the knees only the model got right out '
        'of those only one of model and reader got right, p = 1/2; '
        'scipy.stats.binomtest)')

# Column of readers.csv -> header of readers.md, in table order.
COLUMNS = (
    ('reader', 'reader'),
    ('n', 'knees'),
    ('reader_accuracy', 'reader accuracy'),
    ('reader_sensitivity', 'reader sensitivity'),
    ('reader_specificity', 'reader specificity'),
    ('model_accuracy', 'model accuracy'),
    ('model_sensitivity', 'model sensitivity'),
    ('model_specificity', 'model specificity'),
    ('kappa_model_reader', 'kappa model-reader'),
    ('kappa_reader_reference', 'kappa reader-reference'),
    ('model_only', 'model only right'),
    ('reader_only', 'reader only right'),
    ('mcnemar_p', 'McNemar p'),
)
_COUNTS = ('n', 'model_only', 'reader_only')


def index_readers(index: pd.DataFrame, head) -> dict[str, np.ndarray]:
  """Reader name -> labels of `head` from the kl_reader_<name> columns.

  Args:
    index: cache index rows (columns kl_reader_<name>: KL grades, -1 where
      that reader did not grade the knee).
    head: a `tasks.Head`; readers grade KL, so a head on another column has
      no readers.

  Returns:
    (n,) int32 labels per reader, MASKED where the head excludes the grade;
    {} when the head does not read 'kl' or the index has no readers.
  """
  if head.column != 'kl':
    return {}
  return {name: head.labels(index[schema.reader_column(name)].to_numpy())
          for name in schema.reader_names(index.columns)}


def check_readers(readers: Mapping[str, Any], n: int,
                  num_classes: int) -> dict[str, np.ndarray]:
  """The readers' labels as int arrays, or ValueError saying what is wrong."""
  out = {}
  for name, labels in readers.items():
    labels = np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(f'reader {name!r}: labels of shape {labels.shape}, '
                       f'expected ({n},), one per knee')
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'reader {name!r}: labels must be integers')
    if labels.size and (labels.min() < MASKED or labels.max() >= num_classes):
      raise ValueError(f'reader {name!r}: labels must lie in '
                       f'0..{num_classes - 1} or be {MASKED}')
    out[str(name)] = labels.astype(np.int64)
  return out


def _positive_class(num_classes: int, positive_from: int | None) -> int | None:
  if positive_from is None and num_classes == 2:
    return 1
  return positive_from


def _recalls(y: np.ndarray, pred: np.ndarray,
             positive_from: int | None) -> tuple[float, float]:
  """(sensitivity, specificity) of `pred` against `y`; NaN if undefined."""
  if positive_from is None:
    return math.nan, math.nan
  truth, called = y >= positive_from, pred >= positive_from
  sensitivity = called[truth].mean() if truth.any() else math.nan
  specificity = (~called[~truth]).mean() if (~truth).any() else math.nan
  return float(sensitivity), float(specificity)


def _kappa(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
  if not a.size:
    return math.nan
  weights = None if num_classes == 2 else 'quadratic'
  with warnings.catch_warnings():
    # One common class makes kappa undefined; NaN says so in the table.
    warnings.simplefilter('ignore', sklearn_exceptions.UndefinedMetricWarning)
    warnings.simplefilter('ignore', RuntimeWarning)
    return float(cohen_kappa_score(a, b, labels=np.arange(num_classes),
                                   weights=weights))


def _reader_row(name: str, y: np.ndarray, model: np.ndarray,
                reader: np.ndarray, num_classes: int,
                positive_from: int | None) -> dict[str, Any]:
  both = (y != MASKED) & (reader != MASKED)
  y, model, reader = y[both], model[both], reader[both]
  row = {'reader': name, 'n': int(both.sum())}
  for who, pred in (('reader', reader), ('model', model)):
    row[f'{who}_accuracy'] = (float(np.mean(pred == y)) if y.size
                              else math.nan)
    (row[f'{who}_sensitivity'],
     row[f'{who}_specificity']) = _recalls(y, pred, positive_from)
  row['kappa_model_reader'] = _kappa(model, reader, num_classes)
  row['kappa_reader_reference'] = _kappa(reader, y, num_classes)
  test = significance.mcnemar(y, model, reader, exact=True)
  row['model_only'], row['reader_only'] = test.a_only, test.b_only
  # No knees is no test at all, not "no difference" (mcnemar's p of 1).
  row['mcnemar_p'] = test.p_value if y.size else math.nan
  return row


def reader_table(labels, probs, readers: Mapping[str, Any], *,
                 positive_from: int | None = None) -> pd.DataFrame:
  """The model against every reader; see the module docstring.

  Args:
    labels: (n,) reference labels of the primary head, MASKED (-1) where the
      knee is not part of the task.
    probs: (n, C) the model's class probabilities (its label is the argmax).
    readers: name -> (n,) the reader's grades mapped into the head's labels,
      MASKED where the reader gave a grade outside the task or none.
    positive_from: classes >= this are positive for sensitivity and
      specificity; None: class 1 of a two-class head, else no sensitivity.

  Returns:
    One row per reader in `readers` order, columns `COLUMNS`.
  """
  y = np.asarray(labels)
  p = np.asarray(probs)
  if y.ndim != 1 or p.ndim != 2 or p.shape[0] != y.shape[0]:
    raise ValueError(f'need labels (n,) and probs (n, C); got {y.shape} and '
                     f'{p.shape}')
  num_classes = p.shape[1]
  readers = check_readers(readers, y.size, num_classes)
  model = np.argmax(p, axis=1) if y.size else np.zeros(0, np.int64)
  positive = _positive_class(num_classes, positive_from)
  rows = [_reader_row(name, y.astype(np.int64), model, grades, num_classes,
                      positive)
          for name, grades in readers.items()]
  return pd.DataFrame(rows, columns=[c for c, _ in COLUMNS])


def _cell(column: str, value) -> str:
  if column == 'reader':
    return str(value)
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return MISSING
  if column in _COUNTS:
    return str(int(value))
  if column == 'mcnemar_p' and value < 10 ** -DECIMALS:
    return f'< {10 ** -DECIMALS:.{DECIMALS}f}'
  return f'{value:.{DECIMALS}f}'


def markdown(table: pd.DataFrame, *, kappa_weights: str,
             sensitivity: str) -> str:
  """readers.md: the table and what its columns mean."""
  lines = ['| ' + ' | '.join(header for _, header in COLUMNS) + ' |',
           '|' + '|'.join('---' if c == 'reader' else '---:'
                          for c, _ in COLUMNS) + '|']
  for row in table.itertuples(index=False):
    lines.append('| ' + ' | '.join(_cell(c, getattr(row, c))
                                   for c, _ in COLUMNS) + ' |')
  notes = (
      f'Knees graded by both the reference and the reader, within the '
      f"task's classes. Accuracy, sensitivity ({sensitivity}) and "
      f'specificity are against the reference; kappa is Cohen\'s kappa '
      f'({kappa_weights}). McNemar p: {TEST}. {MISSING} marks a value that '
      'is undefined.')
  return '\n'.join(lines) + '\n\n' + notes + '\n'


def write_reader_table(out_dir: str | Path, labels, probs,
                       readers: Mapping[str, Any], *,
                       positive_from: int | None = None) -> dict[str, Any]:
  """Writes readers.csv and readers.md into `out_dir` (see `reader_table`).

  Returns:
    The 'readers' section of metrics.json: the test, the kappa weighting,
    the positive class, the files and one entry per reader (NaN as given:
    `report.json_ready` turns it into null).
  """
  out_dir = Path(out_dir)
  table = reader_table(labels, probs, readers, positive_from=positive_from)
  num_classes = np.shape(probs)[1]
  positive = _positive_class(num_classes, positive_from)
  kappa_weights = 'unweighted' if num_classes == 2 else 'quadratic weights'
  sensitivity = ('undefined for this head' if positive is None else
                 f'recall of class >= {positive}')
  plots.write_atomically(out_dir / READERS_CSV,
                         lambda path: table.to_csv(path, index=False))
  text = markdown(table, kappa_weights=kappa_weights, sensitivity=sensitivity)
  plots.write_atomically(out_dir / READERS_MD,
                         lambda path: path.write_text(text, encoding='utf-8'))
  return {
      'test': TEST,
      'kappa': f"Cohen's kappa, {kappa_weights}",
      'positive_from': positive,
      'files': {'csv': READERS_CSV, 'md': READERS_MD},
      'readers': {row['reader']: {c: row[c] for c, _ in COLUMNS[1:]}
                  for row in table.to_dict('records')},
  }
