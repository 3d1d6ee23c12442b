"""Tests for koajax.data.splits: leakage, stratification, determinism."""

import numpy as np
import pandas as pd
import pytest

from koajax.data import splits

NUM_SUBJECTS = 400
SITES = ('A', 'B', 'C', 'D', 'E')


def _index(seed: int = 0) -> pd.DataFrame:
  """A cache-like index: 1-4 knees per subject, KL correlated within subject."""
  rng = np.random.default_rng(seed)
  rows = []
  for s in range(NUM_SUBJECTS):
    base = rng.choice(5, p=[0.4, 0.2, 0.2, 0.15, 0.05])
    site = SITES[s % len(SITES)]
    for visit in range(rng.integers(1, 3)):
      for side in ('R', 'L'):
        kl = int(np.clip(base + rng.integers(-1, 2), 0, 4))
        if rng.random() < 0.05:
          kl = -1
        rows.append({'subject_id': f'S{s:04d}', 'visit': visit, 'side': side,
                     'site': site, 'kl': kl})
  return pd.DataFrame(rows)


@pytest.fixture(scope='module')
def index() -> pd.DataFrame:
  return _index()


def _subjects(index, rows) -> set[str]:
  return set(index['subject_id'].to_numpy()[rows])


def _kl_hist(index, rows) -> np.ndarray:
  kl = index['kl'].to_numpy()[rows]
  return np.bincount(kl[kl >= 0], minlength=5) / max((kl >= 0).sum(), 1)


def _assert_subject_disjoint(index, *parts):
  for i, a in enumerate(parts):
    for b in parts[i + 1:]:
      assert not _subjects(index, a) & _subjects(index, b)


def test_kfold_is_a_subject_disjoint_partition_of_graded_knees(index):
  folds = splits.subject_kfold(index, n_folds=5, seed=3)
  graded = np.flatnonzero(index['kl'] >= 0)
  vals = [f.val for f in folds]
  np.testing.assert_array_equal(np.sort(np.concatenate(vals)), graded)
  _assert_subject_disjoint(index, *vals)
  for fold in folds:
    _assert_subject_disjoint(index, fold.train, fold.val)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([fold.train, fold.val])), graded)
    assert fold.train.dtype == np.int64 and len(fold.test) == 0


def test_kfold_stratifies_kl(index):
  overall = _kl_hist(index, np.arange(len(index)))
  for fold in splits.subject_kfold(index, n_folds=5, seed=0):
    np.testing.assert_allclose(_kl_hist(index, fold.val), overall, atol=0.03)


def test_splits_are_deterministic_by_seed(index):
  a = splits.subject_kfold(index, seed=1)
  b = splits.subject_kfold(index, seed=1)
  c = splits.subject_kfold(index, seed=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.val, y.val)
  assert any(not np.array_equal(x.val, z.val) for x, z in zip(a, c))
  s1 = splits.semixup_setting(index, n_per_grade=5, unlabeled_factor=2, seed=4)
  s2 = splits.semixup_setting(index, n_per_grade=5, unlabeled_factor=2, seed=4)
  for name in ('labeled', 'unlabeled', 'val'):
    np.testing.assert_array_equal(getattr(s1, name), getattr(s2, name))


def test_split_by_subject_ratios(index):
  split = splits.split_by_subject(index, ratios=(2, 1, 1), seed=0)
  _assert_subject_disjoint(index, split.train, split.val, split.test)
  n = (index['kl'] >= 0).sum()
  assert len(split.train) + len(split.val) + len(split.test) == n
  np.testing.assert_allclose(
      [len(split.train) / n, len(split.val) / n, len(split.test) / n],
      [0.5, 0.25, 0.25], atol=0.03)


def test_pools_split_subjects_25_75(index):
  pools = splits.labeled_unlabeled_pools(index, seed=0)
  _assert_subject_disjoint(index, pools.labeled, pools.unlabeled)
  np.testing.assert_array_equal(
      np.sort(np.concatenate([pools.labeled, pools.unlabeled])),
      np.arange(len(index)))
  assert abs(len(pools.labeled) / len(index) - 0.25) < 0.03
  np.testing.assert_allclose(_kl_hist(index, pools.labeled),
                             _kl_hist(index, pools.unlabeled), atol=0.03)
  with pytest.raises(ValueError, match='simple fraction'):
    splits.labeled_unlabeled_pools(index, labeled_fraction=0.123456)


def test_semixup_setting_counts_and_leakage(index):
  pools = splits.labeled_unlabeled_pools(index, seed=0)
  s = splits.semixup_setting(index, n_per_grade=6, unlabeled_factor=3, fold=2,
                             seed=0, pools=pools)
  kl = index['kl'].to_numpy()
  np.testing.assert_array_equal(np.bincount(kl[s.labeled], minlength=5),
                                [6] * 5)
  assert len(s.unlabeled) == 3 * 5 * 6
  assert len(np.unique(s.labeled)) == len(s.labeled)
  assert len(np.unique(s.unlabeled)) == len(s.unlabeled)
  assert set(s.labeled) <= set(pools.labeled)
  assert set(s.val) <= set(pools.labeled)
  assert set(s.unlabeled) <= set(pools.unlabeled)
  _assert_subject_disjoint(index, s.labeled, s.val, s.unlabeled)
  assert (kl[s.val] >= 0).all()


def test_semixup_setting_says_how_many_knees_a_grade_has(index):
  pools = splits.labeled_unlabeled_pools(index, seed=0)
  train = splits.subject_kfold(index, rows=pools.labeled)[0].train
  n_kl4 = (index['kl'].to_numpy()[train] == 4).sum()
  with pytest.raises(ValueError, match=f'KL 4 has only {n_kl4} knees'):
    splits.semixup_setting(index, n_per_grade=n_kl4 + 1, unlabeled_factor=1,
                           pools=pools)
  with pytest.raises(ValueError, match='unlabeled pool has only'):
    splits.semixup_setting(index, n_per_grade=5, unlabeled_factor=1000,
                           pools=pools)


def test_held_out_site(index):
  split = splits.held_out_site(index, test_site='E')
  site = index['site'].to_numpy()
  assert (site[split.test] == 'E').all()
  assert (site[split.train] != 'E').all()
  assert len(split.train) + len(split.test) == len(index)
  # A subject re-imaged at the test site must leave train altogether.
  moved = index.copy()
  moved.loc[moved.index[0], 'site'] = 'E'
  split = splits.held_out_site(moved, test_site='E')
  _assert_subject_disjoint(moved, split.train, split.test)
  assert len(split.train) + len(split.test) < len(moved)
  with pytest.raises(ValueError, match="no knees from site 'Z'"):
    splits.held_out_site(index, test_site='Z')
