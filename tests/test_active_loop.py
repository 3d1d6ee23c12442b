"""The active-learning loop: set bookkeeping, a smoke run, kill and resume."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from koajax.active import loop
from koajax.data import split_recipes
from config_loader import load_config


def _assert_partition(sets, candidates):
  parts = [sets.labeled, sets.unlabeled, sets.pool]
  for i, a in enumerate(parts):
    for b in parts[i + 1:]:
      assert not np.intersect1d(a, b).size
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), candidates)


@pytest.mark.parametrize('consistency', [True, False])
@pytest.mark.parametrize('random', [True, False])
def test_rounds_keep_labeled_unlabeled_and_pool_disjoint(consistency, random):
  candidates = np.arange(100, 400, 3)
  sets = loop.initial_sets(candidates, n_init=10, consistency=consistency,
                           seed=0)
  _assert_partition(sets, candidates)
  assert len(sets.labeled) == 10
  assert len(sets.unlabeled) == (10 if consistency else 0)
  rng = np.random.default_rng(1)
  for r in range(8):
    pool = sets.candidates
    scores = None if random else rng.random(len(pool))
    new, queried = loop.next_sets(sets, scores, n_query=15,
                                  consistency=consistency, seed=r)
    _assert_partition(new, candidates)
    # D_L only grows, by exactly the queried knees, which were unlabeled.
    np.testing.assert_array_equal(
        new.labeled, np.sort(np.concatenate([sets.labeled, queried])))
    assert np.isin(queried, pool).all() and len(queried) == min(15, len(pool))
    if not random:
      # Queried: the most uncertain; U: the least uncertain of the rest.
      order = np.argsort(-scores, kind='stable')
      np.testing.assert_array_equal(np.sort(pool[order[:15]]), queried)
      if consistency:
        rest = order[15:]
        expected_u = pool[rest[::-1][:len(new.labeled)]]
        np.testing.assert_array_equal(np.sort(expected_u), new.unlabeled)
        if len(new.pool):
          assert scores[np.isin(pool, new.unlabeled)].max() <= \
              scores[np.isin(pool, new.pool)].min()
    if consistency:
      assert len(new.unlabeled) == min(len(new.labeled),
                                       len(candidates) - len(new.labeled))
    sets = new
  with pytest.raises(ValueError, match='two of D_L, U and the pool'):
    loop.RoundSets(labeled=np.array([1, 2]), unlabeled=np.array([2]),
                   pool=np.array([3]))


def test_candidates_validation_and_test_are_subject_disjoint():
  index = pd.DataFrame({
      'subject_id': np.repeat([f's{i}' for i in range(60)], 4),
      'site': np.repeat(list('ABCDE'), 48),
      'kl': np.tile([0, 1, 2, 3, 4, 2, 1, 0], 30)})
  cfg = load_config('active_learning').split
  split = split_recipes.make_splits(index, cfg)
  candidates, val, test = split.labeled, split.val, split.test
  assert not len(split.unlabeled)
  assert set(index.site.iloc[test]) == {'E'}
  subjects = [set(index.subject_id.iloc[rows]) for rows in
              (candidates, val, test)]
  assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2]
              or subjects[1] & subjects[2])
  assert len(candidates) + len(val) + len(test) == len(index)
  assert 0.1 < len(val) / (len(val) + len(candidates)) < 0.3  # 1 of 5 folds


def _smoke(data_root, **active):
  config = load_config('active_learning', 'smoke')
  config.data.root = data_root
  config.active.update(active)
  return config


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  data_root = str(tmp_path_factory.mktemp('data'))
  workdir = tmp_path_factory.mktemp('al')
  config = _smoke(data_root)
  curve = loop.run(config, workdir)
  return config, workdir, curve


def test_smoke_loop_labels_the_most_uncertain_and_writes_the_curve(smoke_run):
  config, workdir, curve = smoke_run
  a = config.active
  assert curve['n_labeled'].tolist() == list(range(a.n_init, a.budget + 1,
                                                   a.n_batch))
  assert curve.equals(pd.read_csv(workdir / loop.CURVE_CSV))
  assert (workdir / loop.CURVE_PNG).stat().st_size > 1000
  for r in range(len(curve)):
    rdir = workdir / f'round_{r:02d}'
    sets = json.loads((rdir / 'sets.json').read_text())
    rows = {k: set(v['rows']) for k, v in sets.items()}
    assert not (rows['labeled'] & rows['unlabeled'] or
                rows['labeled'] & rows['pool'] or
                rows['unlabeled'] & rows['pool'])
    record = json.loads((rdir / 'round.json').read_text())
    metrics = json.loads((rdir / 'metrics.json').read_text())['metrics']
    assert record['test']['balanced_accuracy'] == metrics['balanced_accuracy']
    if r + 1 < len(curve):
      # The queried knees are the top BALD scores of the unlabeled knees, and
      # they are what the next round adds.
      scores = pd.read_csv(rdir / 'scores.csv')
      assert set(scores['row']) == rows['unlabeled'] | rows['pool']
      top = scores.sort_values('bald', ascending=False, kind='stable')
      assert set(top['row'][:a.n_batch]) == set(record['queried']['rows'])
      assert set(scores['row'][scores['queried']]) == \
          set(record['queried']['rows'])
      following = json.loads(
          (workdir / f'round_{r + 1:02d}' / 'sets.json').read_text())
      assert set(following['labeled']['rows']) == \
          rows['labeled'] | set(record['queried']['rows'])


def test_killed_run_resumes_at_the_round_it_was_in(smoke_run, tmp_path):
  config, workdir, curve = smoke_run
  # What a kill early in round 1 leaves: the run's config, round 0 done,
  # round 1's sets saved.
  shutil.copy(workdir / 'config.json', tmp_path)
  shutil.copytree(workdir / 'round_00', tmp_path / 'round_00')
  (tmp_path / 'round_01').mkdir()
  shutil.copy(workdir / 'round_01' / 'sets.json', tmp_path / 'round_01')
  before = (tmp_path / 'round_00' / 'round.json').stat().st_mtime_ns
  resumed = loop.run(config, tmp_path)
  assert (tmp_path / 'round_00' / 'round.json').stat().st_mtime_ns == before
  pd.testing.assert_frame_equal(resumed, curve)
  for r in range(1, len(curve)):
    a = json.loads((workdir / f'round_{r:02d}' / 'round.json').read_text())
    b = json.loads((tmp_path / f'round_{r:02d}' / 'round.json').read_text())
    assert a == b


def test_curves_overlay_runs_with_the_full_data_line(smoke_run, tmp_path):
  from koajax.active import curves
  config, workdir, _ = smoke_run
  # A second run, as another acquisition would have written it.
  other = tmp_path / 'random'
  other.mkdir()
  shutil.copy(workdir / loop.CURVE_CSV, other)
  config = config.copy_and_resolve_references()
  config.active.acquisition, config.active.consistency = 'random', False
  (other / 'config.json').write_text(config.to_json())
  full = tmp_path / 'metrics.json'
  full.write_text(json.dumps({'metrics': {
      'balanced_accuracy': {'estimate': 0.5}, 'kappa': {'estimate': 0.6}}}))
  out = curves.overlay([workdir, other], full_data=full,
                       out=tmp_path / 'curves.png')
  assert out.stat().st_size > 5000
  with pytest.raises(FileNotFoundError, match='not a finished'):
    curves.overlay([tmp_path], out=tmp_path / 'x.png')


def test_a_round_evaluates_on_its_own_knees(smoke_run, tmp_path):
  from koajax import evaluate
  _, workdir, curve = smoke_run
  rdir = workdir / f'round_{len(curve) - 1:02d}'
  result = evaluate.evaluate(rdir, split='test', out=tmp_path)
  assert result['metrics'] == json.loads(
      (rdir / 'metrics.json').read_text())['metrics']
  evaluate.evaluate(rdir, split='labeled', checkpoint='latest',
                    out=tmp_path / 'labeled')
  labeled = pd.read_csv(tmp_path / 'labeled' / 'predictions.csv')
  sets = json.loads((rdir / 'sets.json').read_text())
  assert sorted(labeled['knee_id']) == sorted(sets['labeled']['knee_ids'])
