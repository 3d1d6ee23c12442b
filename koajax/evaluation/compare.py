"""Is run A better than run B? Chunked Wilcoxon test on two predictions files.

  python -m koajax.evaluation.compare --a=RUN_A/predictions.csv \\
      --b=RUN_B/predictions.csv [--subjects=SUBJECTS.csv] \\
      [--head=HEAD] [--metric=balanced_accuracy] [--n_chunks=20] \\
      [--seed=0] [--out=RESULT.json]

--head picks the head of multi-head predictions files (default: the only or
first head). Rows are matched by knee_id; both files must cover the same knees
with the same true grades of that head, and knees the head does not grade
(grade -1) are left out of the test. The subject of each knee (which keeps a
subject's knees in one chunk) comes from, in order: --subjects (a CSV with
knee_id and subject_id columns), a subject_id column of file A, or the knee id
itself ('<subject>_v<visit:02d>_<side>', see `koajax.data.schema.knee_id`).
The result is printed as JSON and, with --out, written there.

A file that is not a koajax predictions CSV (which columns are missing), or
whose probabilities hold NaN or infinite values (how many rows), is named on
one line, exit status 2 (`koajax.cli`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from koajax import cli
from koajax.data import atomic
from koajax.data import manifest as manifest_lib
from koajax.evaluation import heads as heads_lib
from koajax.evaluation import metrics as metrics_lib
from koajax.evaluation import predictions as predictions_lib
from koajax.evaluation import report as report_lib
from koajax.evaluation import significance

PROGRAM = 'koajax.evaluation.compare'
_LAYOUT = ('knee_id, side, [subject_id,] then <head>, p0..p<C-1> (one head) '
           'or <head>, <head>_p0.. per head')
# Inverse of koajax.data.schema.knee_id.
_KNEE_ID = re.compile(r'^(?P<subject>.+)_v(?P<visit>\d+)_(?P<side>[RL])$')


def subject_from_knee_id(knee_id: str) -> str:
  """'9001234_v12_R' -> '9001234'."""
  match = _KNEE_ID.match(knee_id)
  if match is None:
    raise cli.BadInput(f'knee id {knee_id!r} is not <subject>_v<visit>_<side>'
                       '; pass --subjects')
  return match['subject']


def _subjects(frame_a: pd.DataFrame,
              subjects_csv: str | Path | None) -> np.ndarray:
  """Subject of every row of file A (see the module docstring)."""
  knee_ids = frame_a['knee_id']
  if subjects_csv is not None:
    table = manifest_lib.read_csv(subjects_csv, 'subjects',
                                  ('knee_id', 'subject_id'),
                                  error=cli.BadInput, dtype=str)
    lookup = dict(zip(table['knee_id'], table['subject_id']))
    missing = sorted(set(knee_ids) - set(lookup))
    if missing:
      raise cli.BadInput(f'{subjects_csv} lacks {len(missing)} knees, e.g. '
                         f'{missing[:3]}')
    return knee_ids.map(lookup).to_numpy(str)
  if 'subject_id' in frame_a.columns:
    return frame_a['subject_id'].to_numpy(str)
  return np.array([subject_from_knee_id(k) for k in knee_ids])


def read_checked(path: str | Path, head: str | None = None
                 ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
  """`predictions.read_predictions`, or `cli.BadInput` naming the file and
  what is wrong: not comma-separated UTF-8 text, missing columns, grades
  that are not whole numbers, non-finite probabilities."""
  header = manifest_lib.read_csv(path, 'predictions', error=cli.BadInput,
                                 dtype=str, nrows=0).columns
  missing = [] if 'knee_id' in header else ['knee_id']
  probs = [c for c in header if re.fullmatch(r'(.+_)?p\d+', c)]
  if not probs:
    missing.append('p0..p<C-1> (class probabilities)')
  if not [c for c in header if c not in probs and c not in
          ('knee_id', 'side', 'subject_id')]:
    missing.append('a true-grade column such as kl')
  if missing:
    raise cli.BadInput(
        f'{path} is not a koajax predictions CSV: it lacks '
        f'{", ".join(missing)}; koajax writes {_LAYOUT}')
  try:
    frame, y, p = predictions_lib.read_predictions(path, head)
  except (ValueError, TypeError) as e:
    text = ' '.join(str(e).split())
    if not text.startswith(str(path)):
      text = f'{path} is not a readable koajax predictions CSV ({text})'
    raise cli.BadInput(text) from None
  bad = ~np.isfinite(p).all(axis=1)
  if bad.any():
    first = int(np.flatnonzero(bad)[0])
    raise cli.BadInput(
        f'{path}: {int(bad.sum())} of {len(bad)} rows hold NaN or infinite '
        f'probabilities (first: line {first + 2}, knee '
        f'{frame["knee_id"].iloc[first]}); evaluate the run again')
  return frame, y, p


def _aligned(path_a, path_b, head: str | None = None):
  """(frame_a, y, probs_a, probs_b) with B's rows reordered to match A's."""
  frame_a, y_a, probs_a = read_checked(path_a, head)
  frame_b, y_b, probs_b = read_checked(path_b, head)
  for path, frame in ((path_a, frame_a), (path_b, frame_b)):
    if frame['knee_id'].duplicated().any():
      raise cli.BadInput(f'{path}: knee_id values repeat')
  if set(frame_a['knee_id']) != set(frame_b['knee_id']):
    only_a = set(frame_a['knee_id']) - set(frame_b['knee_id'])
    only_b = set(frame_b['knee_id']) - set(frame_a['knee_id'])
    raise cli.BadInput(f'the runs cover different knees: {len(only_a)} only '
                       f'in A ({path_a}), {len(only_b)} only in B ({path_b})')
  order = pd.Index(frame_b['knee_id']).get_indexer(frame_a['knee_id'])
  if not np.array_equal(y_a, y_b[order]):
    raise cli.BadInput(f'{path_a} and {path_b} disagree on true grades of the '
                       'same knees')
  if probs_a.shape[1] != probs_b.shape[1]:
    raise cli.BadInput(f'{path_a} and {path_b} predict different numbers of '
                       'classes')
  return frame_a, y_a, probs_a, probs_b[order]


def compare_predictions(path_a: str | Path, path_b: str | Path, *,
                        subjects_csv: str | Path | None = None,
                        head: str | None = None,
                        metric: str = 'balanced_accuracy', n_chunks: int = 20,
                        seed: int = 0,
                        positive_from: int = metrics_lib.KL_OA_FROM) -> dict:
  """Chunked one-sided Wilcoxon test "A better than B" as a JSON-ready dict.

  `head` selects the head of multi-head files (None: the only or first one);
  only the knees that head grades are compared.
  """
  frame_a, y, probs_a, probs_b = _aligned(path_a, path_b, head)
  subject_ids = _subjects(frame_a, subjects_csv)
  graded = heads_lib.graded_rows(y, probs_a)
  y, probs_a, probs_b = y[graded], probs_a[graded], probs_b[graded]
  subject_ids = subject_ids[graded]
  subjects = int(np.unique(subject_ids).size)
  if subjects < n_chunks:
    raise cli.BadInput(f'{path_a} and {path_b} hold {subjects} subjects, too '
                       f'few for {n_chunks} subject-disjoint chunks; pass '
                       f'--n_chunks={subjects} or fewer')
  result = significance.chunked_wilcoxon(
      y, probs_a, probs_b, subject_ids, metric=metric, n_chunks=n_chunks,
      seed=seed, positive_from=(positive_from if metric in
                                metrics_lib.RANKING_METRICS else None))
  return {'a': str(path_a), 'b': str(path_b), 'n_knees': int(y.size),
          'n_subjects': int(np.unique(subject_ids).size), 'seed': seed,
          **result.to_dict()}


def main(argv=None) -> dict:
  """The command: prints (and with --out writes) the result, returns it."""
  parser = argparse.ArgumentParser(
      prog=f'python -m {PROGRAM}', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--a', required=True, help="run A's predictions.csv")
  parser.add_argument('--b', required=True, help="run B's predictions.csv")
  parser.add_argument('--subjects', help='CSV with knee_id, subject_id')
  parser.add_argument('--head', help='head of multi-head predictions files '
                      '(default: the only or first head)')
  parser.add_argument('--metric', default='balanced_accuracy')
  parser.add_argument('--n_chunks', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--positive_from', type=int,
                      default=metrics_lib.KL_OA_FROM,
                      help='binary threshold for roc_auc / average_precision')
  parser.add_argument('--out', help='also write the JSON result here')
  args = parser.parse_args(argv)
  result = compare_predictions(
      args.a, args.b, subjects_csv=args.subjects, head=args.head,
      metric=args.metric, n_chunks=args.n_chunks, seed=args.seed,
      positive_from=args.positive_from)
  text = json.dumps(report_lib.json_ready(result), indent=2, allow_nan=False)
  print(text)
  if args.out:
    atomic.write_text(args.out, text + '\n')
  return result


if __name__ == '__main__':
  cli.run(PROGRAM, main)
