"""Paired significance tests between two models on one test set.

  chunked_wilcoxon  Semixup's protocol: the test set is split into 20
                    subject-disjoint chunks of (nearly) equal size, a metric is
                    computed per chunk for both models, and a one-sided
                    Wilcoxon signed-rank test asks whether model A is better.
  mcnemar           paired correct/incorrect test of two sets of hard
                    predictions (a model against another, or against a reader),
                    as in the confidence-driven paper.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable

import numpy as np
from scipy import stats

from koajax.evaluation import metrics as metrics_lib


def subject_chunks(subject_ids, *, n_chunks: int = 20,
                   seed: int = 0) -> np.ndarray:
  """Assigns every knee to one of `n_chunks` subject-disjoint chunks.

  Subjects are placed largest first (random order among equal sizes) into the
  chunk holding the fewest knees so far. After every placement the largest and
  smallest chunk differ by at most the knee count of one subject, so chunks
  are as equal as whole subjects allow.

  Args:
    subject_ids: (n,) subject of every knee.
    n_chunks: number of chunks; needs at least that many subjects.
    seed: seed of the tie-breaking order.

  Returns:
    (n,) int64 chunk index in 0..n_chunks-1 of every knee.
  """
  subjects, inverse, sizes = np.unique(np.asarray(subject_ids),
                                       return_inverse=True, return_counts=True)
  if subjects.size < n_chunks:
    raise ValueError(f'{subjects.size} subjects cannot fill {n_chunks} '
                     'subject-disjoint chunks')
  rng = np.random.default_rng(seed)
  shuffled = rng.permutation(subjects.size)
  placing_order = shuffled[np.argsort(-sizes[shuffled], kind='stable')]
  loads = [(0, chunk) for chunk in range(n_chunks)]  # a heap of (knees, chunk)
  chunk_of_subject = np.empty(subjects.size, np.int64)
  for subject in placing_order:
    load, chunk = heapq.heappop(loads)
    chunk_of_subject[subject] = chunk
    heapq.heappush(loads, (load + int(sizes[subject]), chunk))
  return chunk_of_subject[inverse.ravel()]


def _chunk_values(metric: str | Callable, y, probs, chunks: np.ndarray,
                  n_chunks: int, positive_from: int | None) -> np.ndarray:
  """(n_chunks,) metric values of one model, one per chunk."""
  if callable(metric):
    return np.array([metric(y[chunks == k], probs[chunks == k])
                     for k in range(n_chunks)], np.float64)
  # A 0/1 membership mask per chunk is a reweighting, so all chunks are one
  # vectorised call.
  masks = (chunks[None, :] == np.arange(n_chunks)[:, None]).astype(np.float64)
  values = metrics_lib.resampled_metrics(y, probs, masks,
                                         positive_from=positive_from)
  if metric not in values:
    raise ValueError(f'unknown metric {metric!r}; known: {sorted(values)}'
                     + ('' if positive_from is not None else
                        ' (roc_auc / average_precision need positive_from)'))
  return values[metric]


@dataclasses.dataclass(frozen=True)
class ChunkedWilcoxonResult:
  """Outcome of `chunked_wilcoxon`.

  `alternative` is scipy's: 'greater' for metrics where higher is better,
  'less' for those where lower is (MSE); either way it tests "A is better".
  """
  metric: str
  values_a: np.ndarray
  values_b: np.ndarray
  statistic: float
  p_value: float
  alternative: str
  chunks: np.ndarray  # chunk index of every knee

  def to_dict(self) -> dict:
    """JSON-ready summary (without the per-knee chunk assignment)."""
    return {
        'metric': self.metric,
        'hypothesis': 'A better than B',
        'alternative': self.alternative,
        'statistic': self.statistic,
        'p_value': self.p_value,
        'n_chunks': int(self.values_a.size),
        'chunk_sizes': np.bincount(self.chunks,
                                   minlength=self.values_a.size).tolist(),
        'values_a': self.values_a.tolist(),
        'values_b': self.values_b.tolist(),
        'mean_a': float(np.nanmean(self.values_a)),
        'mean_b': float(np.nanmean(self.values_b)),
    }


def chunked_wilcoxon(y_true, probs_a, probs_b, subject_ids, *,
                     metric: str | Callable = 'balanced_accuracy',
                     n_chunks: int = 20, seed: int = 0,
                     positive_from: int | None = None,
                     higher_is_better: bool | None = None
                     ) -> ChunkedWilcoxonResult:
  """One-sided Wilcoxon signed-rank test of "model A beats model B".

  Args:
    y_true: (n,) true grades.
    probs_a: (n, C) probabilities of model A, rows aligned with y_true.
    probs_b: (n, C) probabilities of model B.
    subject_ids: (n,) subject of every knee; a subject's knees share a chunk.
    metric: a name from `metrics` (e.g. 'balanced_accuracy', 'kappa', 'mse',
      'roc_auc') or a function (y_true, probs) -> float.
    n_chunks: number of subject-disjoint chunks (20 in Semixup).
    seed: seed of the chunk assignment.
    positive_from: binary threshold for 'roc_auc' / 'average_precision'.
    higher_is_better: direction of the metric; by default True except for
      metric names in `metrics.LOWER_IS_BETTER`.

  Returns:
    The per-chunk values, Wilcoxon statistic and p-value. Pairs where the
    metric is undefined (NaN) for either model are left out. If the two
    models agree on every chunk there is no evidence for A and the p-value
    is 1 (scipy would return NaN).
  """
  y = np.asarray(y_true)
  probs_a, probs_b = np.asarray(probs_a), np.asarray(probs_b)
  if probs_a.shape != probs_b.shape or probs_a.shape[0] != y.shape[0]:
    raise ValueError(f'probs_a {probs_a.shape}, probs_b {probs_b.shape} and '
                     f'y_true {y.shape} must describe the same knees')
  if np.shape(subject_ids) != y.shape:
    raise ValueError('subject_ids must have one entry per knee')
  chunks = subject_chunks(subject_ids, n_chunks=n_chunks, seed=seed)
  values_a, values_b = (
      _chunk_values(metric, y, probs, chunks, n_chunks, positive_from)
      for probs in (probs_a, probs_b))
  if higher_is_better is None:
    higher_is_better = metric not in metrics_lib.LOWER_IS_BETTER
  alternative = 'greater' if higher_is_better else 'less'
  statistic, p_value = wilcoxon_one_sided(values_a, values_b, alternative)
  name = metric if isinstance(metric, str) else getattr(metric, '__name__',
                                                        repr(metric))
  return ChunkedWilcoxonResult(name, values_a, values_b, statistic, p_value,
                               alternative, chunks)


def wilcoxon_one_sided(values_a, values_b,
                       alternative: str = 'greater') -> tuple[float, float]:
  """(statistic, p-value) of scipy's paired Wilcoxon signed-rank test.

  Zero differences are dropped ('wilcox', as in the Semixup evaluation), as
  are pairs with a NaN. All-equal pairs give (0, 1) instead of scipy's NaN.
  """
  a = np.asarray(values_a, np.float64)
  b = np.asarray(values_b, np.float64)
  keep = np.isfinite(a) & np.isfinite(b)
  if not np.any(a[keep] != b[keep]):
    return 0.0, 1.0
  result = stats.wilcoxon(a[keep], b[keep], zero_method='wilcox',
                          alternative=alternative)
  return float(result.statistic), float(result.pvalue)


@dataclasses.dataclass(frozen=True)
class McNemarResult:
  """Outcome of `mcnemar`.

  a_only: samples A got right and B got wrong; b_only: the reverse.
  statistic: min(a_only, b_only) for the exact test, the chi-square value
  otherwise.
  """
  statistic: float
  p_value: float
  a_only: int
  b_only: int
  exact: bool


def mcnemar(y_true, pred_a, pred_b, *, exact: bool = True) -> McNemarResult:
  """Two-sided McNemar test of paired hard predictions.

  Only discordant samples (one right, one wrong) carry information. Under the
  null hypothesis each is equally likely to favour A or B.

  Args:
    y_true: (n,) true labels.
    pred_a: (n,) predictions of A (e.g. a model's argmax).
    pred_b: (n,) predictions of B (another model or a reader).
    exact: True (default): exact binomial test of a_only ~ Bin(a_only +
      b_only, 1/2) (scipy.stats.binomtest), valid at any sample size. False:
      chi-square with 1 degree of freedom and the continuity correction
      (|a_only - b_only| - 1)^2 / (a_only + b_only), the correction skipped
      when a_only == b_only (as R's mcnemar.test does).

  Returns:
    The statistic, p-value and discordant counts. No discordant samples give
    p-value 1.
  """
  y, a, b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
  if not y.shape == a.shape == b.shape or y.ndim != 1:
    raise ValueError(f'need three (n,) arrays; got {y.shape}, {a.shape}, '
                     f'{b.shape}')
  right_a, right_b = a == y, b == y
  a_only = int(np.sum(right_a & ~right_b))
  b_only = int(np.sum(~right_a & right_b))
  discordant = a_only + b_only
  if discordant == 0:
    return McNemarResult(0.0, 1.0, a_only, b_only, exact)
  if exact:
    p_value = stats.binomtest(a_only, discordant, 0.5).pvalue
    return McNemarResult(float(min(a_only, b_only)), float(p_value), a_only,
                         b_only, exact)
  correction = 1.0 if a_only != b_only else 0.0
  statistic = (abs(a_only - b_only) - correction) ** 2 / discordant
  return McNemarResult(float(statistic), float(stats.chi2.sf(statistic, 1)),
                       a_only, b_only, exact)
