"""A run's data splits, made by a recipe named in its config.

`make_splits(index, config.split)` turns the cache index into the four sets a
run uses: labeled knees (grades used), unlabeled knees (images only), val
(model selection) and test. `config.split.recipe` picks how:

  semixup          held-out test site; labeled / unlabeled pools by subject;
                   N labels per KL grade and k x as many unlabeled knees
                   (Semixup's setting, as koajax.train made it)
  kfold            held-out test site or none; one fold of k subject-grouped
                   KL-stratified folds validates, the others are labeled
  ratio            one train:val:test split by subject (e.g. 2:1:1),
                   optionally with a share of subjects whose grades are
                   withheld (`unlabeled_ratio`) and only a fraction of the
                   training subjects' grades used (`label_fraction`)
  held_out_site    held-out test site; 1/val_folds of the other subjects
                   validate, the rest is labeled
  active_learning  the active-learning candidates (labeled), val and test,
                   as koajax.active.loop made them

`split_config(recipe, **overrides)` returns the fields a recipe reads, with
their defaults. A config without `recipe` (saved before the field existed) is
a 'semixup' one.

`qualifies` is a boolean mask over the index rows: the knees the run's task
can use as labeled, val or test knees (default: those with a KL grade; e.g. a
KL 0 vs KL 2 task qualifies only KL 0 and 2). Labeled, val and test rows
always qualify; unlabeled rows may be any knee. A subject is never in two of
labeled-or-unlabeled, val and test, since both knees and every visit of one
person are strongly correlated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import fractions
import math
import numbers
from typing import Any

import ml_collections
import numpy as np
import pandas as pd

from koajax.data import splits as splits_lib

RECIPES = ('semixup', 'kfold', 'ratio', 'held_out_site', 'active_learning')
DEFAULT_RECIPE = 'semixup'  # what a config without `recipe` means

# The fields each recipe reads, with their defaults (those of config_lib's
# Semixup-family and active-learning configs where those have the field).
_FIELDS: dict[str, dict[str, Any]] = {
    'semixup': {
        'seed': 0,
        'test_site': 'E',  # '' = no test set
        'labels_per_grade': 100,
        'unlabeled_factor': 2,  # unlabeled = factor x labeled knees
        'labeled_fraction': 0.25,  # of the subjects, in the labeled pool
        'num_folds': 5,  # of the labeled pool; fold `fold` validates
        'fold': 0,
    },
    'kfold': {
        'seed': 0,
        'test_site': '',
        'num_folds': 5,
        'fold': 0,
    },
    'ratio': {
        'seed': 0,
        'test_site': '',  # must stay '': the ratio makes the test set
        'ratios': (2, 1, 1),  # train:val:test
    },
    'held_out_site': {
        'seed': 0,
        'test_site': 'E',
        'val_folds': 5,  # 1/val_folds of the other subjects validate
    },
    'active_learning': {
        'seed': 0,
        'test_site': 'E',  # '' = test on val
        'val_folds': 5,
    },
}
# Fields a recipe reads only to reject a value, so a config may leave them
# out: ratio checks test_site because a config switched to it from a
# held-out-site recipe would otherwise silently ignore the site.
_OPTIONAL = {'ratio': ('test_site',)}
assert tuple(_FIELDS) == RECIPES
# Fields a recipe reads with these defaults when a config leaves them out
# (configs written before they existed); `split_config` adds them only when
# given, so those configs and their saved runs stay as they were.
_EXTRA: dict[str, dict[str, Any]] = {
    'ratio': {
        # Subjects whose every knee joins the unlabeled pool, grades
        # withheld, in the units of `ratios`: (2, 1, 1) with 4 deals the
        # subjects 2:1:1:4 into train, val, test and unlabeled.
        'unlabeled_ratio': 0,
        # Of the training subjects, the share whose grades are used (a
        # simple fraction: 0.2 = 1 of 5 subject-grouped, KL-stratified
        # folds); the other training subjects' knees join the unlabeled
        # pool.
        'label_fraction': 1.0,
    },
}

_EMPTY = np.zeros(0, np.int64)


@dataclasses.dataclass(frozen=True)
class Splits:
  """Cache rows of a run's sets, each a sorted int64 array."""
  labeled: np.ndarray
  unlabeled: np.ndarray
  val: np.ndarray
  test: np.ndarray


def split_config(recipe: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The `config.split` of `recipe`: its fields with defaults, `overrides` set.

  Raises:
    ValueError: unknown recipe, a field the recipe does not read, or a bad
      value.
  """
  _check_recipe(recipe)
  fields = _FIELDS[recipe]
  unknown = sorted(set(overrides) - set(fields) - set(_EXTRA.get(recipe, {})))
  if unknown:
    raise ValueError(
        f'split.{unknown[0]} is not a field of the {recipe!r} split recipe; '
        f'its fields are {", ".join(f"split.{f}" for f in fields)}')
  cfg = ml_collections.ConfigDict({'recipe': recipe, **fields, **overrides})
  _settings(cfg, recipe)  # fail here rather than when a run starts
  return cfg


def make_splits(index: pd.DataFrame, cfg: ml_collections.ConfigDict | Mapping,
                *, qualifies: np.ndarray | None = None) -> Splits:
  """The labeled / unlabeled / val / test rows of `index` by `cfg.recipe`.

  Args:
    index: the cache index (columns subject_id, site, kl, ...).
    cfg: the run's `config.split`.
    qualifies: boolean mask over the rows of `index`: the knees the task can
      use as labeled, val or test knees. Default: `index.kl >= 0`. The
      semixup recipe draws N labels of every KL grade by default, else of
      each KL grade among the qualifying knees.

  Raises:
    ValueError: unknown recipe, a missing field or a bad value (the message
      names the `split.` field), or `qualifies` not a mask of len(index).
  """
  recipe = cfg['recipe'] if 'recipe' in cfg else DEFAULT_RECIPE
  _check_recipe(recipe)
  values = _settings(cfg, recipe)
  q = _qualifying(index, qualifies)
  if recipe == 'semixup':
    grades = (splits_lib.KL_GRADES if qualifies is None
              else _grades(index, q))
    return _semixup(index, q, grades, **values)
  return _RECIPE_FNS[recipe](index, q, **values)


# Fields a recipe may shrink to fit a dataset smaller than the paper's
# (`fit`), in the order they are tried: the one setting that depends on the
# data's size, while the ratios that define the method stay the paper's.
_SHRINKABLE = {'semixup': ('labels_per_grade', 'unlabeled_factor')}


@dataclasses.dataclass(frozen=True)
class Adaptation:
  """A split field changed to fit the data: its value as given, as used and
  why."""
  field: str
  given: Any
  used: Any
  why: str


def fit(index: pd.DataFrame, cfg: ml_collections.ConfigDict | Mapping, *,
        qualifies: np.ndarray | None = None
        ) -> tuple[dict[str, Any], list[Adaptation]]:
  """`cfg`'s fields, with the recipe's size settings lowered as little as
  needed for `make_splits` to succeed on `index`, and what was changed.

  Raises the recipe's ValueError when no smaller setting fits either (or the
  failure is not about size).
  """
  values = dict(cfg)
  try:
    make_splits(index, values, qualifies=qualifies)
    return values, []
  except ValueError as e:
    first_error = e
  recipe = values.get('recipe', DEFAULT_RECIPE)
  changes = []
  for name in _SHRINKABLE.get(recipe, ()):
    lo, hi = (1 if name == 'labels_per_grade' else 0), values[name] - 1

    def error(v, name=name):
      try:
        make_splits(index, {**values, name: v}, qualifies=qualifies)
        return None
      except ValueError as e:
        return e

    def works(v):
      return error(v) is None

    if hi < lo or not works(lo):
      continue
    while lo < hi:  # the largest value that works
      mid = (lo + hi + 1) // 2
      lo, hi = (mid, hi) if works(mid) else (lo, mid - 1)
    # Why: what stops the next larger value.
    changes.append(Adaptation(f'split.{name}', values[name], lo,
                              str(error(lo + 1)).split('; ')[0]))
    values[name] = lo
    return values, changes
  raise first_error


# --------------------------------------------------------------------------
# Configs.


def check(cfg: ml_collections.ConfigDict | Mapping) -> None:
  """Raises ValueError naming the first `split.` field that cannot work."""
  recipe = cfg.get('recipe', DEFAULT_RECIPE)
  _check_recipe(recipe)
  _settings(cfg, recipe)


def _check_recipe(recipe: Any) -> None:
  if recipe not in RECIPES:
    raise ValueError(f'split.recipe must be one of {", ".join(RECIPES)}; '
                     f'got {recipe!r}')


def _settings(cfg: ml_collections.ConfigDict | Mapping,
              recipe: str) -> dict[str, Any]:
  """The recipe's fields of `cfg`, checked; other fields are ignored."""
  fields = _FIELDS[recipe]
  values = {}
  for name, default in fields.items():
    if name in cfg:
      values[name] = cfg[name]
    elif name in _OPTIONAL.get(recipe, ()):
      values[name] = default
    else:
      raise ValueError(
          f'split.{name} is missing; the {recipe!r} split recipe reads '
          f'{", ".join(f"split.{f}" for f in fields)} (defaults: '
          f'split_recipes.split_config({recipe!r}))')
  for name, default in _EXTRA.get(recipe, {}).items():
    values[name] = cfg[name] if name in cfg else default
  _check_values(recipe, values)
  return values


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(values: dict[str, Any], name: str, lo: int,
               hi: int | None = None, hi_name: str | None = None) -> None:
  """Raises unless values[name] is an integer in [lo, hi)."""
  value = values[name]
  if _is_int(value) and value >= lo and (hi is None or value < hi):
    return
  allowed = (f'an integer >= {lo}' if hi is None else
             f'an integer in [{lo}, {hi_name or hi})'
             + (f' = [{lo}, {hi})' if hi_name else ''))
  raise ValueError(f'split.{name} must be {allowed}; got {value!r}')


def _check_values(recipe: str, values: dict[str, Any]) -> None:
  _check_int(values, 'seed', 0)
  site = values['test_site']
  if not isinstance(site, str):
    raise ValueError(f"split.test_site must be a site name or '' (none); "
                     f'got {site!r}')
  if recipe == 'ratio' and site:
    raise ValueError(
        f"split.test_site must be '' for the 'ratio' split recipe (the ratios "
        f"make the test set); got {site!r}. Use the 'held_out_site' or "
        f"'kfold' recipe to test on a site")
  if recipe == 'held_out_site' and not site:
    raise ValueError("split.test_site must name a site for the "
                     "'held_out_site' split recipe; got ''")
  if recipe == 'semixup':
    _check_int(values, 'labels_per_grade', 1)
    _check_int(values, 'unlabeled_factor', 0)
    fraction = values['labeled_fraction']
    # The pools are whole folds of subjects (0.25 = 1 of 4 folds).
    ok = (isinstance(fraction, numbers.Real)
          and not isinstance(fraction, bool) and math.isfinite(fraction))
    if ok:
      simple = fractions.Fraction(fraction).limit_denominator(20)
      ok = 0 < simple < 1 and abs(float(simple) - fraction) <= 1e-6
    if not ok:
      raise ValueError(
          f'split.labeled_fraction must be a simple fraction in (0, 1) with '
          f'a denominator <= 20, such as 0.25; got {fraction!r}')
  if 'num_folds' in values:
    _check_int(values, 'num_folds', 2)
    _check_int(values, 'fold', 0, values['num_folds'], 'split.num_folds')
  if 'val_folds' in values:
    _check_int(values, 'val_folds', 2)
  if 'unlabeled_ratio' in values:
    _check_int(values, 'unlabeled_ratio', 0)
  if 'label_fraction' in values:
    fraction = values['label_fraction']
    ok = (isinstance(fraction, numbers.Real)
          and not isinstance(fraction, bool) and math.isfinite(fraction))
    if ok:
      simple = fractions.Fraction(fraction).limit_denominator(20)
      ok = 0 < simple <= 1 and abs(float(simple) - fraction) <= 1e-6
    if not ok:
      raise ValueError(
          f'split.label_fraction must be a simple fraction in (0, 1] with a '
          f'denominator <= 20, such as 0.2 or 1.0; got {fraction!r}')
  if 'ratios' in values:
    ratios = values['ratios']
    if not (isinstance(ratios, Sequence) and not isinstance(ratios, str)
            and len(ratios) == 3 and all(_is_int(r) and r >= 0 for r in ratios)
            and ratios[0] >= 1 and sum(ratios) >= 2):
      raise ValueError(
          f'split.ratios must be 3 non-negative integers train:val:test, '
          f'train >= 1 and a sum >= 2, such as (2, 1, 1); got {ratios!r}')


# --------------------------------------------------------------------------
# Recipes.


def _qualifying(index: pd.DataFrame, qualifies: Any) -> np.ndarray:
  if qualifies is None:
    return index['kl'].to_numpy() >= 0
  q = np.asarray(qualifies)
  if q.shape != (len(index),) or q.dtype != bool:
    raise ValueError(
        f'qualifies must be a boolean mask over the {len(index)} index rows; '
        f'got dtype {q.dtype} and shape {q.shape}')
  return q


def _grades(index: pd.DataFrame, q: np.ndarray) -> tuple[int, ...]:
  """The KL grades among the qualifying knees."""
  kl = index['kl'].to_numpy()[q]
  return tuple(g for g in splits_lib.KL_GRADES if (kl == g).any())


def _held_out(index: pd.DataFrame, q: np.ndarray,
              test_site: str) -> tuple[np.ndarray, np.ndarray]:
  """(rest, test): test = the qualifying knees of `test_site`, rest = the
  qualifying knees of every subject with none there."""
  sites = index['site'].astype(str).to_numpy()
  if not (q & (sites == test_site)).any():
    raise ValueError(
        f'split.test_site={test_site!r} has no qualifying knees; sites with '
        f'qualifying knees: {sorted(set(sites[q]))}')
  # Only qualifying rows go in, so that with the default mask the result is
  # held_out_site(graded_only=True) exactly, as train and the loop used it.
  held = splits_lib.held_out_site(index, test_site=test_site,
                                  rows=np.flatnonzero(q))
  return held.train, held.test


def _unlabeled(index: pd.DataFrame, q: np.ndarray, test_site: str,
               *held_out: np.ndarray) -> np.ndarray:
  """The non-qualifying knees of subjects in none of `held_out`.

  Knees of the test site are left out too: a held-out site is meant to be
  unseen, even as unlabeled images.
  """
  subjects = index['subject_id'].to_numpy()
  held = np.unique(subjects[np.concatenate([*held_out, _EMPTY])])
  keep = ~q & ~np.isin(subjects, held)
  if test_site:
    keep &= index['site'].astype(str).to_numpy() != test_site
  return np.flatnonzero(keep).astype(np.int64)


def _semixup(index, q, grades, *, seed, test_site, labels_per_grade,
             unlabeled_factor, labeled_fraction, num_folds, fold) -> Splits:
  """Semixup's setting (`splits.semixup_setting`) on the task's grades and
  qualifying knees; with the default mask, the splits koajax always made."""
  rest, test = np.arange(len(index)), _EMPTY
  if test_site:
    rest, test = _held_out(index, q, test_site)
  pools = splits_lib.labeled_unlabeled_pools(
      index, labeled_fraction=labeled_fraction, seed=seed, rows=rest)
  setting = splits_lib.semixup_setting(
      index, n_per_grade=labels_per_grade, unlabeled_factor=unlabeled_factor,
      fold=fold, n_folds=num_folds, seed=seed, pools=pools, qualifies=q,
      grades=grades)
  return Splits(labeled=setting.labeled, unlabeled=setting.unlabeled,
                val=setting.val, test=test)


def _kfold(index, q, *, seed, test_site, num_folds, fold) -> Splits:
  rest, test = np.flatnonzero(q), _EMPTY
  if test_site:
    rest, test = _held_out(index, q, test_site)
  split = splits_lib.subject_kfold(index, n_folds=num_folds, seed=seed,
                                   rows=rest, graded_only=False)[fold]
  return Splits(labeled=split.train,
                unlabeled=_unlabeled(index, q, test_site, split.val, test),
                val=split.val, test=test)


def _ratio(index, q, *, seed, test_site, ratios, unlabeled_ratio=0,
           label_fraction=1.0) -> Splits:
  del test_site  # checked to be ''
  rows, withheld = np.flatnonzero(q), [_EMPTY]
  if unlabeled_ratio:
    # Dealt as one more share of subjects first; the remaining subjects
    # are then split by the ratios as without it.
    parts = splits_lib.split_by_subject(
        index, ratios=(sum(ratios), unlabeled_ratio, 0), seed=seed,
        rows=rows, graded_only=False)
    rows = parts.train
    withheld.append(parts.val)
  split = splits_lib.split_by_subject(
      index, ratios=tuple(ratios), seed=seed, rows=rows, graded_only=False)
  labeled = split.train
  if label_fraction < 1:
    pools = splits_lib.labeled_unlabeled_pools(
        index, labeled_fraction=label_fraction, seed=seed, rows=labeled)
    labeled = pools.labeled
    withheld.append(pools.unlabeled)
  unlabeled = np.union1d(_unlabeled(index, q, '', split.val, split.test),
                         np.concatenate(withheld)).astype(np.int64)
  return Splits(labeled=labeled, unlabeled=unlabeled, val=split.val,
                test=split.test)


def _held_out_site(index, q, *, seed, test_site, val_folds) -> Splits:
  rest, test = _held_out(index, q, test_site)
  split = splits_lib.subject_kfold(index, n_folds=val_folds, seed=seed,
                                   rows=rest, graded_only=False)[0]
  return Splits(labeled=split.train,
                unlabeled=_unlabeled(index, q, test_site, split.val, test),
                val=split.val, test=test)


def _active_learning(index, q, *, seed, test_site, val_folds) -> Splits:
  """The loop's candidates (as labeled), val and test; test is val when no
  site is held out, as the loop always tested."""
  rest, test = np.flatnonzero(q), None
  if test_site:
    rest, test = _held_out(index, q, test_site)
  split = splits_lib.subject_kfold(index, n_folds=val_folds, seed=seed,
                                   rows=rest, graded_only=False)[0]
  return Splits(labeled=split.train, unlabeled=_EMPTY.copy(), val=split.val,
                test=split.val if test is None else test)


_RECIPE_FNS = {'kfold': _kfold, 'ratio': _ratio,
               'held_out_site': _held_out_site,
               'active_learning': _active_learning}
