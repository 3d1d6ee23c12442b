"""Every config file and preset runs on koajax's embedded synthetic data.

For each `configs/<file>.py:<preset>` the config is built and checked, its
data resolved against the index of the synthetic dataset it names, the
paper's sizes adapted where the data is smaller, and its splits made, all
without images or training. The index comes from the generator's cohort
plan (`synthetic.plan`), the same table the cache holds (checked below
against a generated dataset), so the default 560-subject data costs a
second instead of minutes.
"""

import functools
import json
import re

import numpy as np
import pandas as pd
import pytest

from config_loader import CONFIGS
from config_loader import load_config
from koajax import config_checks
from koajax import tasks
from koajax.active import loop
from koajax.data import schema
from koajax.data import sources
from koajax.data import split_recipes
from koajax.data import synthetic
from koajax.data import pipeline
from koajax.train import plan


def presets_of(name):
  """The presets of configs/<name>.py, as its own error message lists them."""
  try:
    load_config(name, '__no_such_preset__')
  except ValueError as e:
    listed = re.search(r'this config has (.*)$', str(e))
    if listed:
      return tuple(p.strip() for p in listed.group(1).split(','))
  raise AssertionError(f'configs/{name}.py does not list its presets')


PAIRS = [(path.stem, preset) for path in sorted(CONFIGS.glob('*.py'))
         for preset in presets_of(path.stem)]


@functools.cache
def synthetic_index(num_subjects, seed):
  """The cache index of the synthetic dataset, from the cohort plan."""
  knees, _ = synthetic.plan(num_subjects, seed)
  index = pd.DataFrame({
      'knee_id': [f'{s}_v{v:02d}_{side}' for s, v, side in
                  zip(knees.subject_id, knees.visit, knees.side)],
      'subject_id': knees.subject_id.astype(np.int64),
      'visit': knees.visit, 'side': knees.side, 'site': knees.site})
  for name in schema.GRADES:
    index[name] = knees[name].fillna(schema.UNGRADED).astype(np.int64)
  return index


def test_the_plan_index_is_the_generated_cache_index(tmp_path):
  config = load_config('semixup', 'smoke')
  config.data.root = str(tmp_path)
  cache = sources.resolve_cache(config.data)
  expected = synthetic_index(config.data.synthetic.num_subjects,
                             config.data.synthetic.seed)
  got = cache.index[list(expected.columns)].reset_index(drop=True)
  for column in expected.columns:
    np.testing.assert_array_equal(got[column].astype(str).to_numpy(),
                                  expected[column].astype(str).to_numpy(),
                                  err_msg=column)


@pytest.mark.parametrize('name,preset', PAIRS)
def test_every_preset_resolves_on_the_embedded_data(name, preset):
  config = config_checks.check(load_config(name, preset))
  if config.job == 'prepare_data':
    assert len(synthetic_index(config.data.synthetic.num_subjects,
                               config.data.synthetic.seed))
    return
  assert config.data.source == 'synthetic'
  index = synthetic_index(config.data.synthetic.num_subjects,
                          config.data.synthetic.seed)
  task = tasks.from_config(config)
  qualifies = task.qualifies(index)
  used = plan.adapt(config, index, qualifies=qualifies)
  json.loads(used.to_json_best_effort())  # config.json can hold it
  splits = split_recipes.make_splits(index, used.split, qualifies=qualifies)
  if config.job == 'active_learning':
    candidates = loop.candidates(splits, used.active, seed=used.seed)
    sets = loop.initial_sets(candidates, n_init=used.active.n_init,
                             consistency=used.active.consistency,
                             seed=used.seed)
    labeled = sets.labeled
  else:
    labeled = splits.labeled
  assert pipeline.steps_per_epoch(len(labeled), used.batch_size) >= 1
  assert len(splits.val) > 0
  # What was adapted is only ever lowered, and says why.
  for a in plan.adaptations(used):
    assert a['used'] < a['given'] and a['why']


def test_the_paper_semixup_setting_is_adapted_and_said():
  config = load_config('semixup')
  index = synthetic_index(config.data.synthetic.num_subjects,
                          config.data.synthetic.seed)
  qualifies = tasks.from_config(config).qualifies(index)
  with pytest.raises(ValueError, match='KL 3 has only'):
    split_recipes.make_splits(index, config.split, qualifies=qualifies)
  used = plan.adapt(config, index, qualifies=qualifies)
  (a,) = plan.adaptations(used)
  assert a['field'] == 'split.labels_per_grade' and a['given'] == 100
  # The largest value that fits: one more does not.
  split_recipes.make_splits(index, used.split, qualifies=qualifies)
  with pytest.raises(ValueError, match='has only'):
    split_recipes.make_splits(
        index, {**used.split, 'labels_per_grade': a['used'] + 1},
        qualifies=qualifies)
  assert used.split.unlabeled_factor == config.split.unlabeled_factor
  assert used.split.labeled_fraction == config.split.labeled_fraction
  # The given config is untouched.
  assert config.split.labels_per_grade == 100 and 'adapted' not in config


def test_user_data_is_not_adapted_without_asking():
  config = load_config('semixup')
  config.data.source = 'cache'
  config.data.cache_dir = '/nowhere'
  index = synthetic_index(560, 0)
  with pytest.raises(ValueError, match='adapt_to_data=always'):
    plan.adapt(config, index)
  config.adapt_to_data = 'always'
  assert plan.adaptations(plan.adapt(config, index))
