"""Tests for koajax.evaluation.report with one head (and the figures of
.plots); several heads are tested in test_report_heads.py."""

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpl_image
from sklearn import metrics as sk_metrics

from koajax.evaluation import plots
from koajax.evaluation import predictions
from koajax.evaluation import report

NUM_KNEES = 400
# float32 softmax rows sum to 1 only to float32 precision, which
# scikit-learn's log_loss notes; its value is unaffected (no renormalising).
_FLOAT32_SUMS = pytest.mark.filterwarnings(
    'ignore:The y_.* values do not sum to one:UserWarning')


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
  return dict(knee_ids=knee_ids, sides=sides, labels={'kl': y},
              probs={'kl': probs}, subject_ids=subjects)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp('report')
  run = _run()
  result = report.write_report(out, n_resamples=200, seed=0,
                               positive_from={'kl': 2}, **run)
  return out, run, result


def test_files_are_written(written):
  out, _, result = written
  for name in (report.PREDICTIONS_CSV, report.METRICS_JSON,
               report.CONFUSION_PNG, report.ROC_PNG, report.PR_PNG):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / report.METRICS_JSON).read_text()) == result
  # Files are renamed into place; no temporary file is left behind.
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [report.PREDICTIONS_CSV, report.METRICS_JSON, report.CONFUSION_PNG,
       report.ROC_PNG, report.PR_PNG])


def test_single_head_layout_is_unchanged(written):
  _, _, result = written
  assert list(result) == ['n_knees', 'n_subjects', 'class_counts',
                          'positive_from', 'bootstrap', 'metrics',
                          'confusion_matrix', 'files']
  assert list(result['metrics']) == [
      'balanced_accuracy', 'kappa', 'mse', 'rmse', 'accuracy', 'f1_weighted',
      'log_loss', *(f'recall_{k}' for k in range(5)), 'roc_auc',
      'average_precision']
  assert result['files'] == {'predictions': report.PREDICTIONS_CSV,
                             'confusion_matrix': report.CONFUSION_PNG,
                             'roc': report.ROC_PNG, 'pr': report.PR_PNG}
  assert result['positive_from'] == 2


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
  frame, _, _ = predictions.read_predictions(out / report.PREDICTIONS_CSV)
  assert list(frame.columns) == ['knee_id', 'side', 'subject_id', 'kl', 'p0',
                                 'p1', 'p2', 'p3', 'p4']
  assert frame['knee_id'].iloc[2] == '0000001_v00_R'
  np.testing.assert_array_equal(frame['knee_id'], run['knee_ids'])
  np.testing.assert_array_equal(frame['subject_id'], run['subject_ids'])
  np.testing.assert_array_equal(frame['kl'], run['labels']['kl'])
  # float32 probabilities survive the CSV exactly.
  np.testing.assert_array_equal(
      frame[[f'p{k}' for k in range(5)]].to_numpy(np.float32),
      run['probs']['kl'])


@_FLOAT32_SUMS
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
      'rmse': sk_metrics.root_mean_squared_error(y, pred),
      'accuracy': sk_metrics.accuracy_score(y, pred),
      'f1_weighted': sk_metrics.f1_score(y, pred, average='weighted'),
      'log_loss': sk_metrics.log_loss(y, probs, labels=range(5)),
      'roc_auc': sk_metrics.roc_auc_score(y >= 2, score),
      'average_precision': sk_metrics.average_precision_score(y >= 2, score),
  }
  for name, value in want.items():
    assert result['metrics'][name]['estimate'] == pytest.approx(value), name
  assert result['confusion_matrix'] == sk_metrics.confusion_matrix(
      y, pred, labels=range(5)).tolist()
  recomputed = predictions.metrics_from_predictions(
      out / report.PREDICTIONS_CSV)
  assert set(recomputed) - {'confusion_matrix'} == set(result['metrics'])
  for name, entry in result['metrics'].items():
    assert entry['estimate'] == pytest.approx(recomputed[name]), name


def test_metrics_json_intervals_and_counts(written):
  _, run, result = written
  for name, entry in result['metrics'].items():
    assert entry['ci_low'] <= entry['estimate'] <= entry['ci_high'], name
  assert result['n_knees'] == NUM_KNEES
  assert result['n_subjects'] == NUM_KNEES // 2
  assert result['class_counts'] == np.bincount(run['labels']['kl']).tolist()
  assert sum(map(sum, result['confusion_matrix'])) == NUM_KNEES
  assert result['bootstrap']['n_resamples'] == 200


def test_undefined_metrics_are_null_and_plots_still_written(tmp_path):
  run = _run(n=60, seed=1, max_grade=1)  # no radiographic OA at all
  result = report.write_report(tmp_path, n_resamples=20,
                               positive_from={'kl': 2}, **run)
  text = (tmp_path / report.METRICS_JSON).read_text()
  assert 'NaN' not in text
  assert result['metrics']['roc_auc'] == {'estimate': None, 'ci_low': None,
                                          'ci_high': None}
  assert result['metrics']['recall_4']['estimate'] is None
  assert result['confusion_matrix'][4] == [0, 0, 0, 0, 0]
  assert (tmp_path / report.ROC_PNG).stat().st_size > 0


@_FLOAT32_SUMS
def test_masked_knees_are_written_but_not_scored(tmp_path):
  run = _run(n=200, seed=2)
  y = run['labels']['kl'].copy()
  y[::4] = -1  # ungraded knees
  run['labels'] = {'kl': y}
  result = report.write_report(tmp_path, n_resamples=50,
                               positive_from={'kl': 2}, **run)
  frame, y_read, probs = predictions.read_predictions(
      tmp_path / report.PREDICTIONS_CSV)
  assert len(frame) == 200
  np.testing.assert_array_equal(y_read, y)
  graded = y >= 0
  assert result['n_knees'] == graded.sum()
  assert result['n_subjects'] == np.unique(run['subject_ids'][graded]).size
  assert result['class_counts'] == np.bincount(y[graded]).tolist()
  pred = probs[graded].argmax(axis=1)
  estimates = {k: v['estimate'] for k, v in result['metrics'].items()}
  assert estimates['kappa'] == pytest.approx(sk_metrics.cohen_kappa_score(
      y[graded], pred, weights='quadratic'))
  assert estimates['log_loss'] == pytest.approx(sk_metrics.log_loss(
      y[graded], probs[graded], labels=range(5)))
  assert estimates['roc_auc'] == pytest.approx(sk_metrics.roc_auc_score(
      y[graded] >= 2, probs[graded, 2:].sum(axis=1)))
  recomputed = predictions.metrics_from_predictions(
      tmp_path / report.PREDICTIONS_CSV)
  for name, value in estimates.items():
    assert value == pytest.approx(recomputed[name]), name


def test_existing_predictions_csv_still_reads(tmp_path):
  # A predictions.csv as earlier versions wrote it: kl, p0..p4, no subjects.
  run = _run(n=40, seed=3)
  y, probs = run['labels']['kl'], run['probs']['kl'].astype(np.float64)
  columns = {'knee_id': run['knee_ids'], 'side': run['sides'], 'kl': y}
  columns.update({f'p{k}': probs[:, k] for k in range(5)})
  path = tmp_path / report.PREDICTIONS_CSV
  pd.DataFrame(columns).to_csv(path, index=False)
  frame, y_read, probs_read = predictions.read_predictions(path)
  np.testing.assert_array_equal(y_read, y)
  np.testing.assert_array_equal(probs_read, probs)
  assert predictions.read_predictions(path, 'kl')[1].tolist() == y.tolist()
  _, labels, head_probs = predictions.read_heads(path)
  assert list(labels) == ['kl'] and head_probs['kl'].shape == (40, 5)
  with pytest.raises(ValueError, match='no head'):
    predictions.read_predictions(path, 'ost_tl')
  got = predictions.metrics_from_predictions(path)
  assert got['kappa'] == pytest.approx(sk_metrics.cohen_kappa_score(
      y, probs.argmax(axis=1), weights='quadratic'))


def test_single_binary_head_keeps_its_name(tmp_path):
  rng = np.random.default_rng(4)
  y = rng.integers(0, 2, 80)
  probs = rng.dirichlet([1.0, 1.0], 80)
  result = report.write_report(
      tmp_path, knee_ids=[f'k{i}' for i in range(80)], sides=['R'] * 80,
      labels={'kl0_vs_kl2': y}, probs={'kl0_vs_kl2': probs},
      positive_from={'kl0_vs_kl2': 1}, n_resamples=20)
  frame = pd.read_csv(tmp_path / report.PREDICTIONS_CSV)
  assert list(frame.columns) == ['knee_id', 'side', 'kl0_vs_kl2', 'p0', 'p1']
  assert result['n_subjects'] is None
  assert result['metrics']['roc_auc']['estimate'] == pytest.approx(
      sk_metrics.roc_auc_score(y, probs[:, 1]))


def test_headline_and_report_scores(written):
  _, _, result = written
  shown = json.loads(report.headline(result))
  assert list(shown) == ['balanced_accuracy', 'kappa', 'mse', 'roc_auc']
  assert shown['kappa'] == round(result['metrics']['kappa']['estimate'], 4)
  scores = report.report_scores(result)
  for name, entry in result['metrics'].items():
    assert scores[name] == entry['estimate'], name
  assert scores['loss'] == result['metrics']['log_loss']['estimate']


def test_positive_from_defaults_to_none(tmp_path):
  result = report.write_report(tmp_path, n_resamples=10, **_run(n=40))
  assert result['positive_from'] is None
  assert 'roc_auc' not in result['metrics']
  assert set(result['files']) == {'predictions', 'confusion_matrix'}
  assert not (tmp_path / report.ROC_PNG).exists()
  shown = json.loads(report.headline(result))
  assert list(shown) == ['balanced_accuracy', 'kappa', 'mse']


def test_a_binary_head_headlines_accuracy_f1_sensitivity_specificity(
    tmp_path):
  run = _run(n=60, seed=3)
  run['labels'] = {'kl': (run['labels']['kl'] >= 2).astype(int)}
  run['probs'] = {'kl': np.stack([run['probs']['kl'][:, :2].sum(1),
                                  run['probs']['kl'][:, 2:].sum(1)], 1)}
  result = report.write_report(tmp_path, n_resamples=10,
                               positive_from={'kl': 1}, **run)
  shown = json.loads(report.headline(result))
  assert list(shown) == ['accuracy', 'f1', 'recall_1', 'recall_0', 'roc_auc']


def test_pooled_task_of_one_head_equals_its_binary_task(tmp_path):
  run = _run(n=120, seed=5)
  result = report.write_report(tmp_path, n_resamples=50, seed=3,
                               positive_from={'kl': 2},
                               pooled_binary={'oa': ['kl']}, **run)
  assert list(result)[-1] == 'pooled'  # the single-head layout, extended
  entry = result['pooled']['oa']
  y = run['labels']['kl']
  assert entry['heads'] == ['kl'] and entry['positive_from'] == {'kl': 2}
  assert (entry['n'], entry['n_positive'], entry['n_knees']) == (
      120, int((y >= 2).sum()), 120)
  for name in ('roc_auc', 'average_precision'):
    assert entry['metrics'][name]['estimate'] == pytest.approx(
        result['metrics'][name]['estimate'], rel=1e-12), name
  assert entry['files'] == {'roc': 'roc_oa.png', 'pr': 'pr_oa.png'}
  for name in entry['files'].values():
    assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # No heads table for a single head.
  assert not (tmp_path / report.HEADS_TABLE_MD).exists()


def test_sorted_confidence_is_each_class_true_probability_descending():
  labels = np.array([0, 1, 1, -1, 0, 1])
  probs = np.array([[.9, .1], [.3, .7], [.6, .4], [.5, .5], [.2, .8],
                    [.05, .95]])
  curves = plots.sorted_confidence(labels, probs)
  np.testing.assert_allclose(curves[0], [.9, .2])
  np.testing.assert_allclose(curves[1], [.95, .7, .4])
  assert set(plots.sorted_confidence(np.array([1, 1]), probs[:2])) == {1}
