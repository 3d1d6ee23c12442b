"""Scores of a model with several heads (KL and the six OARSI grades, say).

Each head grades its own subset of the knees: a knee that a head does not
grade (an ungraded compartment, a knee outside a binary task) has label MASKED
(-1) for that head and is left out of that head's metrics.

`head_scores` gives the point metrics of every head in one flat dict, for
validation during training; `report.report_scores` reads the same names back
from a written report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np

from koajax.evaluation import metrics as metrics_lib

# Grades of a head that a knee lacks are stored as this label, which no
# class index can take.
MASKED = -1
# Key prefix of the metrics averaged over heads.
MEAN = 'mean'


def graded_rows(y_true, probs) -> np.ndarray:
  """(n,) bool: the knees a head grades, i.e. whose label is not MASKED.

  Args:
    y_true: (n,) integer grades in 0..C-1, or MASKED (-1) where ungraded.
    probs: (n, C) class probabilities of every knee, graded or not.
  """
  y = np.asarray(y_true)
  p = np.asarray(probs)
  if y.ndim != 1 or p.ndim != 2 or p.shape[0] != y.shape[0]:
    raise ValueError(f'need labels (n,) and probs (n, C); got {y.shape} and '
                     f'{p.shape}')
  if y.size and not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.mod(y, 1) == 0):
      raise ValueError(f'labels must be integer grades, {MASKED} where '
                       'ungraded')
  if y.size and (y.min() < MASKED or y.max() >= p.shape[1]):
    raise ValueError(f'labels must lie in 0..{p.shape[1] - 1} or be {MASKED}; '
                     f'got {y.min()}..{y.max()}')
  return y != MASKED


def check_heads(labels: Mapping[str, object], probs: Mapping[str, object],
                positive_from: Mapping[str, int | None] | None = None,
                mean_heads: Sequence[str] = ()) -> list[str]:
  """The head names (in the order of `labels`) after checking the arguments.

  Head names become keys such as 'ost_tl/kappa', so they may not contain '/'
  nor be MEAN ('mean'), which names the average over heads.
  """
  heads = list(labels)
  if not heads:
    raise ValueError('no heads')
  if set(probs) != set(heads):
    raise ValueError(f'labels and probs name different heads: {heads} vs '
                     f'{list(probs)}')
  for head in heads:
    if not isinstance(head, str) or not head or '/' in head or head == MEAN:
      raise ValueError(f'bad head name {head!r}: need a non-empty string '
                       f"without '/' other than {MEAN!r}")
  unknown = sorted(set(positive_from or ()) - set(heads))
  unknown += sorted(set(mean_heads) - set(heads))
  if unknown:
    raise ValueError(f'unknown heads {unknown}; the heads are {heads}')
  if len(set(mean_heads)) != len(mean_heads):
    raise ValueError(f'mean_heads repeats a head: {list(mean_heads)}')
  return heads


def mean_over_heads(per_head: Mapping[str, Mapping[str, float]],
                    mean_heads: Sequence[str]) -> dict[str, float]:
  """Metric -> mean over `mean_heads` of the metrics all of them have.

  A metric undefined (NaN) for one head is undefined for the mean: averaging
  the remaining heads would silently change what the number describes.
  """
  if not mean_heads:
    return {}
  shared = [name for name in per_head[mean_heads[0]]
            if all(name in per_head[head] for head in mean_heads)]
  return {name: float(np.mean([per_head[head][name] for head in mean_heads]))
          for name in shared}


def flat_scores(per_head: Mapping[str, Mapping[str, float]],
                mean: Mapping[str, float] | None = None) -> dict[str, float]:
  """Per-head point metrics under the names `head_scores` documents.

  Args:
    per_head: head -> metric -> value, the primary head first.
    mean: metric -> value averaged over heads, if any.
  """
  heads = list(per_head)
  out = dict(per_head[heads[0]])
  for head in heads:
    out.update({f'{head}/{name}': value
                for name, value in per_head[head].items()})
  out.update({f'{MEAN}/{name}': value for name, value in (mean or {}).items()})
  losses = [per_head[head].get('log_loss', math.nan) for head in heads]
  out['loss'] = float(np.mean(losses))
  return {name: float(value) for name, value in out.items()}


def head_scores(labels: Mapping[str, np.ndarray],
                probs: Mapping[str, np.ndarray], *,
                positive_from: Mapping[str, int | None],
                mean_heads: Sequence[str] = ()) -> dict[str, float]:
  """Point metrics of every head of a model, without intervals.

  Fast enough to run on the validation set at every evaluation: each head is
  one vectorised `metrics.resampled_metrics` call (equal to scikit-learn)
  rather than a scikit-learn call per metric.

  Args:
    labels: head -> (n_head,) grades, MASKED (-1) where the knee is ungraded
      for that head; the first head is the primary one.
    probs: head -> (n_head, C_head) class probabilities.
    positive_from: head -> binary threshold for roc_auc / average_precision
      (None or absent: no ranking metrics for that head).
    mean_heads: heads whose metrics are also averaged.

  Returns:
    Python floats, NaN where undefined (every metric of a head without a
    graded knee):
      '<head>/<metric>'  every metric of every head on its graded knees
      '<metric>'         the first head's metrics under their bare names
      'mean/<metric>'    the mean over mean_heads of the metrics they all
                         have (only if mean_heads is non-empty)
      'loss'             the mean over all heads of their log_loss
  """
  heads = check_heads(labels, probs, positive_from, mean_heads)
  per_head = {}
  for head in heads:
    y, p = np.asarray(labels[head]), np.asarray(probs[head], np.float64)
    threshold = positive_from.get(head)
    graded = graded_rows(y, p)
    if graded.any():
      values = metrics_lib.resampled_metrics(y[graded], p[graded],
                                             np.ones((1, int(graded.sum()))),
                                             positive_from=threshold)
      per_head[head] = {name: float(v[0]) for name, v in values.items()}
    else:
      per_head[head] = dict.fromkeys(
          metrics_lib.metric_names(p.shape[1], threshold), math.nan)
  return flat_scores(per_head, mean_over_heads(per_head, list(mean_heads)))


def score_names(num_classes: Mapping[str, int],
                positive_from: Mapping[str, int | None],
                mean_heads: Sequence[str] = ()) -> set[str]:
  """Every name `head_scores` returns for heads of these sizes, known
  before any prediction (a config's selection metrics are checked
  against it before training starts)."""
  per_head = {head: dict.fromkeys(metrics_lib.metric_names(
      classes, positive_from.get(head)), 0.0)
              for head, classes in num_classes.items()}
  return set(flat_scores(per_head, mean_over_heads(per_head,
                                                   list(mean_heads))))
