"""Stratified bootstrap confidence intervals.

Each resample draws, within every true class, as many samples as the class
has, with replacement, so class sizes (and hence the class balance that
balanced accuracy and kappa depend on) are those of the test set. The interval
is the percentile interval of the resampled metric values, ignoring resamples
where a metric is undefined (NaN). Unlike the papers' reference code the
bounds are not clipped to [0, 1]: the percentiles of these metrics already lie
in their range, and MSE is not bounded by 1.

Metric functions that also have a `resampled(y_true, probs, counts)` method
(`metrics.MetricSet`, e.g. `metrics.kl_metrics`) evaluate blocks of resamples
in one vectorised call; any other `metric_fn(y_true, probs) -> dict` works too,
one call per resample.

`joint_mean_ci` is the interval of a metric averaged over several heads of one
model (KL and the OARSI grades): knees are resampled jointly, so each resample
scores every head on the same knees and the interval reflects how the heads'
errors move together.

`clustered_ranking_ci` is the interval of ROC AUC and average precision of
binary rows pooled over heads (osteophytes of the lateral tibia and femur,
say): a knee contributes a row per head, and resampling knees keeps those
rows together, as they are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from koajax.evaluation import heads as heads_lib
from koajax.evaluation import metrics as metrics_lib

# Resamples per vectorised call are capped so that the (block, n) float64
# weight matrix and its sorted copy stay around 32 MB each.
_BLOCK_ELEMENTS = 1 << 22


class Interval(NamedTuple):
  """A point estimate and its confidence interval."""
  estimate: float
  low: float
  high: float


def stratified_resample_indices(y_true, *, n_resamples: int,
                                seed: int = 0) -> np.ndarray:
  """Sample indices of stratified bootstrap resamples.

  Args:
    y_true: (n,) class labels defining the strata.
    n_resamples: number of resamples R.
    seed: NumPy generator seed; equal seeds give equal resamples.

  Returns:
    (R, n) int32 indices into y_true (int32 halves the memory of large R * n).
    Columns are grouped by stratum in sorted label order, so row r holds
    exactly as many samples of each class as y_true does.
  """
  y = np.asarray(y_true)
  if y.ndim != 1 or y.size == 0:
    raise ValueError(f'y_true must be a non-empty 1-D array; got {y.shape}')
  rng = np.random.default_rng(seed)
  blocks = []
  for label in np.unique(y):
    members = np.flatnonzero(y == label).astype(np.int32)
    draws = rng.integers(0, members.size, size=(n_resamples, members.size))
    blocks.append(members[draws])
  return np.concatenate(blocks, axis=1)


def indices_to_counts(indices: np.ndarray, n: int) -> np.ndarray:
  """(R, m) sample indices -> (R, n) float64 occurrence counts."""
  rows = indices.shape[0]
  flat = (np.arange(rows, dtype=np.int64)[:, None] * n + indices).ravel()
  return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(
      np.float64)


def _scalars(values: Mapping) -> dict[str, float]:
  """The scalar entries of a metric dict (drops e.g. confusion matrices)."""
  return {name: float(v) for name, v in values.items() if np.ndim(v) == 0}


def _resampled_values(metric_fn, y, probs, indices, names) -> dict:
  """Metric name -> (R,) values over the resamples in `indices`."""
  resampled = getattr(metric_fn, 'resampled', None)
  if resampled is not None:
    block = max(1, _BLOCK_ELEMENTS // y.shape[0])
    parts = [resampled(y, probs, indices_to_counts(indices[i:i + block],
                                                   y.shape[0]))
             for i in range(0, indices.shape[0], block)]
    return {name: np.concatenate([part[name] for part in parts])
            for name in names}
  rows = [_scalars(metric_fn(y[idx], probs[idx])) for idx in indices]
  return {name: np.array([row[name] for row in rows]) for name in names}


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
  """(low, high) percentiles of the non-NaN values; NaN if all are NaN."""
  values = np.asarray(values, np.float64)
  if not np.any(np.isfinite(values)):
    return float('nan'), float('nan')
  tail = 100.0 * (1.0 - level) / 2.0
  low, high = np.nanpercentile(values, [tail, 100.0 - tail])
  return float(low), float(high)


def _check_options(n_resamples: int, level: float) -> None:
  """Raises ValueError for a level outside (0, 1) or no resamples."""
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must lie in (0, 1); got {level}')
  if n_resamples < 1:
    raise ValueError(f'n_resamples must be positive; got {n_resamples}')


def stratified_ci(metric_fn: Callable[[np.ndarray, np.ndarray], Mapping],
                  y_true, probs, *, n_resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, Interval]:
  """Point estimates and stratified-bootstrap percentile intervals.

  Args:
    metric_fn: (y_true, probs) -> dict of metrics; its scalar entries get
      intervals, others (confusion matrices) are ignored. Use a
      `metrics.MetricSet` such as `metrics.kl_metrics` for speed.
    y_true: (n,) integer labels; also the bootstrap strata.
    probs: (n, C) class probabilities (or any per-sample array metric_fn takes).
    n_resamples: number of bootstrap resamples.
    seed: seed of the resampling; equal seeds give equal intervals.
    level: confidence level of the two-sided percentile interval.

  Returns:
    Metric name -> Interval(estimate on the full data, low, high).
  """
  _check_options(n_resamples, level)
  y = np.asarray(y_true)
  probs = np.asarray(probs)
  point = _scalars(metric_fn(y, probs))
  indices = stratified_resample_indices(y, n_resamples=n_resamples, seed=seed)
  values = _resampled_values(metric_fn, y, probs, indices, point)
  return {name: Interval(point[name], *percentile_interval(values[name], level))
          for name in point}


def joint_mean_ci(heads: Sequence[tuple[metrics_lib.MetricSet, np.ndarray,
                                        np.ndarray]],
                  strata, *, n_resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, Interval]:
  """Intervals of metrics averaged over heads scored on the same knees.

  Each block of resamples is one (R, n) counts matrix over all knees; every
  head is scored on its graded columns of that same matrix, and the
  per-resample mean over heads gives the interval. A metric undefined (NaN)
  for one head in a resample is undefined for that resample's mean, and the
  percentile interval ignores such resamples.

  Args:
    heads: per head (metric set, labels (n,), probs (n, C_head)), rows
      aligned across heads. Labels of heads.MASKED (-1) mark knees the head
      does not grade: they are resampled with the others but not scored.
    strata: (n,) labels of the strata, e.g. the primary head's labels (masked
      knees then form a stratum of their own). Strata of all heads' grades at
      once would be mostly single knees, which a bootstrap never varies.
    n_resamples: number of bootstrap resamples.
    seed: seed of the resampling.
    level: confidence level of the two-sided percentile interval.

  Returns:
    Metric name -> Interval(mean over heads of their scikit-learn estimates
    on all their graded knees, low, high), for the scalar metrics every head
    has; NaN throughout if a head grades no knee.
  """
  _check_options(n_resamples, level)
  if not heads:
    raise ValueError('no heads to average')
  strata = np.asarray(strata)
  tasks, names = [], None
  for metric_set, y, probs in heads:
    y, probs = np.asarray(y), np.asarray(probs, np.float64)
    if y.shape != strata.shape:
      raise ValueError(f'labels {y.shape} and strata {strata.shape} must '
                       'describe the same knees')
    graded = heads_lib.graded_rows(y, probs)
    tasks.append((metric_set, graded, y[graded], probs[graded]))
    head_names = metrics_lib.metric_names(probs.shape[1],
                                          metric_set.positive_from)
    names = [n for n in (names or head_names) if n in head_names]
  point = [_scalars(metric_set(y, probs)) if y.size else {}
           for metric_set, _, y, probs in tasks]
  estimate = {name: float(np.mean([values.get(name, np.nan)
                                   for values in point]))
              for name in names}
  indices = stratified_resample_indices(strata, n_resamples=n_resamples,
                                        seed=seed)
  n = strata.shape[0]
  block = max(1, _BLOCK_ELEMENTS // n)
  parts = []
  for start in range(0, n_resamples, block):
    counts = indices_to_counts(indices[start:start + block], n)
    total = dict.fromkeys(names, 0.0)
    for metric_set, graded, y, probs in tasks:
      if not y.size:
        total = dict.fromkeys(names, np.nan)
        break
      values = metric_set.resampled(y, probs, counts[:, graded])
      total = {name: total[name] + values[name] for name in names}
    parts.append({name: np.broadcast_to(total[name], counts.shape[:1])
                  for name in names})
  return {name: Interval(estimate[name], *percentile_interval(
      np.concatenate([part[name] for part in parts]) / len(tasks), level))
          for name in names}


def clustered_ranking_ci(positive, score, groups, *, n_resamples: int = 1000,
                         seed: int = 0, level: float = 0.95
                         ) -> dict[str, Interval]:
  """ROC AUC and average precision with intervals from resampling groups.

  Rows are binary predictions, several per group (a knee's rows of the heads
  pooled into one binary task). Each resample draws groups with replacement
  and keeps all rows of a drawn group. Groups are stratified by their number
  of rows and of positive rows, so every resample has as many rows and
  positives as the data, as `stratified_ci` keeps the class sizes.

  Args:
    positive: (m,) bool binary targets of the rows.
    score: (m,) scores of the rows.
    groups: (m,) the group (knee) of each row; any labels np.unique sorts.
    n_resamples: number of bootstrap resamples.
    seed: seed of the resampling.
    level: confidence level of the two-sided percentile interval.

  Returns:
    'roc_auc' and 'average_precision' -> Interval(scikit-learn estimate on all
    rows, low, high); NaN throughout without rows, and NaN estimates when only
    one binary class is present.
  """
  _check_options(n_resamples, level)
  positive = np.asarray(positive, bool)
  score = np.asarray(score, np.float64)
  groups = np.asarray(groups)
  if not positive.shape == score.shape == groups.shape or positive.ndim != 1:
    raise ValueError(f'need positive, score and groups of one shape (m,); got '
                     f'{positive.shape}, {score.shape} and {groups.shape}')
  if not positive.size:
    undefined = Interval(np.nan, np.nan, np.nan)
    return dict.fromkeys(metrics_lib.RANKING_METRICS, undefined)
  point = metrics_lib.ranking_metrics(positive, score)
  _, group_of_row = np.unique(groups, return_inverse=True)
  group_of_row = group_of_row.ravel()
  rows = np.bincount(group_of_row)
  positives = np.bincount(group_of_row, weights=positive).astype(np.int64)
  strata = rows * (positive.size + 1) + positives
  indices = stratified_resample_indices(strata, n_resamples=n_resamples,
                                        seed=seed)
  block = max(1, _BLOCK_ELEMENTS // positive.size)
  parts = []
  for start in range(0, n_resamples, block):
    counts = indices_to_counts(indices[start:start + block], rows.size)
    # A row occurs as often as its group was drawn.
    parts.append(metrics_lib.weighted_ranking_metrics(
        positive, score, counts[:, group_of_row]))
  return {name: Interval(point[name], *percentile_interval(
      np.concatenate([part[name] for part in parts]), level))
          for name in metrics_lib.RANKING_METRICS}
