"""Tests of the reader comparison: simulated readers, reader columns in
manifests and caches, and the reader table of a report."""

from __future__ import annotations

import json
import logging
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from koajax import cli
from koajax import config_lib
from koajax import tasks as tasks_lib
from koajax.data import build
from koajax.data import cache as cache_lib
from koajax.data import grading
from koajax.data import manifest as manifest_lib
from koajax.data import schema
from koajax.data import sources
from koajax.data import synthetic
from koajax.data import synthetic_upgrade
from koajax.evaluation import readers as readers_lib
from koajax.evaluation import report

READERS = tuple(schema.reader_column(name) for name in
                grading.reader_names(grading.CohortConfig()))
ROI_PX = 32  # small knees keep the builds fast


# ---------------------------------------------------------------- the table


def _expected(y, model, reader, positive=1):
  """One reader's row, computed independently of koajax."""
  both = (y >= 0) & (reader >= 0)
  y, model, reader = y[both], model[both], reader[both]
  out = {'n': int(both.sum())}
  for who, pred in (('reader', reader), ('model', model)):
    out[f'{who}_accuracy'] = np.mean(pred == y)
    out[f'{who}_sensitivity'] = np.mean(pred[y >= positive] >= positive)
    out[f'{who}_specificity'] = np.mean(pred[y < positive] < positive)
  out['kappa_model_reader'] = cohen_kappa_score(model, reader)
  out['kappa_reader_reference'] = cohen_kappa_score(reader, y)
  b = int(np.sum((model == y) & (reader != y)))
  c = int(np.sum((model != y) & (reader == y)))
  out['model_only'], out['reader_only'] = b, c
  # Exact McNemar by hand: twice the smaller tail of Bin(b + c, 1/2).
  out['mcnemar_p'] = min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5))
  return out


@pytest.fixture(scope='module')
def graded():
  """Reference, model and readers of a KL-0 vs KL-2 test set."""
  rng = np.random.default_rng(7)
  n = 300
  kl = rng.choice(5, n, p=[0.4, 0.2, 0.25, 0.1, 0.05])
  y = np.select([kl == 0, kl == 2], [0, 1], -1)
  model = np.where(rng.random(n) < 0.85, kl >= 2, kl < 2).astype(int)
  probs = np.where(model[:, None] == [0, 1], 0.7, 0.3)

  def reader(p_right, p_other):
    # Right with p_right, else the wrong class; another KL grade (outside
    # the task) with p_other. Knees outside the reference's task get either
    # class: they are not compared.
    grade = np.where(rng.random(n) < p_right, y, 1 - y)
    grade = np.where(y < 0, rng.integers(0, 2, n), grade)
    return np.where(rng.random(n) < p_other, -1, grade)

  readers = {
      'close': reader(0.93, 0.05),
      # Grades other than 0 and 2 for half the knees: those are excluded.
      'other_grades': reader(0.8, 0.5),
      # Grades only knees outside the task: nothing in common.
      'disjoint': np.where(y < 0, 0, -1),
  }
  return y, model, probs, readers


def test_table_matches_an_independent_computation(graded):
  y, model, probs, readers = graded
  table = readers_lib.reader_table(y, probs, readers, positive_from=1)
  assert list(table.reader) == list(readers)
  assert list(table.columns) == [c for c, _ in readers_lib.COLUMNS]
  for name in ('close', 'other_grades'):
    row = table.set_index('reader').loc[name]
    for key, value in _expected(y, model, readers[name]).items():
      assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
  # Excluded knees really are left out.
  assert table.set_index('reader').loc['other_grades', 'n'] < (
      table.set_index('reader').loc['close', 'n'])


def test_a_reader_without_common_knees_has_no_values(graded):
  y, _, probs, readers = graded
  row = readers_lib.reader_table(y, probs, readers).set_index(
      'reader').loc['disjoint']
  assert row['n'] == 0 and row['model_only'] == row['reader_only'] == 0
  for key in ('reader_accuracy', 'model_sensitivity', 'kappa_model_reader',
              'kappa_reader_reference', 'mcnemar_p'):
    assert np.isnan(row[key]), key


def test_bad_reader_labels_are_refused(graded, tmp_path):
  y, _, probs, _ = graded
  with pytest.raises(ValueError, match="reader 'short'.*one per knee"):
    readers_lib.reader_table(y, probs, {'short': y[:-1]})
  with pytest.raises(ValueError, match='0..1 or be -1'):
    readers_lib.reader_table(y, probs, {'kl': np.full(y.shape, 2)})
  # In a report, before anything is written.
  with pytest.raises(ValueError, match='one per knee'):
    report.write_report(tmp_path / 'r', knee_ids=[f'k{i}' for i in y],
                        sides=['R'] * y.size, labels={'kl0_vs_kl2': y},
                        probs={'kl0_vs_kl2': probs},
                        readers={'short': y[:-1]})
  assert not (tmp_path / 'r' / report.PREDICTIONS_CSV).exists()


def test_report_writes_the_reader_table(graded, tmp_path):
  y, model, probs, readers = graded
  result = report.write_report(
      tmp_path, knee_ids=[f'k{i:03d}' for i in range(y.size)],
      sides=['R'] * y.size, labels={'kl0_vs_kl2': y},
      probs={'kl0_vs_kl2': probs}, positive_from={'kl0_vs_kl2': 1},
      n_resamples=10, readers=readers)
  assert json.loads((tmp_path / report.METRICS_JSON).read_text()) == result
  section = result['readers']
  assert 'McNemar' in section['test'] and 'binomtest' in section['test']
  assert section['files'] == {'csv': 'readers.csv', 'md': 'readers.md'}
  close = _expected(y, model, readers['close'])
  for key, value in close.items():
    assert section['readers']['close'][key] == pytest.approx(value), key
  assert section['readers']['disjoint']['mcnemar_p'] is None

  csv = pd.read_csv(tmp_path / 'readers.csv')
  assert list(csv.reader) == list(readers)
  assert csv.loc[0, 'kappa_model_reader'] == pytest.approx(
      close['kappa_model_reader'])
  assert csv.loc[2, 'mcnemar_p'] != csv.loc[2, 'mcnemar_p']  # empty: NaN

  md = (tmp_path / 'readers.md').read_text().splitlines()
  assert md[0].startswith('| reader | knees |') and 'McNemar p' in md[0]
  cells = [c.strip() for c in md[2].strip('|').split('|')]
  assert cells[0] == 'close' and cells[1] == str(close['n'])
  assert cells[2] == f"{close['reader_accuracy']:.3f}"
  assert cells[8] == f"{close['kappa_model_reader']:.3f}"
  assert '—' in md[4]
  assert 'exact two-sided McNemar test' in md[-1]
  assert 'binomial test' in md[-1]


def test_report_without_readers_writes_no_table(graded, tmp_path):
  y, _, probs, _ = graded
  result = report.write_report(
      tmp_path, knee_ids=[f'k{i:03d}' for i in range(y.size)],
      sides=['R'] * y.size, labels={'kl0_vs_kl2': y},
      probs={'kl0_vs_kl2': probs}, n_resamples=10, readers={})
  assert 'readers' not in result and not (tmp_path / 'readers.csv').exists()


def test_index_readers_map_grades_through_the_head():
  index = pd.DataFrame({'kl': [0, 2, 1, 3],
                        'kl_reader_r1': [0, 1, 2, -1],
                        'kl_reader_dr_b': [2, 2, 0, 4]})
  head = tasks_lib.TASKS['kl0_vs_kl2'].heads[0]
  got = readers_lib.index_readers(index, head)
  assert list(got) == ['r1', 'dr_b']
  np.testing.assert_array_equal(got['r1'], [0, -1, 1, -1])
  np.testing.assert_array_equal(got['dr_b'], [1, 1, 0, -1])
  assert readers_lib.index_readers(index.drop(columns=['kl_reader_r1',
                                                       'kl_reader_dr_b']),
                                   head) == {}
  ost = tasks_lib.Head('ost_tl', 'ost_tl', 4)
  assert readers_lib.index_readers(index, ost) == {}


# ------------------------------------------------------- simulated readers


def test_simulated_readers_are_deterministic_by_seed():
  options = dict(num_subjects=30, visits=(0, 12), attendance=(1.0, 1.0))
  a, _ = synthetic.plan(seed=1, **options)
  b, _ = synthetic.plan(seed=1, **options)
  c, _ = synthetic.plan(seed=2, **options)
  assert schema.reader_columns(a.columns) == list(READERS)
  pd.testing.assert_frame_equal(a[list(READERS)], b[list(READERS)])
  assert not a[list(READERS)].equals(c[list(READERS)])


def test_readers_leave_every_other_output_unchanged():
  options = dict(num_subjects=30, seed=4, visits=(0, 12),
                 attendance=(1.0, 0.8), ungraded_fraction=0.3)
  with_readers, tasks = synthetic.plan(**options)
  without, tasks_without = synthetic.plan(readers=(), **options)
  assert not schema.reader_columns(without.columns)
  pd.testing.assert_frame_equal(with_readers.drop(columns=list(READERS)),
                                without)
  assert tasks == tasks_without  # so the images are the same too
  # Readers grade exactly the knees with recorded grades.
  for column in READERS:
    np.testing.assert_array_equal(with_readers[column].isna(),
                                  with_readers['kl'].isna())
  assert with_readers['kl'].isna().any()


def test_disagreement_grows_with_reader_noise():
  knees, _ = synthetic.plan(num_subjects=300, seed=0,
                            readers=(0.1, 0.4, 1.0))
  reference = knees['kl'].to_numpy(int)
  accuracy, off = [], []
  for column in schema.reader_columns(knees.columns):
    reader = knees[column].to_numpy(int)
    both = np.isin(reference, (0, 2)) & np.isin(reader, (0, 2))
    accuracy.append(np.mean(reader[both] == reference[both]))
    off.append(np.mean(reader != reference))
  assert accuracy[0] > accuracy[1] > accuracy[2], accuracy
  assert off[0] < off[1] < off[2], off
  assert accuracy[1] > 0.85  # a radiologist, not a coin


def test_reader_noise_must_be_non_negative():
  with pytest.raises(ValueError, match='readers'):
    grading.CohortConfig(readers=(0.3, -0.1))
  with pytest.raises(cli.BadInput, match='--readers'):
    synthetic.generate('/nonexistent/never-written', num_subjects=1,
                       readers=(-1.0,))


# ---------------------------------------------- reader columns in manifests


def _manifest(folder: Path, cells: list[str], column='kl_reader_x') -> Path:
  rows = [{'subject_id': f'S{i}', 'visit': '0', 'side': 'R', 'site': 'A',
           'path': f'f{i}.dcm', 'kl': '2', column: cell}
          for i, cell in enumerate(cells)]
  path = folder / 'manifest.csv'
  pd.DataFrame(rows, columns=[*schema.MANIFEST_COLUMNS, column]).to_csv(
      path, index=False)
  return path


def test_reader_columns_are_read_as_grades(tmp_path):
  path = _manifest(tmp_path, ['0', '', '4', '2.0'])
  df = manifest_lib.read_manifest(path)
  assert df['kl_reader_x'].tolist() == [0, -1, 4, 2]
  assert (df[manifest_lib.PROBLEM] == '').all()
  readers = manifest_lib.read_readers(path)
  assert readers.columns.tolist() == ['knee_id', 'kl_reader_x']
  assert readers['kl_reader_x'].tolist() == [0, -1, 4, 2]


@pytest.mark.parametrize('cell', ['5', 'two', '1.5'])
def test_a_bad_reader_grade_is_one_line_naming_file_row_and_column(
    tmp_path, cell):
  path = _manifest(tmp_path, ['0', cell])
  with pytest.raises(manifest_lib.ManifestError) as error:
    manifest_lib.read_manifest(path)
  text = str(error.value)
  assert '\n' not in text
  assert str(path) in text and 'row 3' in text and 'kl_reader_x' in text
  assert repr(cell) in text and 'leave the cell empty' in text
  # The build stops with exit status 2 before writing anything.
  code = cli.call(build.PROGRAM, build.main,
                  [f'--manifest={path}', f'--out={tmp_path / "cache"}'])
  assert code == cli.BAD_INPUT
  assert not (tmp_path / 'cache').exists()


def test_a_reader_column_without_a_usable_name_is_refused(tmp_path):
  path = _manifest(tmp_path, ['1'], column='kl_reader_dr. b')
  with pytest.raises(manifest_lib.ManifestError, match='letters, digits'):
    manifest_lib.read_manifest(path)


# ------------------------------------- reader columns in caches, and updates


@pytest.fixture(scope='module')
def tiny(tmp_path_factory) -> Path:
  """A data root holding a small synthetic dataset and its cache."""
  root = tmp_path_factory.mktemp('data')
  sources.resolve_cache(_data_config(root))
  return root


def _data_config(root: Path):
  cfg = config_lib.data_config(num_subjects=2, seed=3, roi_px=ROI_PX)
  cfg.root, cfg.workers = str(root), 1
  return cfg


def test_reader_columns_reach_the_cache_index(tiny):
  cfg = _data_config(tiny)
  raw = sources.synthetic_dir(cfg) / 'raw'
  manifest = pd.read_csv(raw / 'manifest.csv', dtype={'subject_id': str})
  cache = cache_lib.open_cache(sources.synthetic_dir(cfg) /
                               f'cache-roi{ROI_PX}')
  assert schema.reader_columns(cache.index.columns) == list(READERS)
  for column in READERS:
    assert cache.index[column].dtype == np.int64
    np.testing.assert_array_equal(cache.index[column],
                                  manifest[column].fillna(-1).astype(int))


def test_a_users_reader_column_reaches_the_index_with_gaps(tiny, tmp_path):
  raw = sources.synthetic_dir(_data_config(tiny)) / 'raw'
  df = pd.read_csv(raw / 'manifest.csv', dtype=str, keep_default_na=False)
  df = df[list(schema.MANIFEST_COLUMNS)].copy()
  df['path'] = [str(raw / p) for p in df['path']]
  df['kl_reader_dr_a'] = ['3', ''] * (len(df) // 2)
  df.to_csv(tmp_path / 'manifest.csv', index=False)
  build.build_cache(tmp_path / 'manifest.csv', tmp_path / 'cache',
                    landmarks=raw / 'landmarks.csv', roi_px=ROI_PX,
                    workers=1)
  index = cache_lib.open_cache(tmp_path / 'cache').index
  assert schema.reader_columns(index.columns) == ['kl_reader_dr_a']
  assert index['kl_reader_dr_a'].tolist() == [3, -1] * (len(df) // 2)


def test_an_old_dataset_and_cache_gain_the_readers_in_place(
    tiny, tmp_path, caplog):
  cfg = _data_config(tmp_path)
  folder = sources.synthetic_dir(cfg)
  shutil.copytree(sources.synthetic_dir(_data_config(tiny)), folder)
  raw, cache_dir = folder / 'raw', folder / f'cache-roi{ROI_PX}'
  new_manifest = (raw / 'manifest.csv').read_bytes()
  new_index = (cache_dir / 'index.csv').read_bytes()
  # As an older koajax left them: no readers, no synthetic.json.
  for path in (raw / 'manifest.csv', cache_dir / 'index.csv'):
    old = pd.read_csv(path, dtype=str, keep_default_na=False)
    old.drop(columns=list(READERS)).to_csv(path, index=False)
  (raw / synthetic.SETTINGS).unlink()
  records = cache_dir / cache_lib.RECORDS
  untouched = {p: (p.read_bytes(), p.stat().st_mtime_ns)
               for p in (records, cache_dir / cache_lib.META,
                         raw / synthetic.TRUTH, raw / synthetic.LANDMARKS)}

  with caplog.at_level(logging.INFO, logger='koajax.data.sources'):
    cache = sources.resolve_cache(cfg)
  assert (raw / 'manifest.csv').read_bytes() == new_manifest
  assert (cache_dir / 'index.csv').read_bytes() == new_index
  assert schema.reader_columns(cache.index.columns) == list(READERS)
  for path, (data, stamp) in untouched.items():
    assert path.read_bytes() == data and path.stat().st_mtime_ns == stamp
  lines = [r.getMessage() for r in caplog.records
           if r.name == 'koajax.data.sources']
  assert len(lines) == 2, lines
  assert 'simulated readers' in lines[0] and 'cache index' in lines[1]
  assert not [p.name for p in folder.rglob('.*')]  # no temporary file left

  # Up to date now: nothing is written again.
  stamps = [p.stat().st_mtime_ns for p in (raw / 'manifest.csv',
                                           cache_dir / 'index.csv')]
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='koajax.data.sources'):
    sources.resolve_cache(cfg)
  assert not caplog.records
  assert stamps == [p.stat().st_mtime_ns for p in (raw / 'manifest.csv',
                                                   cache_dir / 'index.csv')]


def test_add_readers_leaves_unknown_folders_alone(tiny, tmp_path):
  raw = sources.synthetic_dir(_data_config(tiny)) / 'raw'
  for name in ('manifest.csv', 'truth.csv'):
    shutil.copy(raw / name, tmp_path / name)
  old = pd.read_csv(tmp_path / 'manifest.csv', dtype=str,
                    keep_default_na=False).drop(columns=list(READERS))
  old.to_csv(tmp_path / 'manifest.csv', index=False)
  before = (tmp_path / 'manifest.csv').read_bytes()
  # No synthetic.json and no seed: not known to be a dataset of the generator.
  assert synthetic_upgrade.add_readers(tmp_path) == []
  (tmp_path / synthetic.SETTINGS).write_text('{"generator": "other"}')
  assert synthetic_upgrade.add_readers(tmp_path, seed=3) == []
  assert (tmp_path / 'manifest.csv').read_bytes() == before


def test_old_caches_without_readers_still_open(tiny, tmp_path):
  cache_dir = sources.synthetic_dir(_data_config(tiny)) / f'cache-roi{ROI_PX}'
  shutil.copytree(cache_dir, tmp_path / 'c')
  index = pd.read_csv(tmp_path / 'c' / 'index.csv', dtype=str,
                      keep_default_na=False)
  index.drop(columns=list(READERS)).to_csv(tmp_path / 'c' / 'index.csv',
                                           index=False)
  cache = cache_lib.open_cache(tmp_path / 'c')
  assert not schema.reader_columns(cache.index.columns)
  head = tasks_lib.TASKS['kl0_vs_kl2'].heads[0]
  assert readers_lib.index_readers(cache.index, head) == {}
  assert cache[0]['grades'].shape == (len(schema.GRADES),)


def test_a_cache_named_in_the_config_is_updated_only_from_its_manifest(
    tiny, tmp_path):
  cache_dir = tmp_path / 'c'
  shutil.copytree(sources.synthetic_dir(_data_config(tiny)) /
                  f'cache-roi{ROI_PX}', cache_dir)
  index = pd.read_csv(cache_dir / 'index.csv', dtype=str,
                      keep_default_na=False)
  index.drop(columns=list(READERS)).to_csv(cache_dir / 'index.csv',
                                           index=False)
  before = (cache_dir / 'index.csv').read_bytes()
  raw = sources.synthetic_dir(_data_config(tiny)) / 'raw'
  cfg = _data_config(tmp_path)
  cfg.source, cfg.cache_dir = 'manifest', str(cache_dir)
  # A copy of the manifest elsewhere: not the one the cache names.
  shutil.copy(raw / 'manifest.csv', tmp_path / 'manifest.csv')
  cfg.manifest = str(tmp_path / 'manifest.csv')
  sources.resolve_cache(cfg)
  assert (cache_dir / 'index.csv').read_bytes() == before
  cfg.manifest = str(raw / 'manifest.csv')
  cache = sources.resolve_cache(cfg)
  assert schema.reader_columns(cache.index.columns) == list(READERS)


def test_the_trainer_report_compares_with_the_cache_readers(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from koajax.train import trainer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  n = 60
  index = pd.DataFrame({
      'knee_id': [f'S{i}_v00_R' for i in range(n)],
      'subject_id': [f'S{i}' for i in range(n)], 'side': ['R'] * n,
      'kl': rng.integers(0, 5, n), 'kl_reader_r1': rng.integers(-1, 5, n)})
  probs = rng.dirichlet([1, 1], n)
  config = ml_collections.ConfigDict({'bootstrap_resamples': 10, 'seed': 0})
  task = tasks_lib.TASKS['kl0_vs_kl2']
  result = trainer.write_report(tmp_path, config, task,
                                types.SimpleNamespace(index=index),
                                np.arange(n), {'kl0_vs_kl2': probs})
  kl, reader = index['kl'].to_numpy(), index['kl_reader_r1'].to_numpy()
  y = np.select([kl == 0, kl == 2], [0, 1], -1)
  r = np.select([reader == 0, reader == 2], [0, 1], -1)
  want = _expected(y, probs.argmax(1), r)
  got = result['readers']['readers']['r1']
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key
  assert (tmp_path / 'readers.md').is_file()
