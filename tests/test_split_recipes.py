"""Tests for koajax.data.split_recipes: leakage, qualifying knees, seeds,
agreement with the splits train and the active-learning loop made before,
and error messages."""

import numpy as np
import pandas as pd
import pytest

from koajax.data import split_recipes
from koajax.data import splits

NUM_SUBJECTS = 120
SITES = ('A', 'B', 'C', 'D', 'E')
OARSI = ('ost_fl', 'ost_fm', 'ost_tl', 'ost_tm', 'jsn_l', 'jsn_m')

# Small settings that the 120-subject index can satisfy.
SMALL = {
    'semixup': dict(labels_per_grade=2, unlabeled_factor=1,
                    labeled_fraction=0.5, num_folds=3, fold=1),
    'kfold': dict(num_folds=4, fold=1),
    'ratio': {},
    'held_out_site': dict(val_folds=4),
    'active_learning': dict(val_folds=4),
}
# (recipe, test_site) pairs covering every recipe, with and without a site.
CASES = [('semixup', 'E'), ('semixup', ''), ('kfold', 'E'), ('kfold', ''),
         ('ratio', ''), ('held_out_site', 'E'), ('held_out_site', 'B'),
         ('active_learning', 'E'), ('active_learning', '')]
PARTS = ('labeled', 'unlabeled', 'val', 'test')


def _index(seed: int = 0) -> pd.DataFrame:
  """A cache-like index: 1-3 visits x 2 knees per subject, KL correlated
  within a subject, ~8% ungraded; some subjects change site at a later
  visit, so a subject can be seen at the test site and elsewhere."""
  rng = np.random.default_rng(seed)
  rows = []
  for s in range(NUM_SUBJECTS):
    base = rng.choice(5, p=[0.3, 0.2, 0.2, 0.15, 0.15])
    home = s % len(SITES)
    moves = rng.random() < 0.1
    for visit in range(int(rng.integers(1, 4))):
      site = SITES[(home + 1) % len(SITES)] if moves and visit else SITES[home]
      for side in ('R', 'L'):
        kl = int(np.clip(base + rng.integers(-1, 2), 0, 4))
        if rng.random() < 0.08:
          kl = -1
        oarsi = {c: int(rng.integers(0, 4)) if rng.random() > 0.1 else -1
                 for c in OARSI}
        rows.append({'subject_id': f'S{s:04d}', 'visit': 12 * visit,
                     'side': side, 'site': site, 'kl': kl, **oarsi,
                     'knee_id': f'S{s:04d}_{12 * visit}_{side}'})
  return pd.DataFrame(rows)


@pytest.fixture(scope='module')
def index() -> pd.DataFrame:
  frame = _index()
  # The fixture must exercise the cases the recipes guard against.
  movers = frame.groupby('subject_id')['site'].nunique() > 1
  assert movers.sum() >= 3
  assert (frame['kl'] == -1).sum() >= 10
  assert ((frame['kl'] == -1) & (frame['ost_fl'] >= 0)).sum() >= 10
  return frame


def _cfg(recipe, test_site, **overrides):
  return split_recipes.split_config(
      recipe, **{**SMALL[recipe], 'test_site': test_site, **overrides})


def _subjects(index, rows) -> set[str]:
  return set(index['subject_id'].to_numpy()[rows])


def _kl_in(index, grades) -> np.ndarray:
  return index['kl'].isin(grades).to_numpy()


def _check_invariants(index, s, q, test_is_val=False):
  """Subject-disjoint sets of distinct, sorted rows; L, val, test qualify."""
  for name in PARTS:
    rows = getattr(s, name)
    assert rows.dtype == np.int64, name
    assert np.all(np.diff(rows) > 0), f'{name} not sorted or repeats a row'
    assert len(rows) == 0 or (rows[0] >= 0 and rows[-1] < len(index))
  for name in ('labeled', 'val', 'test'):
    assert q[getattr(s, name)].all(), f'{name} has a non-qualifying knee'
  assert len(s.labeled) and len(s.val)
  parts = [s.labeled, s.unlabeled, s.val] + ([] if test_is_val else [s.test])
  together = np.concatenate(parts)
  assert len(np.unique(together)) == len(together), 'a row in two sets'
  groups = [_subjects(index, np.concatenate([s.labeled, s.unlabeled])),
            _subjects(index, s.val)]
  if test_is_val:
    np.testing.assert_array_equal(s.test, s.val)
  else:
    groups.append(_subjects(index, s.test))
  for i, a in enumerate(groups):
    for b in groups[i + 1:]:
      assert not a & b, 'a subject in two of train, val and test'


def _has_test(recipe, test_site):
  return bool(test_site) or recipe in ('ratio', 'active_learning')


@pytest.mark.parametrize('recipe,test_site', CASES)
def test_sets_are_disjoint_and_qualify(index, recipe, test_site):
  s = split_recipes.make_splits(index, _cfg(recipe, test_site))
  graded = index['kl'].to_numpy() >= 0
  test_is_val = recipe == 'active_learning' and not test_site
  _check_invariants(index, s, graded, test_is_val)
  assert bool(len(s.test)) == _has_test(recipe, test_site)
  if test_site:
    sites = index['site'].to_numpy()
    assert (sites[s.test] == test_site).all()
    # Every graded knee of the site is tested on.
    assert len(s.test) == (graded & (sites == test_site)).sum()


@pytest.mark.parametrize('recipe,test_site', CASES)
def test_custom_qualifies_is_respected(index, recipe, test_site):
  q = _kl_in(index, [0, 2])
  s = split_recipes.make_splits(index, _cfg(recipe, test_site), qualifies=q)
  _check_invariants(index, s, q, recipe == 'active_learning' and not test_site)
  kl = index['kl'].to_numpy()
  assert set(kl[np.concatenate([s.labeled, s.val, s.test])]) == {0, 2}
  if recipe == 'semixup':
    # N labels of each of the task's grades, none of the others.
    n = SMALL['semixup']['labels_per_grade']
    assert sorted(kl[s.labeled]) == [0] * n + [2] * n
    assert len(s.unlabeled) == SMALL['semixup']['unlabeled_factor'] * 2 * n
  if recipe in ('kfold', 'ratio', 'held_out_site'):
    assert len(s.unlabeled) and not q[s.unlabeled].any()


@pytest.mark.parametrize('recipe,test_site', CASES)
def test_deterministic_for_a_seed(index, recipe, test_site):
  a, b, c = (split_recipes.make_splits(index,
                                       _cfg(recipe, test_site, seed=seed))
             for seed in (3, 3, 4))
  for name in PARTS:
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert any(not np.array_equal(getattr(a, name), getattr(c, name))
             for name in PARTS)


def test_rows_are_positions_not_dataframe_labels(index):
  shifted = index.set_axis(np.arange(len(index))[::-1] + 1000)
  for recipe, test_site in CASES:
    a = split_recipes.make_splits(index, _cfg(recipe, test_site))
    b = split_recipes.make_splits(shifted, _cfg(recipe, test_site))
    for name in PARTS:
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# --------------------------------------------------------------------------
# The splits of train.make_splits and loop.candidate_split, as they were
# made before the recipes existed.


def _train_make_splits(index, cfg):
  rest = np.arange(len(index))
  test = np.zeros(0, np.int64)
  if cfg.test_site:
    held_out = splits.held_out_site(index, test_site=cfg.test_site,
                                    graded_only=True)
    rest, test = held_out.train, held_out.test
  pools = splits.labeled_unlabeled_pools(
      index, labeled_fraction=cfg.labeled_fraction, seed=cfg.seed, rows=rest)
  setting = splits.semixup_setting(
      index, n_per_grade=cfg.labels_per_grade,
      unlabeled_factor=cfg.unlabeled_factor, fold=cfg.fold,
      n_folds=cfg.num_folds, seed=cfg.seed, pools=pools)
  return setting.labeled, setting.unlabeled, setting.val, test


def _loop_candidate_split(index, cfg):
  rows = None
  test = None
  if cfg.test_site:
    held_out = splits.held_out_site(index, test_site=cfg.test_site,
                                    graded_only=True)
    rows, test = held_out.train, held_out.test
  fold = splits.subject_kfold(index, n_folds=cfg.val_folds, seed=cfg.seed,
                              rows=rows)[0]
  return fold.train, fold.val, fold.val if test is None else test


@pytest.mark.parametrize('test_site,fold,seed,fraction', [
    ('E', 0, 0, 0.5), ('E', 2, 5, 0.5), ('', 1, 1, 0.5), ('C', 0, 2, 0.5),
    ('', 0, 7, 0.25)])
def test_semixup_is_what_train_made(index, test_site, fold, seed, fraction):
  cfg = _cfg('semixup', test_site, fold=fold, seed=seed,
             labeled_fraction=fraction,
             labels_per_grade=1 if fraction == 0.25 else 2)
  s = split_recipes.make_splits(index, cfg)
  expected = _train_make_splits(index, cfg)
  for name, rows in zip(PARTS, expected):
    np.testing.assert_array_equal(getattr(s, name), rows, err_msg=name)
  # An explicit default mask gives the same, as long as every grade occurs.
  t = split_recipes.make_splits(index, cfg,
                                qualifies=index['kl'].to_numpy() >= 0)
  for name in PARTS:
    np.testing.assert_array_equal(getattr(s, name), getattr(t, name))


@pytest.mark.parametrize('test_site,seed,val_folds', [
    ('E', 0, 5), ('', 0, 5), ('A', 3, 4), ('', 9, 8)])
def test_active_learning_is_what_the_loop_made(index, test_site, seed,
                                               val_folds):
  cfg = _cfg('active_learning', test_site, seed=seed, val_folds=val_folds)
  s = split_recipes.make_splits(index, cfg)
  candidates, val, test = _loop_candidate_split(index, cfg)
  np.testing.assert_array_equal(s.labeled, candidates)
  np.testing.assert_array_equal(s.val, val)
  np.testing.assert_array_equal(s.test, test)
  assert s.unlabeled.dtype == np.int64 and len(s.unlabeled) == 0


def test_config_without_recipe_is_semixup(index):
  cfg = _cfg('semixup', 'E')
  old = cfg.copy_and_resolve_references()
  del old['recipe']
  a = split_recipes.make_splits(index, cfg)
  b = split_recipes.make_splits(index, old)
  for name in PARTS:
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  # An active-learning config without recipe is read as semixup, which
  # needs fields it lacks.
  al = _cfg('active_learning', 'E')
  del al['recipe']
  with pytest.raises(ValueError, match=r'split\.labels_per_grade'):
    split_recipes.make_splits(index, al)


# --------------------------------------------------------------------------
# What each recipe puts where.


def _remaining(index, q, test_site):
  """(test, rest): the qualifying knees of the site, and the qualifying
  knees of subjects with no qualifying knee there."""
  sites = index['site'].to_numpy()
  subjects = index['subject_id'].to_numpy()
  if not test_site:
    return np.zeros(0, np.int64), np.flatnonzero(q)
  test = np.flatnonzero(q & (sites == test_site))
  rest = q & ~np.isin(subjects, subjects[test])
  return test, np.flatnonzero(rest)


@pytest.mark.parametrize('test_site', ['E', ''])
def test_kfold_folds_partition_the_remaining_qualifying_knees(index,
                                                              test_site):
  # An OARSI mask qualifies knees without KL too; they must be used.
  q = index['ost_fl'].to_numpy() >= 0
  test, rest = _remaining(index, q, test_site)
  vals = []
  for fold in range(4):
    s = split_recipes.make_splits(
        index, _cfg('kfold', test_site, fold=fold), qualifies=q)
    _check_invariants(index, s, q)
    np.testing.assert_array_equal(s.test, test)
    np.testing.assert_array_equal(np.union1d(s.labeled, s.val), rest)
    vals.append(s.val)
  np.testing.assert_array_equal(np.sort(np.concatenate(vals)), rest)
  assert (index['kl'].to_numpy()[rest] == -1).any()


@pytest.mark.parametrize('recipe,test_site', [
    ('kfold', 'E'), ('kfold', ''), ('ratio', ''), ('held_out_site', 'E')])
def test_unlabeled_are_non_qualifying_knees_of_training_subjects(
    index, recipe, test_site):
  q = _kl_in(index, [0, 2, 3])
  s = split_recipes.make_splits(index, _cfg(recipe, test_site), qualifies=q)
  subjects = index['subject_id'].to_numpy()
  sites = index['site'].to_numpy()
  held = subjects[np.concatenate([s.val, s.test])]
  expected = ~q & ~np.isin(subjects, held) & (sites != test_site)
  np.testing.assert_array_equal(s.unlabeled, np.flatnonzero(expected))


def test_held_out_site_uses_every_qualifying_knee(index):
  q = _kl_in(index, [1, 4])
  test, rest = _remaining(index, q, 'D')
  s = split_recipes.make_splits(index, _cfg('held_out_site', 'D'),
                                qualifies=q)
  np.testing.assert_array_equal(s.test, test)
  np.testing.assert_array_equal(np.union1d(s.labeled, s.val), rest)
  # 1/val_folds of the subjects validate.
  share = len(_subjects(index, s.val)) / len(_subjects(index, rest))
  assert 0.15 < share < 0.35


@pytest.mark.parametrize('ratios', [(2, 1, 1), (7, 1, 2), (3, 1, 0)])
def test_ratio_splits_qualifying_subjects_by_ratio(index, ratios):
  q = _kl_in(index, [0, 2])
  s = split_recipes.make_splits(index, _cfg('ratio', '', ratios=ratios),
                                qualifies=q)
  all_q = np.flatnonzero(q)
  np.testing.assert_array_equal(
      np.sort(np.concatenate([s.labeled, s.val, s.test])), all_q)
  n = len(_subjects(index, all_q))
  for rows, r in zip((s.labeled, s.val, s.test), ratios):
    assert abs(len(_subjects(index, rows)) / n - r / sum(ratios)) < 0.06


def test_ratio_withholds_grades_of_a_share_and_of_the_training_subjects(
    index):
  q = index['kl'].to_numpy() >= 0
  plain = split_recipes.make_splits(index, _cfg('ratio', ''), qualifies=q)
  # The fields at their defaults are the recipe without them.
  same = split_recipes.make_splits(
      index, _cfg('ratio', '', unlabeled_ratio=0, label_fraction=1.0),
      qualifies=q)
  for name in PARTS:
    np.testing.assert_array_equal(getattr(same, name), getattr(plain, name))
  s = split_recipes.make_splits(
      index, _cfg('ratio', '', unlabeled_ratio=4, label_fraction=0.5),
      qualifies=q)
  _check_invariants(index, s, q)
  n = len(_subjects(index, np.flatnonzero(q)))
  # 2:1:1:4 of the subjects, half of the training ones keep their grades.
  for rows, share in ((s.val, 1 / 8), (s.test, 1 / 8), (s.labeled, 1 / 8)):
    assert abs(len(_subjects(index, rows)) / n - share) < 0.06
  withheld = np.setdiff1d(np.flatnonzero(q),
                          np.concatenate([s.labeled, s.val, s.test]))
  np.testing.assert_array_equal(np.intersect1d(s.unlabeled, withheld),
                                withheld)
  assert abs(len(_subjects(index, withheld)) / n - 5 / 8) < 0.06


@pytest.mark.parametrize('overrides,pattern', [
    (dict(unlabeled_ratio=-1), r'split\.unlabeled_ratio.*>= 0'),
    (dict(unlabeled_ratio=1.5), r'split\.unlabeled_ratio'),
    (dict(label_fraction=0.0), r'split\.label_fraction.*\(0, 1\]'),
    (dict(label_fraction=0.3141), r'split\.label_fraction'),
    (dict(label_fraction=1.5), r'split\.label_fraction'),
])
def test_bad_withholding_fields_are_named(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    split_recipes.split_config('ratio', **overrides)
  with pytest.raises(ValueError, match=r'split\.label_fraction is not a field'):
    split_recipes.split_config('kfold', label_fraction=0.2)


def test_split_config_defaults_and_overrides():
  expected = {
      'semixup': dict(seed=0, test_site='E', labels_per_grade=100,
                      unlabeled_factor=2, labeled_fraction=0.25,
                      num_folds=5, fold=0),
      'kfold': dict(seed=0, test_site='', num_folds=5, fold=0),
      'ratio': dict(seed=0, test_site='', ratios=(2, 1, 1)),
      'held_out_site': dict(seed=0, test_site='E', val_folds=5),
      'active_learning': dict(seed=0, test_site='E', val_folds=5),
  }
  assert tuple(expected) == split_recipes.RECIPES
  for recipe, fields in expected.items():
    cfg = split_recipes.split_config(recipe)
    assert cfg.to_dict() == {'recipe': recipe, **fields}
  cfg = split_recipes.split_config('kfold', num_folds=10, fold=9, seed=4)
  assert (cfg.recipe, cfg.num_folds, cfg.fold, cfg.seed) == ('kfold', 10, 9, 4)


# --------------------------------------------------------------------------
# Errors.


def test_unknown_recipe_names_the_field_and_choices(index):
  with pytest.raises(ValueError, match=r'split\.recipe.*active_learning'):
    split_recipes.split_config('semi')
  cfg = split_recipes.split_config('kfold')
  cfg.recipe = 'folds'
  with pytest.raises(ValueError, match=r"split\.recipe.*kfold.*'folds'"):
    split_recipes.make_splits(index, cfg)


def test_unknown_override_names_the_field():
  with pytest.raises(ValueError, match=r'split\.val_folds.*semixup'):
    split_recipes.split_config('semixup', val_folds=3)
  with pytest.raises(ValueError, match=r'split\.labels_per_grade'):
    split_recipes.split_config('kfold', labels_per_grade=3)


@pytest.mark.parametrize('recipe,field', [
    (recipe, field) for recipe in split_recipes.RECIPES
    for field in split_recipes.split_config(recipe).keys()
    if field != 'recipe' and (recipe, field) != ('ratio', 'test_site')])
def test_missing_field_is_named(index, recipe, field):
  cfg = _cfg(recipe, '' if recipe != 'held_out_site' else 'E')
  del cfg[field]
  with pytest.raises(ValueError, match=rf'split\.{field} is missing'):
    split_recipes.make_splits(index, cfg)


def test_ratio_may_leave_test_site_out(index):
  cfg = _cfg('ratio', '')
  del cfg['test_site']
  s = split_recipes.make_splits(index, cfg)
  np.testing.assert_array_equal(
      s.test, split_recipes.make_splits(index, _cfg('ratio', '')).test)


@pytest.mark.parametrize('recipe,overrides,pattern', [
    ('semixup', dict(fold=3), r'split\.fold.*\[0, split\.num_folds\) = '
                              r'\[0, 3\).*3'),
    ('kfold', dict(fold=-1), r'split\.fold.*\[0, 4\)'),
    ('kfold', dict(num_folds=1, fold=0), r'split\.num_folds.*>= 2'),
    ('semixup', dict(labels_per_grade=0), r'split\.labels_per_grade.*>= 1'),
    ('semixup', dict(labels_per_grade=2.5), r'split\.labels_per_grade'),
    ('semixup', dict(unlabeled_factor=-1), r'split\.unlabeled_factor.*>= 0'),
    ('semixup', dict(labeled_fraction=1.0), r'split\.labeled_fraction.*0, 1'),
    ('semixup', dict(labeled_fraction=0.3141), r'split\.labeled_fraction'),
    ('ratio', dict(ratios=(2, 1)), r'split\.ratios.*3 non-negative'),
    ('ratio', dict(ratios=(2, -1, 1)), r'split\.ratios.*3 non-negative'),
    ('ratio', dict(ratios=(2.5, 1, 1)), r'split\.ratios.*integers'),
    ('ratio', dict(ratios=(0, 1, 1)), r'split\.ratios.*train >= 1'),
    ('ratio', dict(test_site='E'), r"split\.test_site.*''.*'ratio'"),
    ('held_out_site', dict(test_site=''), r'split\.test_site.*name a site'),
    ('held_out_site', dict(val_folds=1), r'split\.val_folds.*>= 2'),
    ('active_learning', dict(val_folds=True), r'split\.val_folds'),
    ('kfold', dict(seed=-1), r'split\.seed.*>= 0'),
    ('kfold', dict(test_site=None), r'split\.test_site'),
])
def test_bad_values_name_the_field(index, recipe, overrides, pattern):
  # split_config rejects them at once, make_splits on a config edited later.
  with pytest.raises(ValueError, match=pattern):
    split_recipes.split_config(recipe, **{**SMALL[recipe], **overrides})
  cfg = _cfg(recipe, 'E' if recipe == 'held_out_site' else '')
  with cfg.unlocked():
    for name, value in overrides.items():
      del cfg[name]
      cfg[name] = value
  with pytest.raises(ValueError, match=pattern):
    split_recipes.make_splits(index, cfg)


def test_data_dependent_errors_name_the_field(index):
  with pytest.raises(ValueError, match=r"split\.test_site='F'.*\['A'"):
    split_recipes.make_splits(index, _cfg('kfold', 'F'))
  # Site E has knees, but none that qualify.
  q = _kl_in(index, [0, 2]) & (index['site'].to_numpy() != 'E')
  with pytest.raises(ValueError, match=r"split\.test_site='E'"):
    split_recipes.make_splits(index, _cfg('held_out_site', 'E'), qualifies=q)
  with pytest.raises(ValueError, match=r'split\.labels_per_grade=500'):
    split_recipes.make_splits(index, _cfg('semixup', 'E',
                                          labels_per_grade=500))
  with pytest.raises(ValueError, match=r'split\.unlabeled_factor=50'):
    split_recipes.make_splits(index, _cfg('semixup', 'E',
                                          unlabeled_factor=50))


def test_qualifies_must_be_a_mask_of_every_row(index):
  cfg = _cfg('kfold', '')
  graded = index['kl'].to_numpy() >= 0
  with pytest.raises(ValueError, match=rf'qualifies.*{len(index)}'):
    split_recipes.make_splits(index, cfg, qualifies=graded[:-1])
  with pytest.raises(ValueError, match='qualifies'):
    split_recipes.make_splits(index, cfg, qualifies=graded.astype(int))
