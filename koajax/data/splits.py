"""Subject-grouped data splits over a cache index.

Every function takes the cache index DataFrame (`Cache.index`: one row per
record, columns subject_id, site, kl, ...) and returns record indices into the
cache as sorted int64 NumPy arrays. A subject (patient) is never in two of
train / validation / test, since both knees and every visit of one person are
strongly correlated. Splits are deterministic given `seed`.

  subject_kfold           k folds stratified by knee KL, grouped by subject
  split_by_subject        one train/val/test split by integer ratios (2:1:1)
  labeled_unlabeled_pools the 25/75 labeled / unlabeled pools of Semixup
  semixup_setting         N labels per KL grade + k x labeled unlabeled knees
  held_out_site           one acquisition site as the test set
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import fractions

import numpy as np
import pandas as pd
from sklearn import model_selection

from koajax.data import schema

KL_GRADES = tuple(range(schema.GRADE_MAX['kl'] + 1))
_EMPTY = np.zeros(0, np.int64)


@dataclasses.dataclass(frozen=True)
class Split:
  """Record indices of one train / validation / test split."""
  train: np.ndarray
  val: np.ndarray = dataclasses.field(default_factory=_EMPTY.copy)
  test: np.ndarray = dataclasses.field(default_factory=_EMPTY.copy)


@dataclasses.dataclass(frozen=True)
class Pools:
  """Knees whose labels may be used, and knees used only as unlabeled data."""
  labeled: np.ndarray
  unlabeled: np.ndarray


@dataclasses.dataclass(frozen=True)
class SemiSupervisedSplit:
  """One fold of a semi-supervised setting.

  labeled: N knees per KL grade from the labeled pool's training subjects.
  unlabeled: knees from the unlabeled pool (their grades are never used).
  val: every graded knee of the labeled pool's validation subjects.
  """
  labeled: np.ndarray
  unlabeled: np.ndarray
  val: np.ndarray


def _rows(index: pd.DataFrame, rows: Sequence[int] | np.ndarray | None,
          graded_only: bool) -> np.ndarray:
  """The candidate record indices: `rows` (default all), optionally graded."""
  rows = (np.arange(len(index)) if rows is None
          else np.asarray(rows, np.int64))
  if graded_only:
    rows = rows[index['kl'].to_numpy()[rows] != schema.UNGRADED]
  return rows


def _grouped_folds(index: pd.DataFrame, rows: np.ndarray, n_splits: int,
                   seed: int) -> list[np.ndarray]:
  """Splits `rows` into n_splits subject-disjoint folds stratified by KL.

  Ungraded knees (KL -1) form their own stratum, so they too spread evenly.
  """
  n_subjects = index['subject_id'].iloc[rows].nunique()
  if n_subjects < n_splits:
    raise ValueError(f'cannot make {n_splits} subject-disjoint folds from '
                     f'{n_subjects} subjects')
  splitter = model_selection.StratifiedGroupKFold(
      n_splits=n_splits, shuffle=True, random_state=seed)
  kl = index['kl'].to_numpy()[rows]
  groups = index['subject_id'].to_numpy()[rows]
  return [np.sort(rows[held])
          for _, held in splitter.split(rows, kl, groups=groups)]


def _union(folds: Sequence[np.ndarray]) -> np.ndarray:
  return np.sort(np.concatenate([*folds, _EMPTY]))


def subject_kfold(index: pd.DataFrame, *, n_folds: int = 5, seed: int = 0,
                  rows: Sequence[int] | np.ndarray | None = None,
                  graded_only: bool = True) -> list[Split]:
  """k train/val splits; fold i validates on the i-th subject-disjoint part.

  Args:
    index: the cache index.
    n_folds: number of folds.
    seed: shuffles subjects before they are dealt into folds.
    rows: restrict to these record indices (default: all).
    graded_only: drop knees without a KL grade (they cannot be stratified or
      validated on).
  """
  folds = _grouped_folds(index, _rows(index, rows, graded_only), n_folds, seed)
  return [Split(train=_union(folds[:i] + folds[i + 1:]), val=folds[i])
          for i in range(n_folds)]


def split_by_subject(index: pd.DataFrame, *,
                     ratios: tuple[int, int, int] = (2, 1, 1), seed: int = 0,
                     rows: Sequence[int] | np.ndarray | None = None,
                     graded_only: bool = True) -> Split:
  """One train/val/test split in integer `ratios` (coherence 2:1:1, 7:1:2).

  The knees are dealt into sum(ratios) subject-disjoint KL-stratified parts,
  and consecutive parts are joined into train, val and test.
  """
  if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) < 2:
    raise ValueError(f'ratios must be 3 non-negative integers, got {ratios}')
  folds = _grouped_folds(index, _rows(index, rows, graded_only), sum(ratios),
                         seed)
  ends = np.cumsum(ratios)
  train, val, test = (_union(folds[lo:hi])
                      for lo, hi in zip((0, *ends[:2]), ends))
  return Split(train=train, val=val, test=test)


def labeled_unlabeled_pools(
    index: pd.DataFrame, *, labeled_fraction: float = 0.25, seed: int = 0,
    rows: Sequence[int] | np.ndarray | None = None) -> Pools:
  """Splits knees into labeled / unlabeled pools by subject, KL-stratified.

  The fraction is realised as whole folds (0.25 = 1 of 4 folds), so it must be
  a simple fraction.
  """
  frac = fractions.Fraction(labeled_fraction).limit_denominator(20)
  if not 0 < frac < 1 or abs(float(frac) - labeled_fraction) > 1e-6:
    raise ValueError(
        f'labeled_fraction must be a simple fraction in (0, 1) such as 0.25, '
        f'got {labeled_fraction}')
  folds = _grouped_folds(index, _rows(index, rows, graded_only=False),
                         frac.denominator, seed)
  return Pools(labeled=_union(folds[:frac.numerator]),
               unlabeled=_union(folds[frac.numerator:]))


def _sample_per_grade(index: pd.DataFrame, rows: np.ndarray, n_per_grade: int,
                      rng: np.random.Generator,
                      grades: Sequence[int] = KL_GRADES) -> np.ndarray:
  kl = index['kl'].to_numpy()[rows]
  chosen = []
  for grade in grades:
    candidates = rows[kl == grade]
    if len(candidates) < n_per_grade:
      raise ValueError(
          f'split.labels_per_grade={n_per_grade}, but KL {grade} has only '
          f'{len(candidates)} knees among the labeled training subjects; use '
          'fewer labels per grade or a larger split.labeled_fraction')
    chosen.append(rng.choice(candidates, n_per_grade, replace=False))
  return np.sort(np.concatenate([*chosen, _EMPTY]))


def semixup_setting(index: pd.DataFrame, *, n_per_grade: int,
                    unlabeled_factor: int, fold: int = 0, n_folds: int = 5,
                    seed: int = 0, labeled_fraction: float = 0.25,
                    pools: Pools | None = None,
                    qualifies: np.ndarray | None = None,
                    grades: Sequence[int] = KL_GRADES) -> SemiSupervisedSplit:
  """Semixup's "N labels per KL grade + k x as many unlabeled" setting.

  The pools are split by subject (`labeled_unlabeled_pools`), the labeled pool
  into `n_folds` subject-disjoint folds; fold `fold` is validation, and N knees
  of each KL grade in `grades` are drawn from the other folds. As in the
  reference code (unlabeled size = 5 x k x N), `unlabeled_factor` = k
  multiplies the number of labeled knees: k x 5N unlabeled knees are drawn
  from the unlabeled pool. `qualifies` (a mask over the index rows; default:
  KL graded) says which labeled-pool knees may train and validate.
  """
  if pools is None:
    pools = labeled_unlabeled_pools(index, labeled_fraction=labeled_fraction,
                                    seed=seed)
  rows = (pools.labeled if qualifies is None
          else pools.labeled[np.asarray(qualifies)[pools.labeled]])
  split = subject_kfold(index, n_folds=n_folds, seed=seed, rows=rows,
                        graded_only=qualifies is None)[fold]
  # One generator drawn in a fixed order keeps the sample deterministic.
  rng = np.random.default_rng([seed, fold])
  labeled = _sample_per_grade(index, split.train, n_per_grade, rng, grades)
  n_unlabeled = unlabeled_factor * len(labeled)
  if n_unlabeled > len(pools.unlabeled):
    raise ValueError(
        f'split.unlabeled_factor={unlabeled_factor} asks for {n_unlabeled} '
        f'unlabeled knees ({unlabeled_factor} x {len(labeled)} labeled); the '
        f'unlabeled pool has only {len(pools.unlabeled)}')
  unlabeled = np.sort(rng.choice(pools.unlabeled, n_unlabeled, replace=False))
  return SemiSupervisedSplit(labeled=labeled, unlabeled=unlabeled,
                             val=split.val)


def held_out_site(index: pd.DataFrame, *, test_site: str,
                  rows: Sequence[int] | np.ndarray | None = None,
                  graded_only: bool = False) -> Split:
  """Knees of `test_site` as test, all other sites' knees as train.

  A subject seen at the test site is dropped from train entirely, so a
  subject recorded at two sites cannot leak.
  """
  rows = _rows(index, rows, graded_only)
  site = index['site'].astype(str).to_numpy()[rows]
  if not (site == str(test_site)).any():
    raise ValueError(f'no knees from site {test_site!r}; sites are '
                     f'{sorted(set(site))}')
  test = rows[site == str(test_site)]
  subjects = index['subject_id'].to_numpy()
  test_subjects = np.unique(subjects[test])
  train = rows[~np.isin(subjects[rows], test_subjects)]
  return Split(train=np.sort(train), test=np.sort(test))
