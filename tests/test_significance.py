"""Tests for koajax.evaluation.significance and the compare CLI."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from koajax.evaluation import compare
from koajax.evaluation import metrics
from koajax.evaluation import predictions
from koajax.evaluation import significance


def _test_set(num_subjects: int = 300, seed: int = 0):
  """Subjects with 1-4 knees (visits x sides) and per-knee KL grades."""
  rng = np.random.default_rng(seed)
  knees_per_subject = rng.integers(1, 5, num_subjects)
  subjects = np.repeat([f'{9000000 + s}' for s in range(num_subjects)],
                       knees_per_subject)
  y = rng.choice(5, subjects.size, p=[0.4, 0.2, 0.2, 0.15, 0.05])
  return subjects, y


def _probs(y, signal: float, seed: int):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(y.size, 5))
  logits[np.arange(y.size), y] += signal
  return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_chunks_are_subject_disjoint_and_balanced():
  subjects, _ = _test_set()
  chunks = significance.subject_chunks(subjects, n_chunks=20, seed=0)
  per_subject = pd.Series(chunks).groupby(subjects).nunique()
  assert (per_subject == 1).all()
  sizes = np.bincount(chunks, minlength=20)
  assert sizes.size == 20 and sizes.min() > 0
  largest_subject = pd.Series(subjects).value_counts().max()
  assert sizes.max() - sizes.min() <= largest_subject
  np.testing.assert_array_equal(
      chunks, significance.subject_chunks(subjects, n_chunks=20, seed=0))
  assert not np.array_equal(
      chunks, significance.subject_chunks(subjects, n_chunks=20, seed=1))


def test_equal_subjects_give_equal_chunks():
  subjects = np.repeat(np.arange(400), 2)  # both knees of 400 subjects
  chunks = significance.subject_chunks(subjects, n_chunks=20)
  np.testing.assert_array_equal(np.bincount(chunks), np.full(20, 40))


def test_too_few_subjects_is_an_error():
  with pytest.raises(ValueError):
    significance.subject_chunks(np.arange(10), n_chunks=20)


def test_wilcoxon_small_p_when_a_is_clearly_better():
  subjects, y = _test_set()
  good, poor = _probs(y, 2.0, seed=1), _probs(y, 0.5, seed=2)
  result = significance.chunked_wilcoxon(y, good, poor, subjects)
  assert result.values_a.shape == (20,)
  want = stats.wilcoxon(result.values_a, result.values_b,
                        alternative='greater')
  assert result.statistic == pytest.approx(want.statistic)
  assert result.p_value == pytest.approx(want.pvalue)
  assert result.p_value < 1e-3
  swapped = significance.chunked_wilcoxon(y, poor, good, subjects)
  assert swapped.p_value > 0.99
  same = significance.chunked_wilcoxon(y, good, good, subjects)
  assert same.p_value == 1.0


def test_chunk_values_are_the_metric_on_each_chunk():
  subjects, y = _test_set(seed=3)
  probs_a, probs_b = _probs(y, 1.0, seed=4), _probs(y, 1.0, seed=5)
  for metric in ('balanced_accuracy', 'kappa', 'roc_auc'):
    result = significance.chunked_wilcoxon(y, probs_a, probs_b, subjects,
                                           metric=metric, positive_from=2)
    for chunk in (0, 7, 19):
      rows = result.chunks == chunk
      want = metrics.kl_metrics(y[rows], probs_b[rows])[metric]
      assert result.values_b[chunk] == pytest.approx(want), metric


def test_lower_is_better_metrics_test_the_other_tail():
  subjects, y = _test_set(seed=6)
  good, poor = _probs(y, 2.0, seed=1), _probs(y, 0.5, seed=2)
  result = significance.chunked_wilcoxon(y, good, poor, subjects, metric='mse')
  assert result.alternative == 'less'
  assert np.mean(result.values_a) < np.mean(result.values_b)
  assert result.p_value < 1e-3


def test_mcnemar_exact_and_chi_square():
  y = np.zeros(60, int)
  pred_a = np.zeros(60, int)
  pred_b = np.zeros(60, int)
  pred_a[:3] = 1   # 3 knees only B gets right
  pred_b[3:15] = 1  # 12 knees only A gets right
  pred_a[15:20] = pred_b[15:20] = 1  # both wrong: not informative
  exact = significance.mcnemar(y, pred_a, pred_b)
  assert (exact.a_only, exact.b_only) == (12, 3)
  # Two-sided exact binomial p-value of 3 successes in 15 at p = 1/2.
  assert exact.p_value == pytest.approx(2 * stats.binom.cdf(3, 15, 0.5))
  chi = significance.mcnemar(y, pred_a, pred_b, exact=False)
  assert chi.statistic == pytest.approx((12 - 3 - 1) ** 2 / 15)
  assert chi.p_value == pytest.approx(stats.chi2.sf((12 - 3 - 1) ** 2 / 15, 1))
  swapped = significance.mcnemar(y, pred_b, pred_a)
  assert swapped.p_value == pytest.approx(exact.p_value)
  tie = significance.mcnemar(y, pred_a, pred_a)
  assert tie.p_value == 1.0


def _write_predictions(path, knee_ids, sides, y, probs, **columns):
  frame = predictions.predictions_frame(knee_ids=knee_ids, sides=sides,
                                        y_true=y, probs=probs, **columns)
  frame.to_csv(path, index=False)


def test_compare_matches_rows_by_knee_id(tmp_path, capsys):
  subjects, y = _test_set(num_subjects=120, seed=7)
  sides = np.tile(['R', 'L'], subjects.size)[:subjects.size]
  visits = np.arange(subjects.size) % 97  # unique knee ids per subject
  knee_ids = np.array([f'{s}_v{v:02d}_{d}'
                       for s, v, d in zip(subjects, visits, sides)])
  good, poor = _probs(y, 2.0, seed=1), _probs(y, 0.5, seed=2)
  _write_predictions(tmp_path / 'a.csv', knee_ids, sides, y, good)
  shuffle = np.random.default_rng(0).permutation(y.size)
  _write_predictions(tmp_path / 'b.csv', knee_ids[shuffle], sides[shuffle],
                     y[shuffle], poor[shuffle])
  out = tmp_path / 'result.json'
  result = compare.main([f'--a={tmp_path / "a.csv"}',
                         f'--b={tmp_path / "b.csv"}', f'--out={out}'])
  want = significance.chunked_wilcoxon(y, good, poor, subjects)
  assert result['p_value'] == pytest.approx(want.p_value)
  np.testing.assert_allclose(result['values_b'], want.values_b)
  assert result['n_subjects'] == 120
  assert json.loads(out.read_text())['p_value'] == result['p_value']
  assert json.loads(capsys.readouterr().out)['p_value'] == result['p_value']


def test_compare_rejects_different_knee_sets(tmp_path):
  subjects, y = _test_set(num_subjects=40, seed=8)
  knee_ids = np.array([f'{s}_v{i:02d}_R' for i, s in enumerate(subjects)])
  sides = np.full(y.size, 'R')
  probs = _probs(y, 1.0, seed=0)
  _write_predictions(tmp_path / 'a.csv', knee_ids, sides, y, probs)
  _write_predictions(tmp_path / 'b.csv', knee_ids[1:], sides[1:], y[1:],
                     probs[1:])
  with pytest.raises(ValueError, match='different knees'):
    compare.compare_predictions(tmp_path / 'a.csv', tmp_path / 'b.csv')


def test_subject_from_knee_id():
  assert compare.subject_from_knee_id('9001234_v12_R') == '9001234'
  assert compare.subject_from_knee_id('MOST_0042_v00_L') == 'MOST_0042'
  with pytest.raises(ValueError):
    compare.subject_from_knee_id('9001234-R')


def test_compare_cli_runs_as_a_module(tmp_path):
  subjects, y = _test_set(num_subjects=60, seed=9)
  knee_ids = np.array([f'k{i}' for i in range(y.size)])  # not parseable
  pd.DataFrame({'knee_id': knee_ids, 'subject_id': subjects}).to_csv(
      tmp_path / 'subjects.csv', index=False)
  sides = np.full(y.size, 'L')
  _write_predictions(tmp_path / 'a.csv', knee_ids, sides, y,
                     _probs(y, 1.0, seed=1))
  _write_predictions(tmp_path / 'b.csv', knee_ids, sides, y,
                     _probs(y, 1.0, seed=2))
  done = subprocess.run(
      [sys.executable, '-m', 'koajax.evaluation.compare',
       f'--a={tmp_path / "a.csv"}', f'--b={tmp_path / "b.csv"}',
       f'--subjects={tmp_path / "subjects.csv"}', '--metric=roc_auc'],
      capture_output=True, text=True, check=True)
  result = json.loads(done.stdout)
  assert result['metric'] == 'roc_auc' and result['n_subjects'] == 60
  assert 0.0 <= result['p_value'] <= 1.0
