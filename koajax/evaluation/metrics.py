"""Classification metrics for ordinal grades (KL 0-4, OARSI 0-3, KL-0 vs KL-2).

Two ways to compute the same scalar metrics:

  classification_metrics  one data set, with scikit-learn (the reference
                          definitions; these are the numbers reports print)
  resampled_metrics       many reweightings of one data set at once, in
                          vectorised NumPy; row r of `counts` says how often
                          each sample occurs (a bootstrap resample, or a 0/1
                          mask selecting a test chunk). Equal to scikit-learn
                          called with `sample_weight=counts[r]`.

The second exists because scikit-learn's per-call validation dominates on small
inputs (tens of milliseconds per metric on a 2-core machine), which would make
1000 bootstrap resamples take minutes; the tests check both against each other.

`koajax.evaluation.heads` scores models with several heads (KL and the six
OARSI grades, say) with these functions.

Metric names (all scalars; higher is better except those in LOWER_IS_BETTER,
`mse`, `rmse` and `log_loss`):

  balanced_accuracy   mean recall over the classes present in y_true
  kappa               quadratic-weighted Cohen's kappa over labels 0..C-1
  mse                 mean squared error of the predicted grade (argmax)
  rmse                its square root, in grades (coherence learning's
                      Table 2 reports it)
  accuracy            fraction of exact grade matches
  f1_weighted         F1 of every grade, 2 TP / (2 TP + FP + FN), averaged
                      with weights = support (true count) over the grades
                      that occur in y_true or in the predictions, as
                      `sklearn.metrics.f1_score(average='weighted')` does by
                      default; a grade that is only predicted has weight 0
  f1                  2-class heads only: F1 of class 1 (the positive one,
                      e.g. KL-2 against KL-0); NaN with no class-1 knee true
                      or predicted
  log_loss            mean -log p(true grade), probabilities clipped to
                      [eps, 1 - eps] (eps of float64) as in
                      `sklearn.metrics.log_loss(y, probs, labels=range(C))`
  recall_<k>          recall of class k (NaN if class k is absent); for a
                      2-class head recall_1 is sensitivity, recall_0 specificity
  roc_auc, average_precision
                      only with `positive_from=t`: the binary task
                      "grade >= t" scored by p_t + ... + p_{C-1}; NaN when only
                      one of the two binary classes is present
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from sklearn import exceptions as sk_exceptions
from sklearn import metrics as sk_metrics

# Radiographic OA is KL >= 2, scored by p2 + p3 + p4.
KL_OA_FROM = 2
NUM_KL = 5

LOWER_IS_BETTER = frozenset({'mse', 'rmse', 'log_loss'})
RANKING_METRICS = ('roc_auc', 'average_precision')


def _check(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
  """Returns (int64 labels of shape (n,), float64 probabilities (n, C))."""
  y = np.asarray(y_true)
  p = np.asarray(probs, np.float64)
  if y.ndim != 1 or p.ndim != 2 or p.shape[0] != y.shape[0]:
    raise ValueError(f'need y_true (n,) and probs (n, C); got {y.shape} and '
                     f'{p.shape}')
  if y.size == 0:
    raise ValueError('no samples')
  if not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.mod(y, 1) == 0):
      raise ValueError('y_true must hold integer grades')
  y = y.astype(np.int64)
  if y.min() < 0 or y.max() >= p.shape[1]:
    raise ValueError(f'grades must lie in 0..{p.shape[1] - 1}; got '
                     f'{y.min()}..{y.max()}')
  if not np.all(np.isfinite(p)):
    raise ValueError('probs contains NaN or infinity')
  return y, p


def _check_positive_from(positive_from: int | None, num_classes: int) -> None:
  if positive_from is not None and not 0 < positive_from < num_classes:
    raise ValueError(f'positive_from must lie in 1..{num_classes - 1}; got '
                     f'{positive_from}')


def metric_names(num_classes: int,
                 positive_from: int | None = None) -> tuple[str, ...]:
  """Names of the scalar metrics of a head, in the order they are reported."""
  _check_positive_from(positive_from, num_classes)
  names = ('balanced_accuracy', 'kappa', 'mse', 'rmse', 'accuracy',
           'f1_weighted',
           *(('f1',) if num_classes == 2 else ()), 'log_loss',
           *(f'recall_{k}' for k in range(num_classes)))
  return names + (RANKING_METRICS if positive_from is not None else ())


def _true_class_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
  """(n,) -log p(true class), clipped as scikit-learn's log_loss clips.

  Computed here rather than by scikit-learn, which rejects probabilities a
  rounding error above 1 and warns whenever float32 softmax rows do not sum
  to 1 within float64 precision; the tests check that the values agree.
  """
  eps = np.finfo(p.dtype).eps
  return -np.log(np.clip(p[np.arange(y.shape[0]), y], eps, 1.0 - eps))


def binary_target(y_true, probs, positive_from: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(grade >= positive_from, p_positive_from + ... + p_{C-1})."""
  y, p = _check(y_true, probs)
  _check_positive_from(positive_from, p.shape[1])
  return y >= positive_from, p[:, positive_from:].sum(axis=1)


def classification_metrics(y_true, probs, *,
                           positive_from: int | None = None) -> dict:
  """Point metrics of one prediction set, computed with scikit-learn.

  Args:
    y_true: (n,) integer grades in 0..C-1.
    probs: (n, C) class probabilities; the prediction is their argmax.
    positive_from: if set, also ROC AUC and average precision of
      "grade >= positive_from" scored by the summed probabilities of those
      grades (2 for radiographic OA on the KL scale).

  Returns:
    The scalar metrics named in the module docstring (Python floats, NaN where
    undefined) and 'confusion_matrix', a (C, C) int64 array of counts with
    rows = true grade and columns = predicted grade, over labels 0..C-1 even if
    some grade never occurs.
  """
  y, p = _check(y_true, probs)
  _check_positive_from(positive_from, p.shape[1])
  labels = np.arange(p.shape[1])
  pred = p.argmax(axis=1)
  out = {}
  with warnings.catch_warnings():
    # Absent classes are expected (small chunks, rare KL 4); their metrics are
    # documented as NaN / excluded, so the warnings carry no information.
    warnings.simplefilter('ignore', sk_exceptions.UndefinedMetricWarning)
    warnings.filterwarnings('ignore', 'y_pred contains classes not in y_true')
    warnings.filterwarnings('ignore', 'invalid value encountered',
                            RuntimeWarning)
    out['balanced_accuracy'] = sk_metrics.balanced_accuracy_score(y, pred)
    out['kappa'] = sk_metrics.cohen_kappa_score(y, pred, labels=labels,
                                                weights='quadratic')
    out['mse'] = sk_metrics.mean_squared_error(y, pred)
    out['rmse'] = math.sqrt(out['mse'])
    out['accuracy'] = sk_metrics.accuracy_score(y, pred)
    # The labels scikit-learn uses by default, spelled out: a grade absent
    # from both y_true and the predictions would have F1 0/0. Every label
    # passed occurs, so 2 TP + FP + FN > 0 and zero_division never applies;
    # 0.0 is the value of its default ('warn') without the warning.
    out['f1_weighted'] = sk_metrics.f1_score(
        y, pred, labels=np.union1d(y, pred), average='weighted',
        zero_division=0.0)
    if p.shape[1] == 2:
      out['f1'] = sk_metrics.f1_score(y, pred, labels=[0, 1], pos_label=1,
                                      average='binary', zero_division=np.nan)
    out['log_loss'] = _true_class_log_loss(y, p).mean()
    recall = sk_metrics.recall_score(y, pred, labels=labels, average=None,
                                     zero_division=np.nan)
    out.update({f'recall_{k}': r for k, r in zip(labels, recall)})
    if positive_from is not None:
      positive, score = y >= positive_from, p[:, positive_from:].sum(axis=1)
      out.update(ranking_metrics(positive, score))
  out = {name: float(value) for name, value in out.items()}
  out['confusion_matrix'] = sk_metrics.confusion_matrix(
      y, pred, labels=labels).astype(np.int64)
  return out


def ranking_metrics(positive, score) -> dict[str, float]:
  """ROC AUC and average precision of binary targets, with scikit-learn.

  Args:
    positive: (n,) bool binary targets.
    score: (n,) scores, higher meaning more likely positive.

  Returns:
    'roc_auc' and 'average_precision' as Python floats; NaN for both when only
    one of the two classes is present (or there are no samples).
  """
  positive = np.asarray(positive, bool)
  score = np.asarray(score, np.float64)
  if positive.shape != score.shape or positive.ndim != 1:
    raise ValueError(f'need positive (n,) and score (n,); got '
                     f'{positive.shape} and {score.shape}')
  if positive.all() or not positive.any():
    # Undefined, not 0 or 1: scikit-learn's fallbacks differ by version.
    return dict.fromkeys(RANKING_METRICS, math.nan)
  return {'roc_auc': float(sk_metrics.roc_auc_score(positive, score)),
          'average_precision': float(
              sk_metrics.average_precision_score(positive, score))}


def resampled_metrics(y_true, probs, counts, *,
                      positive_from: int | None = None
                      ) -> dict[str, np.ndarray]:
  """The scalar metrics of many reweightings of one prediction set.

  Args:
    y_true: (n,) integer grades in 0..C-1.
    probs: (n, C) class probabilities.
    counts: (R, n) non-negative weights; row r is one reweighting (how often
      each sample occurs in a bootstrap resample, or a 0/1 chunk mask).
    positive_from: as in `classification_metrics`.

  Returns:
    Metric name -> (R,) float64 array, the same names as the scalars of
    `classification_metrics`.
  """
  y, p = _check(y_true, probs)
  num_classes = p.shape[1]
  _check_positive_from(positive_from, num_classes)
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 2 or counts.shape[1] != y.shape[0]:
    raise ValueError(f'counts must be (R, {y.shape[0]}); got {counts.shape}')
  # One-hot of the (true, predicted) cell of each sample: a matrix product
  # then gives all R confusion matrices at once.
  cells = np.zeros((y.shape[0], num_classes * num_classes))
  cells[np.arange(y.shape[0]), y * num_classes + p.argmax(axis=1)] = 1.0
  confusion = (counts @ cells).reshape(-1, num_classes, num_classes)
  out = confusion_metrics(confusion)
  with np.errstate(divide='ignore', invalid='ignore'):
    # A weighted mean, as log_loss with sample_weight; NaN for an empty row.
    out['log_loss'] = (counts @ _true_class_log_loss(y, p)) / counts.sum(1)
  if positive_from is not None:
    positive, score = y >= positive_from, p[:, positive_from:].sum(axis=1)
    out.update(weighted_ranking_metrics(positive, score, counts))
  return {name: out[name] for name in metric_names(num_classes, positive_from)}


def confusion_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Grade metrics from (R, C, C) weighted confusion matrices (rows = true)."""
  confusion = np.asarray(confusion, np.float64)
  num_classes = confusion.shape[-1]
  total = confusion.sum(axis=(1, 2))
  support = confusion.sum(axis=2)
  predicted = confusion.sum(axis=1)
  hits = np.diagonal(confusion, axis1=1, axis2=2)
  grades = np.arange(num_classes)
  squared_error = np.square(grades[:, None] - grades[None, :]).astype(float)
  with np.errstate(divide='ignore', invalid='ignore'):
    recall = hits / support
    present = support > 0
    # Mean over the classes that occur, as balanced_accuracy_score does.
    balanced = np.where(present, recall, 0.0).sum(1) / present.sum(1)
    # Weighted F1 = sum_k support_k * F1_k / total. A grade with support has
    # 2 TP + FP + FN >= support > 0; one without has weight 0 and drops out,
    # so the labels in play are exactly scikit-learn's default ones.
    f1 = 2.0 * hits / (support + predicted)
    f1_weighted = (np.where(present, f1, 0.0) * support).sum(1) / total
    observed_error = (confusion * squared_error).sum(axis=(1, 2))
    chance = support[:, :, None] * predicted[:, None, :] / total[:, None, None]
    chance_error = (chance * squared_error).sum(axis=(1, 2))
    out = {
        'balanced_accuracy': balanced,
        'kappa': 1.0 - observed_error / chance_error,
        'mse': observed_error / total,
        'rmse': np.sqrt(observed_error / total),
        'accuracy': hits.sum(axis=1) / total,
        'f1_weighted': f1_weighted,
    }
    if num_classes == 2:
      out['f1'] = f1[:, 1]  # NaN with no positive knee, true or predicted
  out.update({f'recall_{k}': recall[:, k] for k in grades})
  return out


def weighted_ranking_metrics(positive: np.ndarray, score: np.ndarray,
                             counts: np.ndarray) -> dict[str, np.ndarray]:
  """ROC AUC and average precision for each row of weights `counts` (R, n).

  Samples are sorted by score once and grouped into runs of equal scores
  (thresholds), so every reweighting reuses the same order: per threshold we
  need only the weighted positives and negatives, then cumulative sums.
  """
  positive = np.asarray(positive, bool)
  score = np.asarray(score, np.float64)
  counts = np.asarray(counts, np.float64)
  order = np.argsort(-score, kind='stable')
  ranked = score[order]
  starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
  weights = counts[:, order]
  pos = np.add.reduceat(weights * positive[order], starts, axis=1)
  neg = np.add.reduceat(weights * ~positive[order], starts, axis=1)
  true_pos = np.cumsum(pos, axis=1)
  false_pos = np.cumsum(neg, axis=1)
  num_pos = true_pos[:, -1]
  num_neg = false_pos[:, -1]
  defined = (num_pos > 0) & (num_neg > 0)
  with np.errstate(divide='ignore', invalid='ignore'):
    # Mann-Whitney: a positive beats the negatives scored strictly lower and
    # ties with those of equal score (half credit) - the trapezoidal ROC area.
    below = num_neg[:, None] - false_pos
    auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (num_pos * num_neg)
    # Step-wise AP: precision at each threshold times the recall it adds.
    # Thresholds with no weight add no recall, so their 0/0 precision is moot.
    called = true_pos + false_pos
    precision = np.divide(true_pos, called, out=np.zeros_like(called),
                          where=called > 0)
    ap = (pos * precision).sum(axis=1) / num_pos
  return {'roc_auc': np.where(defined, auc, np.nan),
          'average_precision': np.where(defined, ap, np.nan)}


@dataclasses.dataclass(frozen=True)
class MetricSet:
  """`classification_metrics` with its options fixed; callable like it.

  Calling it gives the scikit-learn point metrics; `resampled` gives the same
  scalars for many reweightings at once, which `bootstrap.stratified_ci` and
  `significance.chunked_wilcoxon` use instead of one call per resample.
  """
  positive_from: int | None = None
  num_classes: int | None = None  # if set, inputs must have this many classes

  def _check_classes(self, probs) -> None:
    if self.num_classes is not None and np.shape(probs)[-1] != self.num_classes:
      raise ValueError(f'need {self.num_classes} probability columns; got '
                       f'{np.shape(probs)}')

  def __call__(self, y_true, probs) -> dict:
    self._check_classes(probs)
    return classification_metrics(y_true, probs,
                                  positive_from=self.positive_from)

  def resampled(self, y_true, probs, counts) -> dict[str, np.ndarray]:
    self._check_classes(probs)
    return resampled_metrics(y_true, probs, counts,
                             positive_from=self.positive_from)


# kl_metrics(y_true, probs) -> dict: the metrics of 5 KL grades, with
# radiographic OA (KL >= 2) as the binary task. An instance rather than a
# function so that the bootstrap finds its vectorised form.
kl_metrics = MetricSet(positive_from=KL_OA_FROM, num_classes=NUM_KL)
