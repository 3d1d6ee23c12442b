"""Tests for koajax.evaluation.metrics and .bootstrap against NumPy by hand
and scikit-learn."""

import time

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk_metrics

from koajax.evaluation import bootstrap
from koajax.evaluation import heads as heads_lib
from koajax.evaluation import metrics
import sklearn_reference


def _predictions(n: int, num_classes: int = 5, *, seed: int = 0,
                 signal: float = 1.5, decimals: int | None = 2):
  """Grades with a KL-like prevalence and probabilities that favour them.

  Rounding the probabilities creates tied scores, which the ranking metrics
  must handle.
  """
  rng = np.random.default_rng(seed)
  prevalence = np.array([0.4, 0.2, 0.2, 0.15, 0.05][:num_classes])
  y = rng.choice(num_classes, n, p=prevalence / prevalence.sum())
  logits = rng.normal(size=(n, num_classes))
  logits[np.arange(n), y] += signal
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  if decimals is not None:
    probs = np.round(probs, decimals)
  return y, probs


def _confusion_by_hand(y, pred, num_classes):
  confusion = np.zeros((num_classes, num_classes), int)
  for t, p in zip(y, pred):
    confusion[t, p] += 1
  return confusion


def _recall_by_hand(y, pred, num_classes):
  return np.array([np.mean(pred[y == k] == k) if np.any(y == k) else np.nan
                   for k in range(num_classes)])


def _quadratic_kappa_by_hand(y, pred, num_classes):
  """Textbook weighted kappa: 1 - sum(W * O) / sum(W * E), normalised."""
  i, j = np.meshgrid(np.arange(num_classes), np.arange(num_classes),
                     indexing='ij')
  weights = (i - j) ** 2 / (num_classes - 1) ** 2
  observed = _confusion_by_hand(y, pred, num_classes) / len(y)
  expected = np.outer(np.bincount(y, minlength=num_classes),
                      np.bincount(pred, minlength=num_classes)) / len(y) ** 2
  return 1 - (weights * observed).sum() / (weights * expected).sum()


def _auc_by_ranks(positive, score):
  """Mann-Whitney U of the positives over n_pos * n_neg (midranks for ties)."""
  ranks = stats.rankdata(score)
  n_pos, n_neg = positive.sum(), (~positive).sum()
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
  return u / (n_pos * n_neg)


def _ap_by_hand(positive, score):
  """Sum over thresholds (high to low) of precision x recall gained."""
  ap, recall_before = 0.0, 0.0
  for threshold in np.unique(score)[::-1]:
    called = score >= threshold
    true_pos = np.sum(called & positive)
    recall = true_pos / positive.sum()
    ap += (recall - recall_before) * true_pos / called.sum()
    recall_before = recall
  return ap


def test_kl_metrics_match_numpy_by_hand():
  y, probs = _predictions(600)
  pred = probs.argmax(axis=1)
  got = metrics.kl_metrics(y, probs)
  recall = _recall_by_hand(y, pred, 5)
  np.testing.assert_allclose([got[f'recall_{k}'] for k in range(5)], recall)
  assert got['balanced_accuracy'] == pytest.approx(recall.mean())
  assert got['kappa'] == pytest.approx(_quadratic_kappa_by_hand(y, pred, 5))
  assert got['mse'] == pytest.approx(np.mean((pred - y) ** 2))
  assert got['rmse'] == pytest.approx(np.sqrt(np.mean((pred - y) ** 2)))
  assert got['accuracy'] == pytest.approx(np.mean(pred == y))
  np.testing.assert_array_equal(got['confusion_matrix'],
                                _confusion_by_hand(y, pred, 5))
  positive, score = y >= 2, probs[:, 2:].sum(axis=1)
  assert len(np.unique(score)) < len(score)  # ties are exercised
  assert got['roc_auc'] == pytest.approx(_auc_by_ranks(positive, score))
  assert got['average_precision'] == pytest.approx(_ap_by_hand(positive, score))


def test_absent_class_keeps_five_labels_and_averages_present_classes():
  y, probs = _predictions(300)
  keep = y < 4
  y, probs = y[keep], probs[keep]
  probs[:, 4] = 0.0  # and never predicted
  pred = probs.argmax(axis=1)
  got = metrics.kl_metrics(y, probs)
  assert got['confusion_matrix'].shape == (5, 5)
  assert got['confusion_matrix'][4].sum() == 0
  assert np.isnan(got['recall_4'])
  recall = _recall_by_hand(y, pred, 5)
  assert got['balanced_accuracy'] == pytest.approx(np.mean(recall[:4]))
  assert got['kappa'] == pytest.approx(_quadratic_kappa_by_hand(y, pred, 5))


def test_one_binary_class_gives_nan_ranking_metrics():
  y, probs = _predictions(200)
  healthy = y < 2
  got = metrics.kl_metrics(y[healthy], probs[healthy])
  assert np.isnan(got['roc_auc']) and np.isnan(got['average_precision'])
  assert np.isfinite(got['balanced_accuracy'])
  counts = np.ones((2, healthy.sum()))
  resampled = metrics.kl_metrics.resampled(y[healthy], probs[healthy], counts)
  assert np.all(np.isnan(resampled['roc_auc']))


@pytest.mark.parametrize('num_classes,positive_from', [(2, 1), (4, 1), (5, 3)])
def test_other_heads(num_classes, positive_from):
  y, probs = _predictions(400, num_classes, seed=num_classes)
  pred = probs.argmax(axis=1)
  got = metrics.classification_metrics(y, probs, positive_from=positive_from)
  assert got['confusion_matrix'].shape == (num_classes, num_classes)
  # For two classes recall_1 is sensitivity and recall_0 specificity.
  assert got['recall_1'] == pytest.approx(np.mean(pred[y == 1] == 1))
  assert got['kappa'] == pytest.approx(
      _quadratic_kappa_by_hand(y, pred, num_classes))
  positive = y >= positive_from
  score = probs[:, positive_from:].sum(axis=1)
  assert got['roc_auc'] == pytest.approx(_auc_by_ranks(positive, score))


def test_bad_inputs_are_rejected():
  y, probs = _predictions(50)
  with pytest.raises(ValueError):
    metrics.kl_metrics(y, probs[:, :4])
  with pytest.raises(ValueError):
    metrics.classification_metrics(y + 5, probs)
  with pytest.raises(ValueError):
    metrics.classification_metrics(y, probs, positive_from=5)
  with pytest.raises(ValueError):
    metrics.classification_metrics(y[:-1], probs)


def test_resampled_metrics_equal_sklearn_on_the_repeated_samples():
  y, probs = _predictions(300, seed=3)
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 3, size=(4, y.size))
  got = metrics.kl_metrics.resampled(y, probs, counts)
  for row, weights in enumerate(counts):
    repeat = np.repeat(np.arange(y.size), weights)
    want = metrics.kl_metrics(y[repeat], probs[repeat])
    for name, values in got.items():
      np.testing.assert_allclose(values[row], want[name], rtol=1e-12,
                                 atol=1e-12, err_msg=name)


def _sklearn_f1_weighted(y, pred, sample_weight=None):
  """scikit-learn's weighted F1 with its default labels (y_true | y_pred)."""
  return sk_metrics.f1_score(y, pred, average='weighted',
                             sample_weight=sample_weight)


@pytest.mark.parametrize('num_classes,seed', [(5, 0), (4, 1), (2, 2), (3, 3)])
def test_f1_weighted_equals_sklearn(num_classes, seed):
  y, probs = _predictions(250, num_classes, seed=seed, signal=0.8)
  pred = probs.argmax(axis=1)
  want = _sklearn_f1_weighted(y, pred)
  got = metrics.classification_metrics(y, probs)['f1_weighted']
  assert got == pytest.approx(want, rel=1e-12)
  vectorised = metrics.resampled_metrics(y, probs, np.ones((1, y.size)))
  assert vectorised['f1_weighted'][0] == pytest.approx(want, rel=1e-12)


def test_binary_f1_is_the_positive_class_f1_of_sklearn():
  y, probs = _predictions(250, 2, seed=4, signal=0.8)
  pred = probs.argmax(axis=1)
  got = metrics.classification_metrics(y, probs, positive_from=1)
  assert got['f1'] == pytest.approx(sk_metrics.f1_score(y, pred), rel=1e-12)
  counts = np.random.default_rng(5).integers(0, 3, size=(4, y.size))
  resampled = metrics.resampled_metrics(y, probs, counts, positive_from=1)
  for row, weights in enumerate(counts):
    repeat = np.repeat(np.arange(y.size), weights)
    assert resampled['f1'][row] == pytest.approx(
        sk_metrics.f1_score(y[repeat], pred[repeat]), rel=1e-12)
  assert 'f1' not in metrics.classification_metrics(*_predictions(50, 3))


# With sample_weight, scikit-learn still lists a grade whose samples all have
# weight 0 and warns that its F1 is 0/0; its weight (support) is 0 as well.
@pytest.mark.filterwarnings(
    'ignore:F-score is ill-defined:sklearn.exceptions.UndefinedMetricWarning')
def test_resampled_f1_weighted_equals_sklearn_with_absent_classes():
  y, probs = _predictions(300, seed=8, signal=0.8)
  pred = probs.argmax(axis=1)
  rng = np.random.default_rng(3)
  counts = rng.integers(0, 3, size=(5, y.size)).astype(float)
  counts[1, y == 4] = 0  # grade 4 absent from y_true (it may be predicted)
  counts[2, pred == 3] = 0  # grade 3 never predicted (it still occurs)
  counts[3, (y == 0) | (pred == 0)] = 0  # grade 0 absent from both
  counts[4] = rng.random(y.size)  # non-integer weights too
  assert np.any(counts[1, pred == 4] > 0) and np.any(counts[2, y == 3] > 0)
  got = metrics.resampled_metrics(y, probs, counts)['f1_weighted']
  for row, weights in enumerate(counts):
    assert got[row] == pytest.approx(
        _sklearn_f1_weighted(y, pred, sample_weight=weights), rel=1e-12), row
    if row < 4:  # integer counts: the repeated samples, as a bootstrap draws
      repeat = np.repeat(np.arange(y.size), weights.astype(int))
      assert got[row] == pytest.approx(
          _sklearn_f1_weighted(y[repeat], pred[repeat]), rel=1e-12), row
      # Also the scikit-learn path, which passes the present labels itself.
      assert got[row] == pytest.approx(metrics.classification_metrics(
          y[repeat], probs[repeat])['f1_weighted'], rel=1e-12), row


def test_f1_weighted_never_predicted_grade_counts_as_zero():
  # Grade 2 occurs but is never predicted: its F1 is 0 with weight 1/4, and
  # sklearn must not fall back on zero_division for it.
  y = np.array([0, 0, 1, 2])
  probs = np.eye(3)[[0, 0, 1, 1]]
  got = metrics.classification_metrics(y, probs)['f1_weighted']
  assert got == pytest.approx(0.5 * 1.0 + 0.25 * (2 / 3) + 0.25 * 0.0)
  assert got == pytest.approx(_sklearn_f1_weighted(y, probs.argmax(axis=1)))


def test_bootstrap_f1_weighted_point_value_is_sklearns():
  y, probs = _predictions(400, seed=9, signal=0.8)
  ci = bootstrap.stratified_ci(metrics.kl_metrics, y, probs, n_resamples=100,
                               seed=0)['f1_weighted']
  assert ci.estimate == pytest.approx(
      _sklearn_f1_weighted(y, probs.argmax(axis=1)), rel=1e-12)
  assert ci.low < ci.estimate < ci.high


# Bootstrap.


def test_resample_indices_preserve_strata():
  y, _ = _predictions(500)
  indices = bootstrap.stratified_resample_indices(y, n_resamples=50, seed=0)
  assert indices.shape == (50, y.size)
  # Every column stays in one class, so each resample has the original sizes.
  np.testing.assert_array_equal(y[indices], np.broadcast_to(np.sort(y),
                                                            indices.shape))
  # Sampling is with replacement: duplicates occur, rows differ.
  assert all(len(np.unique(row)) < y.size for row in indices)
  assert not np.array_equal(indices[0], indices[1])


def test_resample_indices_are_deterministic_by_seed():
  y, _ = _predictions(200)
  draw = lambda seed: bootstrap.stratified_resample_indices(
      y, n_resamples=20, seed=seed)
  np.testing.assert_array_equal(draw(5), draw(5))
  assert not np.array_equal(draw(5), draw(6))


def test_indices_to_counts():
  counts = bootstrap.indices_to_counts(np.array([[0, 0, 2], [1, 2, 2]]), 4)
  np.testing.assert_array_equal(counts, [[2, 0, 1, 0], [0, 1, 2, 0]])


def test_ci_contains_estimate_and_is_deterministic():
  y, probs = _predictions(800)
  first = bootstrap.stratified_ci(metrics.kl_metrics, y, probs,
                                  n_resamples=300, seed=1)
  again = bootstrap.stratified_ci(metrics.kl_metrics, y, probs,
                                  n_resamples=300, seed=1)
  other = bootstrap.stratified_ci(metrics.kl_metrics, y, probs,
                                  n_resamples=300, seed=2)
  assert first == again
  assert first != other
  point = metrics.kl_metrics(y, probs)
  for name in ('balanced_accuracy', 'kappa', 'mse', 'roc_auc',
               'average_precision'):
    ci = first[name]
    assert ci.estimate == point[name]
    assert ci.low < ci.estimate < ci.high, name


def test_ci_narrows_with_more_data():
  widths = []
  for n in (300, 3000):
    y, probs = _predictions(n, seed=n)
    ci = bootstrap.stratified_ci(metrics.kl_metrics, y, probs,
                                 n_resamples=300, seed=0)
    widths.append(ci['balanced_accuracy'].high - ci['balanced_accuracy'].low)
  # Width shrinks like 1 / sqrt(n): about 3.2x here.
  assert widths[1] < 0.5 * widths[0]


def test_vectorised_path_equals_one_call_per_resample():
  y, probs = _predictions(150, seed=4)
  fast = bootstrap.stratified_ci(metrics.kl_metrics, y, probs, n_resamples=25,
                                 seed=3)
  # A plain function has no `resampled`, so it is called once per resample.
  slow = bootstrap.stratified_ci(lambda t, p: metrics.kl_metrics(t, p), y,
                                 probs, n_resamples=25, seed=3)
  assert fast.keys() == slow.keys()
  for name in fast:
    np.testing.assert_allclose(fast[name], slow[name], rtol=1e-12,
                               err_msg=name)


def test_ci_ignores_nan_resamples():
  y, probs = _predictions(100, seed=5)
  rare = np.flatnonzero(y == 0)[0]  # missing from about 1/e of the resamples

  def mean_p0_if_rare_drawn(t, p):
    drawn = np.any(np.all(p == probs[rare], axis=1))
    return {'m': p[:, 0].mean() if drawn else np.nan, 'never': np.nan}

  ci = bootstrap.stratified_ci(mean_p0_if_rare_drawn, y, probs,
                               n_resamples=200, seed=0)
  assert np.isfinite(ci['m'].low) and ci['m'].low < ci['m'].high
  assert np.isnan(ci['never'].low) and np.isnan(ci['never'].high)


def test_bootstrap_is_fast():
  y, probs = _predictions(2000, decimals=None)
  start = time.perf_counter()
  bootstrap.stratified_ci(metrics.kl_metrics, y, probs, n_resamples=1000)
  # About 0.3 s on 2 cores; a per-resample scikit-learn loop takes minutes.
  assert time.perf_counter() - start < 10.0


# Log loss.


def test_log_loss_equals_sklearn():
  y, probs = _predictions(500, decimals=None, seed=6)
  want = sk_metrics.log_loss(y, probs, labels=range(5))
  assert metrics.kl_metrics(y, probs)['log_loss'] == pytest.approx(want,
                                                                   rel=1e-12)
  assert 'log_loss' in metrics.LOWER_IS_BETTER


def test_log_loss_clips_like_sklearn():
  y = np.array([0, 1, 2, 1])
  # A true class with probability 0 (and one with 1) hits the clipping.
  probs = np.array([[0.0, 1.0, 0.0], [0.2, 0.8, 0.0], [0.1, 0.1, 0.8],
                    [0.0, 1.0, 0.0]])
  got = metrics.classification_metrics(y, probs)['log_loss']
  want = sk_metrics.log_loss(y, probs, labels=range(3))
  assert np.isfinite(got)
  assert got == pytest.approx(want, rel=1e-12)


def test_resampled_log_loss_equals_sklearn_with_sample_weight():
  y, probs = _predictions(300, 4, decimals=None, seed=7)
  rng = np.random.default_rng(2)
  counts = rng.integers(0, 4, size=(5, y.size)).astype(float)
  counts[1] = rng.random(y.size)  # non-integer weights too
  got = metrics.resampled_metrics(y, probs, counts)['log_loss']
  for row, weights in enumerate(counts):
    want = sk_metrics.log_loss(y, probs, labels=range(4),
                               sample_weight=weights)
    assert got[row] == pytest.approx(want, rel=1e-12)


def test_metric_names_match_the_computed_metrics():
  y, probs = _predictions(100, 4)
  for positive_from in (None, 2):
    point = metrics.classification_metrics(y, probs,
                                           positive_from=positive_from)
    resampled = metrics.resampled_metrics(y, probs, np.ones((1, y.size)),
                                          positive_from=positive_from)
    names = metrics.metric_names(4, positive_from)
    assert list(resampled) == list(names)
    assert [n for n in point if n != 'confusion_matrix'] == list(names)


# Several heads.


def _heads(n=400, seed=0):
  """KL and two OARSI grades, these with ungraded knees."""
  kl_y, kl_p = _predictions(n, 5, seed=seed, decimals=None)
  ost_y, ost_p = _predictions(n, 4, seed=seed + 1, decimals=None)
  jsn_y, jsn_p = _predictions(n, 4, seed=seed + 2, decimals=None)
  ost_y[::7] = heads_lib.MASKED
  jsn_y[1::5] = heads_lib.MASKED
  labels = {'kl': kl_y, 'ost_tl': ost_y, 'jsn_m': jsn_y}
  probs = {'kl': kl_p, 'ost_tl': ost_p, 'jsn_m': jsn_p}
  return labels, probs


def test_head_scores_names_and_values_equal_sklearn():
  labels, probs = _heads()
  positive_from = {'kl': 2, 'ost_tl': 1}
  got = heads_lib.head_scores(labels, probs, positive_from=positive_from,
                              mean_heads=['ost_tl', 'jsn_m'])
  want = {}
  for head in labels:
    graded = labels[head] >= 0
    want[head] = sklearn_reference.sklearn_head(labels[head][graded], probs[head][graded],
                               positive_from.get(head))
    for name, value in want[head].items():
      assert got[f'{head}/{name}'] == pytest.approx(value, rel=1e-9), (head,
                                                                       name)
    assert f'{head}/recall_3' in got
  # The first head also under the bare names.
  for name, value in want['kl'].items():
    assert got[name] == pytest.approx(value, rel=1e-9), name
  assert 'recall_4' in got and 'ost_tl/recall_4' not in got
  # The mean covers the metrics both mean heads have, and nothing else.
  assert got['mean/kappa'] == pytest.approx(
      (want['ost_tl']['kappa'] + want['jsn_m']['kappa']) / 2, rel=1e-9)
  assert 'mean/roc_auc' not in got and 'mean/recall_4' not in got
  assert got['loss'] == pytest.approx(
      np.mean([want[head]['log_loss'] for head in labels]), rel=1e-9)
  assert all(isinstance(value, float) for value in got.values())


def test_head_scores_without_mean_heads_or_graded_knees():
  labels, probs = _heads(100)
  labels['jsn_m'][:] = heads_lib.MASKED
  got = heads_lib.head_scores(labels, probs, positive_from={'jsn_m': 1})
  assert not any(name.startswith('mean/') for name in got)
  # Undefined is NaN, never 0.
  for name in metrics.metric_names(4, 1):
    assert np.isnan(got[f'jsn_m/{name}']), name
  assert np.isnan(got['loss'])
  assert np.isfinite(got['kl/log_loss'])


def test_head_scores_rejects_bad_heads():
  labels, probs = _heads(50)
  with pytest.raises(ValueError, match='unknown heads'):
    heads_lib.head_scores(labels, probs, positive_from={'oops': 1})
  with pytest.raises(ValueError, match='unknown heads'):
    heads_lib.head_scores(labels, probs, positive_from={},
                          mean_heads=['oops'])
  with pytest.raises(ValueError, match='head name'):
    heads_lib.head_scores({'mean': labels['kl']}, {'mean': probs['kl']},
                          positive_from={})
  bad = dict(labels, kl=labels['kl'] - 2)  # -2 is neither a grade nor masked
  with pytest.raises(ValueError):
    heads_lib.head_scores(bad, probs, positive_from={})


def test_joint_mean_ci_equals_a_loop_over_the_same_resamples():
  labels, probs = _heads(150, seed=3)
  heads = list(labels)
  sets = {'kl': metrics.MetricSet(positive_from=2), 'ost_tl':
          metrics.MetricSet(), 'jsn_m': metrics.MetricSet()}
  n_resamples, seed = 30, 4
  got = bootstrap.joint_mean_ci(
      [(sets[h], labels[h], probs[h]) for h in heads], labels['kl'],
      n_resamples=n_resamples, seed=seed)
  assert 'roc_auc' not in got  # only the kl head has it
  # The same knees for every head in each resample, scored with sklearn.
  indices = bootstrap.stratified_resample_indices(
      labels['kl'], n_resamples=n_resamples, seed=seed)
  for name in ('balanced_accuracy', 'kappa', 'mse', 'log_loss'):
    values = []
    for rows in indices:
      per_head = []
      for head in heads:
        kept = rows[labels[head][rows] >= 0]
        per_head.append(sklearn_reference.sklearn_head(labels[head][kept],
                                      probs[head][kept])[name])
      values.append(np.mean(per_head))
    low, high = np.percentile(values, [2.5, 97.5])
    assert got[name].low == pytest.approx(low, rel=1e-9), name
    assert got[name].high == pytest.approx(high, rel=1e-9), name
    estimate = np.mean([sklearn_reference.sklearn_head(labels[h][labels[h] >= 0],
                                      probs[h][labels[h] >= 0])[name]
                        for h in heads])
    assert got[name].estimate == pytest.approx(estimate, rel=1e-9), name


# Binary tasks pooled over heads.


def _pooled_rows(n_knees=200, seed=0):
  """Two heads' binary rows of the same knees, some knees graded by one."""
  rng = np.random.default_rng(seed)
  positive, score, knees = [], [], []
  for head in range(2):
    graded = np.flatnonzero(rng.random(n_knees) > 0.15 + 0.1 * head)
    truth = rng.random(graded.size) < 0.35
    positive.append(truth)
    # Rounded scores: tied rows within and across heads.
    score.append(np.round(rng.normal(size=graded.size) + truth, 1))
    knees.append(graded)
  return (np.concatenate(positive), np.concatenate(score),
          np.concatenate(knees))


def test_clustered_ranking_ci_equals_sklearn_over_the_same_resamples():
  positive, score, knees = _pooled_rows()
  n_resamples, seed = 40, 5
  got = bootstrap.clustered_ranking_ci(positive, score, knees,
                                       n_resamples=n_resamples, seed=seed)
  assert got['roc_auc'].estimate == pytest.approx(
      sk_metrics.roc_auc_score(positive, score), rel=1e-12)
  assert got['average_precision'].estimate == pytest.approx(
      sk_metrics.average_precision_score(positive, score), rel=1e-12)
  # The documented strata: each knee's number of rows and of positive rows.
  ids = np.unique(knees)
  rows = np.array([np.sum(knees == k) for k in ids])
  positives = np.array([np.sum(positive[knees == k]) for k in ids])
  indices = bootstrap.stratified_resample_indices(
      rows * (positive.size + 1) + positives, n_resamples=n_resamples,
      seed=seed)
  values = {'roc_auc': [], 'average_precision': []}
  for drawn in indices:
    # Every drawn knee brings all its rows, as often as it was drawn.
    take = np.concatenate([np.flatnonzero(knees == ids[k]) for k in drawn])
    assert take.size == positive.size
    assert positive[take].sum() == positive.sum()
    values['roc_auc'].append(sk_metrics.roc_auc_score(positive[take],
                                                      score[take]))
    values['average_precision'].append(sk_metrics.average_precision_score(
        positive[take], score[take]))
  for name, want in values.items():
    low, high = np.percentile(want, [2.5, 97.5])
    assert got[name].low == pytest.approx(low, rel=1e-9), name
    assert got[name].high == pytest.approx(high, rel=1e-9), name
    assert got[name].low < got[name].estimate < got[name].high, name


def test_clustered_ranking_ci_undefined_and_bad_inputs():
  positive, score, knees = _pooled_rows(50, seed=1)
  one_class = bootstrap.clustered_ranking_ci(
      np.zeros_like(positive), score, knees, n_resamples=10)
  assert all(np.isnan(v) for ci in one_class.values() for v in ci)
  empty = bootstrap.clustered_ranking_ci([], [], [], n_resamples=10)
  assert set(empty) == set(metrics.RANKING_METRICS)
  assert all(np.isnan(v) for ci in empty.values() for v in ci)
  with pytest.raises(ValueError, match='one shape'):
    bootstrap.clustered_ranking_ci(positive, score, knees[:-1])
