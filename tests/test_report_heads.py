"""Tests for koajax.evaluation.report with several heads (KL + six OARSI
grades) and ungraded knees, checked against scikit-learn."""

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpl_image
from sklearn import metrics as sk_metrics

from koajax.evaluation import compare
from koajax.evaluation import heads as heads_lib
from koajax.evaluation import metrics
from koajax.evaluation import predictions
from koajax.evaluation import report
from koajax.evaluation import significance
import sklearn_reference

NUM_KNEES = 300
HEADS = {'kl': 5, 'ost_tl': 4, 'ost_fl': 4, 'jsn_l': 4, 'ost_tm': 4,
         'ost_fm': 4, 'jsn_m': 4}
POSITIVE_FROM = {'kl': 2, 'jsn_m': 1}
MEAN_HEADS = ['ost_tl', 'ost_fl', 'jsn_l', 'ost_tm', 'ost_fm', 'jsn_m']
# float32 softmax rows sum to 1 only to float32 precision, which
# scikit-learn's log_loss notes; its value is unaffected (no renormalising).
pytestmark = pytest.mark.filterwarnings(
    'ignore:The y_.* values do not sum to one:UserWarning')


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _run(n: int = NUM_KNEES, seed: int = 0, heads=None):
  rng = np.random.default_rng(seed)
  heads = heads or HEADS
  subjects = np.array([f'{i // 2:07d}' for i in range(n)])
  sides = np.tile(['R', 'L'], n // 2)
  knee_ids = np.array([f'{s}_v00_{d}' for s, d in zip(subjects, sides)])
  labels, probs = {}, {}
  for h, (head, num_classes) in enumerate(heads.items()):
    y = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), y] += 1.5
    probs[head] = _softmax(logits)
    if h:  # the primary head grades every knee, the others miss some
      y[rng.random(n) < 0.1 + 0.03 * h] = -1
    labels[head] = y
  return dict(knee_ids=knee_ids, sides=sides, labels=labels, probs=probs,
              subject_ids=subjects)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp('heads')
  run = _run()
  result = report.write_report(out, positive_from=POSITIVE_FROM,
                               mean_heads=MEAN_HEADS, n_resamples=100, seed=0,
                               **run)
  return out, run, result


def _graded(run, head):
  keep = run['labels'][head] >= 0
  return run['labels'][head][keep], run['probs'][head][keep]


def test_predictions_csv_columns_and_masked_rows(written):
  out, run, _ = written
  frame = pd.read_csv(out / report.PREDICTIONS_CSV, dtype={'subject_id': str})
  want = ['knee_id', 'side', 'subject_id']
  for head, num_classes in HEADS.items():
    want += [head] + [f'{head}_p{k}' for k in range(num_classes)]
  assert list(frame.columns) == want
  assert len(frame) == NUM_KNEES  # ungraded knees are rows too
  for head, num_classes in HEADS.items():
    np.testing.assert_array_equal(frame[head], run['labels'][head])
    np.testing.assert_array_equal(
        frame[[f'{head}_p{k}' for k in range(num_classes)]].to_numpy(
            np.float32), run['probs'][head])
  assert (frame['ost_tl'] == -1).sum() > 0


def test_read_heads_round_trips(written):
  out, run, _ = written
  path = out / report.PREDICTIONS_CSV
  frame, labels, probs = predictions.read_heads(path)
  assert list(labels) == list(HEADS) == list(probs)
  assert frame['subject_id'].iloc[0] == '0000000'
  for head in HEADS:
    np.testing.assert_array_equal(labels[head], run['labels'][head])
    np.testing.assert_array_equal(probs[head].astype(np.float32),
                                  run['probs'][head])
  # head=None reads the first (primary) head.
  _, y, p = predictions.read_predictions(path)
  np.testing.assert_array_equal(y, run['labels']['kl'])
  assert p.shape == (NUM_KNEES, 5)
  _, y, p = predictions.read_predictions(path, 'jsn_m')
  np.testing.assert_array_equal(y, run['labels']['jsn_m'])
  assert p.shape == (NUM_KNEES, 4)
  with pytest.raises(ValueError, match='no head'):
    predictions.read_predictions(path, 'jsn_x')


def test_metrics_json_layout(written):
  out, run, result = written
  assert json.loads((out / report.METRICS_JSON).read_text()) == result
  assert list(result) == ['n_knees', 'n_subjects', 'bootstrap', 'heads',
                          'mean', 'files']
  assert result['files'] == {'predictions': report.PREDICTIONS_CSV,
                             'heads_table_md': report.HEADS_TABLE_MD,
                             'heads_table_png': report.HEADS_TABLE_PNG}
  for name in result['files'].values():
    assert (out / name).stat().st_size > 0, name
  assert result['n_knees'] == NUM_KNEES
  assert result['n_subjects'] == NUM_KNEES // 2
  assert result['bootstrap']['n_resamples'] == 100
  assert result['bootstrap']['mean_heads'] == MEAN_HEADS
  assert list(result['heads']) == list(HEADS)
  for head, num_classes in HEADS.items():
    entry = result['heads'][head]
    y, _ = _graded(run, head)
    assert list(entry) == ['n_knees', 'class_counts', 'positive_from',
                           'metrics', 'confusion_matrix', 'files']
    assert entry['n_knees'] == y.size
    assert entry['class_counts'] == np.bincount(
        y, minlength=num_classes).tolist()
    assert entry['positive_from'] == POSITIVE_FROM.get(head)
  assert 'NaN' not in (out / report.METRICS_JSON).read_text()


@pytest.mark.parametrize('head', list(HEADS))
def test_each_head_equals_sklearn_on_its_graded_knees(written, head):
  out, run, result = written
  entry = result['heads'][head]
  y, probs = _graded(run, head)
  want = sklearn_reference.sklearn_head(y, probs, POSITIVE_FROM.get(head))
  assert list(entry['metrics']) == list(metrics.metric_names(
      HEADS[head], POSITIVE_FROM.get(head)))
  for name, value in want.items():
    assert entry['metrics'][name]['estimate'] == pytest.approx(value), name
    ci = entry['metrics'][name]
    assert ci['ci_low'] <= ci['estimate'] <= ci['ci_high'], name
  assert entry['confusion_matrix'] == sk_metrics.confusion_matrix(
      y, probs.argmax(axis=1), labels=range(HEADS[head])).tolist()
  recomputed = predictions.metrics_from_predictions(
      out / report.PREDICTIONS_CSV, head=head,
      positive_from=POSITIVE_FROM.get(head))
  for name, value in want.items():
    assert recomputed[name] == pytest.approx(value), name
  # predictions.csv gives back every metric of metrics.json.
  assert set(recomputed) - {'confusion_matrix'} == set(entry['metrics'])
  for name, value in entry['metrics'].items():
    assert value['estimate'] == pytest.approx(recomputed[name],
                                              nan_ok=True), name


def test_mean_over_heads(written):
  _, run, result = written
  per_head = {head: sklearn_reference.sklearn_head(*_graded(run, head),
                                 POSITIVE_FROM.get(head))
              for head in MEAN_HEADS}
  # Only metrics every mean head has: jsn_m alone has roc_auc.
  shared = set.intersection(*(set(v) for v in per_head.values()))
  assert set(result['mean']) == shared
  for name in shared:
    want = np.mean([per_head[head][name] for head in MEAN_HEADS])
    entry = result['mean'][name]
    assert entry['estimate'] == pytest.approx(want), name
    assert entry['ci_low'] <= entry['estimate'] <= entry['ci_high'], name
  # Averaging six heads narrows the interval relative to one head.
  width = lambda e: e['ci_high'] - e['ci_low']
  assert width(result['mean']['kappa']) < width(
      result['heads']['ost_tl']['metrics']['kappa'])


def test_plot_files_per_head(written):
  out, _, result = written
  names = {p.name for p in out.iterdir()}
  for head in HEADS:
    files = result['heads'][head]['files']
    want = {'confusion_matrix': f'confusion_matrix_{head}.png'}
    if head in POSITIVE_FROM:
      want.update(roc=f'roc_{head}.png', pr=f'pr_{head}.png')
    assert files == want
    for name in files.values():
      assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
      pixels = mpl_image.imread(out / name)
      assert min(pixels.shape[:2]) > 200
      assert pixels[..., :3].std() > 0.05, name
  assert report.CONFUSION_PNG not in names and report.ROC_PNG not in names
  assert 'roc_ost_tl.png' not in names
  # Everything was renamed into place: no temporary files remain.
  assert not [name for name in names if name.startswith('.')]


def test_report_scores_match_head_scores(written):
  _, run, result = written
  scores = report.report_scores(result)
  want = heads_lib.head_scores(run['labels'], run['probs'],
                               positive_from=POSITIVE_FROM,
                               mean_heads=MEAN_HEADS)
  assert set(scores) == set(want)
  for name, value in want.items():
    assert scores[name] == pytest.approx(value, nan_ok=True), name
  # Bare names are the primary head's; 'loss' averages all heads.
  assert scores['kappa'] == scores['kl/kappa']
  assert scores['loss'] == pytest.approx(np.mean(
      [sklearn_reference.sklearn_head(*_graded(run, head))['log_loss'] for head in HEADS]))


def test_headline_of_several_heads(written):
  _, _, result = written
  shown = json.loads(report.headline(result))
  assert list(shown) == ['kl/balanced_accuracy', 'kl/kappa', 'mean/kappa',
                         'mean/balanced_accuracy']
  assert shown['mean/kappa'] == round(result['mean']['kappa']['estimate'], 4)


def test_head_without_graded_knees_is_null(tmp_path):
  run = _run(n=60, seed=1, heads={'kl': 5, 'jsn_m': 4})
  run['labels']['jsn_m'][:] = -1
  result = report.write_report(tmp_path, positive_from={'jsn_m': 1},
                               mean_heads=['kl', 'jsn_m'], n_resamples=20,
                               **run)
  entry = result['heads']['jsn_m']
  assert entry['n_knees'] == 0
  assert entry['class_counts'] == [0, 0, 0, 0]
  assert all(v == {'estimate': None, 'ci_low': None, 'ci_high': None}
             for v in entry['metrics'].values())
  assert result['mean']['kappa']['estimate'] is None
  assert result['heads']['kl']['metrics']['kappa']['estimate'] is not None
  for name in entry['files'].values():
    assert (tmp_path / name).stat().st_size > 0
  scores = report.report_scores(result)
  assert np.isnan(scores['jsn_m/kappa']) and np.isnan(scores['loss'])
  assert json.loads(report.headline(result))['mean/kappa'] is None


def test_one_head_with_mean_heads_keeps_its_layout(tmp_path):
  run = _run(n=80, seed=2, heads={'kl': 5})
  result = report.write_report(tmp_path, mean_heads=['kl'], n_resamples=20,
                               **run)
  assert 'heads' not in result
  assert result['files']['confusion_matrix'] == report.CONFUSION_PNG
  assert result['mean']['kappa']['estimate'] == pytest.approx(
      result['metrics']['kappa']['estimate'])
  frame = pd.read_csv(tmp_path / report.PREDICTIONS_CSV)
  assert list(frame.columns) == ['knee_id', 'side', 'subject_id', 'kl', 'p0',
                                 'p1', 'p2', 'p3', 'p4']


@pytest.mark.parametrize('head', ['p1', 'knee_id', 'ost_p2', 'a/b', 'mean',
                                  'a b', ''])
def test_bad_head_names_are_rejected_before_writing(tmp_path, head):
  run = _run(n=20, seed=3, heads={'kl': 5})
  run['labels'] = {head: run['labels']['kl']}
  run['probs'] = {head: run['probs']['kl']}
  with pytest.raises(ValueError, match='head name'):
    report.write_report(tmp_path, n_resamples=5, **run)
  assert not list(tmp_path.iterdir())


def test_inconsistent_heads_are_rejected(tmp_path):
  run = _run(n=20, seed=3, heads={'kl': 5, 'jsn_m': 4})
  with pytest.raises(ValueError, match='unknown heads'):
    report.write_report(tmp_path, mean_heads=['jsn_x'], n_resamples=5, **run)
  with pytest.raises(ValueError, match='different heads'):
    report.write_report(tmp_path, n_resamples=5,
                        **dict(run, probs={'kl': run['probs']['kl']}))


def test_compare_picks_a_head_and_skips_ungraded_knees(tmp_path):
  heads = {'kl': 5, 'jsn_m': 4}
  run_a = _run(n=160, seed=5, heads=heads)
  run_b = _run(n=160, seed=6, heads=heads)
  run_b['labels'] = run_a['labels']  # the same knees and grades
  for name, run in (('a', run_a), ('b', run_b)):
    frame = predictions.predictions_frame(
        knee_ids=run['knee_ids'], sides=run['sides'], labels=run['labels'],
        probs=run['probs'], subject_ids=run['subject_ids'])
    frame.to_csv(tmp_path / f'{name}.csv', index=False)
  result = compare.main([f'--a={tmp_path / "a.csv"}',
                         f'--b={tmp_path / "b.csv"}', '--head=jsn_m',
                         '--metric=kappa', '--n_chunks=10'])
  graded = run_a['labels']['jsn_m'] >= 0
  want = significance.chunked_wilcoxon(
      run_a['labels']['jsn_m'][graded], run_a['probs']['jsn_m'][graded],
      run_b['probs']['jsn_m'][graded], run_a['subject_ids'][graded],
      metric='kappa', n_chunks=10)
  assert result['n_knees'] == graded.sum()
  assert result['p_value'] == pytest.approx(want.p_value)
  np.testing.assert_allclose(result['values_a'], want.values_a)
  # Without --head the first head (kl) is compared.
  first = compare.compare_predictions(tmp_path / 'a.csv', tmp_path / 'b.csv',
                                      n_chunks=10)
  assert first['n_knees'] == 160


# Binary tasks pooled over heads.

POOLED_POSITIVE_FROM = {'kl': 2, 'ost_tl': 1, 'ost_fl': 1, 'ost_tm': 2,
                        'ost_fm': 1}
POOLED = {'ost_lateral': ('ost_tl', 'ost_fl'),
          'ost_medial': ('ost_tm', 'ost_fm')}


@pytest.fixture(scope='module')
def pooled_written(tmp_path_factory):
  out = tmp_path_factory.mktemp('pooled')
  run = _run(seed=7)
  result = report.write_report(out, positive_from=POOLED_POSITIVE_FROM,
                               pooled_binary=POOLED, n_resamples=100, seed=2,
                               **run)
  return out, run, result


def _pooled_by_hand(run, heads):
  """The concatenated binary rows of the heads' graded knees."""
  positive, score, knees = [], [], []
  for head in heads:
    y, probs = _graded(run, head)
    threshold = POOLED_POSITIVE_FROM[head]
    positive.append(y >= threshold)
    score.append(probs[:, threshold:].astype(np.float64).sum(axis=1))
    knees.append(np.flatnonzero(run['labels'][head] >= 0))
  return (np.concatenate(positive), np.concatenate(score),
          np.concatenate(knees))


@pytest.mark.parametrize('name', list(POOLED))
def test_pooled_task_equals_sklearn_on_the_concatenated_rows(pooled_written,
                                                             name):
  out, run, result = pooled_written
  entry = result['pooled'][name]
  positive, score, knees = _pooled_by_hand(run, POOLED[name])
  assert entry['heads'] == list(POOLED[name])
  assert entry['positive_from'] == {h: POOLED_POSITIVE_FROM[h]
                                    for h in POOLED[name]}
  assert entry['n'] == positive.size
  assert entry['n_positive'] == positive.sum()
  assert entry['n_knees'] == np.unique(knees).size
  want = {'roc_auc': sk_metrics.roc_auc_score(positive, score),
          'average_precision': sk_metrics.average_precision_score(positive,
                                                                  score)}
  assert set(entry['metrics']) == set(want)
  for metric, value in want.items():
    got = entry['metrics'][metric]
    # float32 probabilities summed after the CSV round trip: equal to
    # rounding, ties included.
    assert got['estimate'] == pytest.approx(value, rel=1e-9), metric
    assert got['ci_low'] < got['estimate'] < got['ci_high'], metric
  assert entry['files'] == {'roc': f'roc_{name}.png', 'pr': f'pr_{name}.png'}
  for file_name in entry['files'].values():
    assert (out / file_name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    pixels = mpl_image.imread(out / file_name)
    assert pixels[..., :3].std() > 0.05, file_name


def test_pooled_layout_and_bootstrap(pooled_written, tmp_path):
  out, run, result = pooled_written
  assert list(result) == ['n_knees', 'n_subjects', 'bootstrap', 'heads',
                          'pooled', 'files']
  assert list(result['pooled']) == list(POOLED)
  assert 'pooled_method' in result['bootstrap']
  assert json.loads((out / report.METRICS_JSON).read_text()) == result
  # Seeded like the rest: the same seed gives the same interval.
  again = report.write_report(tmp_path, positive_from=POOLED_POSITIVE_FROM,
                              pooled_binary=POOLED, n_resamples=100, seed=2,
                              **run)
  assert again['pooled'] == result['pooled']
  other = report.write_report(tmp_path, positive_from=POOLED_POSITIVE_FROM,
                              pooled_binary=POOLED, n_resamples=100, seed=3,
                              **run)
  assert (other['pooled']['ost_lateral']['metrics']['roc_auc']['ci_low']
          != result['pooled']['ost_lateral']['metrics']['roc_auc']['ci_low'])
  # Without pooled tasks there is no 'pooled' key, nor its figures.
  assert 'pooled' not in report.write_report(
      tmp_path / 'plain', positive_from=POOLED_POSITIVE_FROM,
      n_resamples=10, **run)
  assert not (tmp_path / 'plain' / 'roc_ost_lateral.png').exists()


@pytest.mark.parametrize('pooled,match', [
    ({'ost_lateral': ('ost_tl', 'jsn_x')}, 'needs some of the heads'),
    ({'ost_lateral': ()}, 'needs some of the heads'),
    ({'ost_lateral': ('ost_tl', 'jsn_l')}, 'no positive_from'),
    ({'ost_lateral': ('ost_tl', 'ost_tl')}, 'repeats a head'),
    ({'ost_lateral': 'ost_tl'}, 'not the string'),
    ({'ost_tl': ('ost_tl', 'ost_fl')}, 'named like a head'),
    ({'a/b': ('ost_tl', 'ost_fl')}, 'bad pooled task name'),
])
def test_bad_pooled_tasks_are_rejected_before_writing(tmp_path, pooled,
                                                      match):
  run = _run(n=20, seed=3)
  with pytest.raises(ValueError, match=match):
    report.write_report(tmp_path, positive_from=POOLED_POSITIVE_FROM,
                        pooled_binary=pooled, n_resamples=5, **run)
  assert not list(tmp_path.iterdir())
