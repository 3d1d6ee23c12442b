"""Tests for koajax.evaluation.report (and the figures of .plots)."""

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpl_image
from sklearn import metrics as sk_metrics

from koajax.evaluation import report

NUM_KNEES = 400


def _run(n: int = NUM_KNEES, seed: int = 0, max_grade: int = 4):
  rng = np.random.default_rng(seed)
  # Zero-padded ids must survive the CSV as text.
  subjects = np.array([f'{i // 2:07d}' for i in range(n)])
  sides = np.tile(['R', 'L'], n // 2)
  knee_ids = np.array([f'{s}_v00_{d}' for s, d in zip(subjects, sides)])
  y = rng.integers(0, max_grade + 1, n)
  logits = rng.normal(size=(n, 5))
  logits[np.arange(n), y] += 1.5
  probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(
      np.float32)  # as a JAX model would return them
  return dict(knee_ids=knee_ids, sides=sides, y_true=y, probs=probs,
              subject_ids=subjects)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp('report')
  run = _run()
  result = report.write_report(out, n_resamples=200, seed=0, **run)
  return out, run, result


def test_files_are_written(written):
  out, _, result = written
  for name in (report.PREDICTIONS_CSV, report.METRICS_JSON,
               report.CONFUSION_PNG, report.ROC_PNG, report.PR_PNG):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / report.METRICS_JSON).read_text()) == result


@pytest.mark.parametrize('name', [report.CONFUSION_PNG, report.ROC_PNG,
                                  report.PR_PNG])
def test_pngs_are_real_images(written, name):
  out, _, _ = written
  assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  pixels = mpl_image.imread(out / name)
  assert min(pixels.shape[:2]) > 200
  assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank page


def test_predictions_csv_round_trips(written):
  out, run, _ = written
  frame, _, _ = report.read_predictions(out / report.PREDICTIONS_CSV)
  assert list(frame.columns) == ['knee_id', 'side', 'subject_id', 'kl', 'p0',
                                 'p1', 'p2', 'p3', 'p4']
  assert frame['knee_id'].iloc[2] == '0000001_v00_R'
  np.testing.assert_array_equal(frame['knee_id'], run['knee_ids'])
  np.testing.assert_array_equal(frame['subject_id'], run['subject_ids'])
  np.testing.assert_array_equal(frame['kl'], run['y_true'])
  # float32 probabilities survive the CSV exactly.
  np.testing.assert_array_equal(
      frame[[f'p{k}' for k in range(5)]].to_numpy(np.float32), run['probs'])


def test_metrics_json_agrees_with_sklearn_on_predictions_csv(written):
  out, _, result = written
  frame = pd.read_csv(out / report.PREDICTIONS_CSV)
  y = frame['kl'].to_numpy()
  probs = frame[[f'p{k}' for k in range(5)]].to_numpy()
  pred = probs.argmax(axis=1)
  score = probs[:, 2:].sum(axis=1)
  want = {
      'balanced_accuracy': sk_metrics.balanced_accuracy_score(y, pred),
      'kappa': sk_metrics.cohen_kappa_score(y, pred, weights='quadratic'),
      'mse': sk_metrics.mean_squared_error(y, pred),
      'accuracy': sk_metrics.accuracy_score(y, pred),
      'roc_auc': sk_metrics.roc_auc_score(y >= 2, score),
      'average_precision': sk_metrics.average_precision_score(y >= 2, score),
  }
  for name, value in want.items():
    assert result['metrics'][name]['estimate'] == pytest.approx(value), name
  assert result['confusion_matrix'] == sk_metrics.confusion_matrix(
      y, pred, labels=range(5)).tolist()
  recomputed = report.metrics_from_predictions(out / report.PREDICTIONS_CSV)
  for name, entry in result['metrics'].items():
    assert entry['estimate'] == pytest.approx(recomputed[name]), name


def test_metrics_json_intervals_and_counts(written):
  _, run, result = written
  for name, entry in result['metrics'].items():
    assert entry['ci_low'] <= entry['estimate'] <= entry['ci_high'], name
  assert result['n_knees'] == NUM_KNEES
  assert result['n_subjects'] == NUM_KNEES // 2
  assert result['class_counts'] == np.bincount(run['y_true']).tolist()
  assert sum(map(sum, result['confusion_matrix'])) == NUM_KNEES
  assert result['bootstrap']['n_resamples'] == 200


def test_undefined_metrics_are_null_and_plots_still_written(tmp_path):
  run = _run(n=60, seed=1, max_grade=1)  # no radiographic OA at all
  result = report.write_report(tmp_path, n_resamples=20, **run)
  text = (tmp_path / report.METRICS_JSON).read_text()
  assert 'NaN' not in text
  assert result['metrics']['roc_auc'] == {'estimate': None, 'ci_low': None,
                                          'ci_high': None}
  assert result['metrics']['recall_4']['estimate'] is None
  assert result['confusion_matrix'][4] == [0, 0, 0, 0, 0]
  assert (tmp_path / report.ROC_PNG).stat().st_size > 0
