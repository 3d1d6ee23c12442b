"""predictions.csv: one row per knee with each head's true grade and
predicted class probabilities, the ground truth of a report.

Two layouts, told apart by their columns:

  one head              knee_id, side, [subject_id,] <head>, p0..p{C-1}
  several heads         knee_id, side, [subject_id,] then per head <head>
                        and <head>_p0..<head>_p{C-1}

A knee that a head does not grade has grade -1 (`heads.MASKED`) in that
head's column.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from koajax.evaluation import heads as heads_lib
from koajax.evaluation import metrics as metrics_lib

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


def check_head_names(heads: Sequence[str]) -> None:
  """Raises ValueError unless every head name can name CSV columns and files.

  `heads.check_heads` checks the names as metric keys; these rules are
  stricter because a name also becomes columns <head>_p<k> and figure files.
  """
  for head in heads:
    if (not isinstance(head, str) or not _HEAD_NAME.match(head)
        or _PROB_LIKE.search(head) or head in _TEXT_COLUMNS
        or head == heads_lib.MEAN):
      raise ValueError(
          f'bad head name {head!r}: use letters, digits, _ . -, not ending in '
          f'p<k> or _p<k>, and not one of {[*_TEXT_COLUMNS, heads_lib.MEAN]}')


def predictions_frame(*, knee_ids: Sequence[str], sides: Sequence[str],
                      labels: Mapping[str, np.ndarray] | None = None,
                      probs, subject_ids: Sequence[str] | None = None,
                      y_true=None) -> pd.DataFrame:
  """One row per knee: ids, then each head's true grade and probabilities.

  Args:
    knee_ids: (n,) knee keys.
    sides: (n,) 'R' / 'L'.
    labels: head -> (n,) grades, heads.MASKED (-1) where ungraded; the
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
  heads = heads_lib.check_heads(labels, probs)
  check_head_names(heads)
  columns = {'knee_id': np.asarray(knee_ids, str),
             'side': np.asarray(sides, str)}
  if subject_ids is not None:
    columns['subject_id'] = np.asarray(subject_ids, str)
  for head in heads:
    p = np.asarray(probs[head], np.float64)
    y = np.asarray(labels[head])
    heads_lib.graded_rows(y, p)  # checks shapes and grade range
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
  graded = heads_lib.graded_rows(y, probs)
  return metrics_lib.classification_metrics(y[graded], probs[graded],
                                            positive_from=positive_from)
