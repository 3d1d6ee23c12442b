"""What a run will do, said before it starts: data, knees, steps, time.

A paper's config asks for as many labels as the paper had; koajax's embedded
synthetic dataset (560 subjects) holds fewer of the rare grades. On that data
`adapt` lowers the recipe's size settings as little as needed (for Semixup:
labels per grade; the pools, ratios, network and schedule stay the paper's)
and records each change as {field, given, used, why} in `config.adapted`, so
the run's config.json and the first lines of its log say what differs from
the paper. On the user's own data nothing is adapted unless
`config.adapt_to_data='always'`: a recipe that does not fit is an error there.

`describe` gathers the plan (knees per split, steps, devices), `estimate`
adds the wall time from a few timed steps; both are logged and written to
WORKDIR/plan.json.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections

from koajax import cli
from koajax.data import split_recipes

log = logging.getLogger(__name__)

PLAN_JSON = 'plan.json'
ADAPT_CHOICES = ('synthetic', 'always', 'never')
# Training steps timed, after the first (which compiles), for the estimate.
TIMED_STEPS = 3
# A CPU run longer than this gets the hint that `:quick` exists.
_LONG_RUN_S = 1800


def _policy(config: ml_collections.ConfigDict) -> str:
  policy = config.get('adapt_to_data', 'synthetic')
  if policy not in ADAPT_CHOICES:
    raise cli.BadInput(f'config field adapt_to_data must be one of '
                       f'{", ".join(ADAPT_CHOICES)}; got {policy!r}')
  return policy


def adapt(config: ml_collections.ConfigDict, index, *, qualifies=None
          ) -> ml_collections.ConfigDict:
  """A copy of `config` whose split fits `index`, with `adapted` saying what
  changed; raises BadInput when the split cannot fit and may not adapt."""
  policy = _policy(config)
  may = policy == 'always' or (
      policy == 'synthetic' and config.data.get('source') == 'synthetic')
  if not may:
    try:
      split_recipes.make_splits(index, config.split, qualifies=qualifies)
    except ValueError as e:
      raise cli.BadInput(
          f'{cli.message(e)} (this data: {len(index)} knees). Lower the '
          "setting, or --config.adapt_to_data=always to let koajax lower it "
          'and say so') from e
    return config
  try:
    values, changes = split_recipes.fit(index, config.split,
                                        qualifies=qualifies)
  except ValueError as e:
    raise cli.BadInput(f'{cli.message(e)} (this data: {len(index)} knees, '
                       'even after lowering the sizes)') from e
  if not changes:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.split.update({k: v for k, v in values.items() if k in config.split})
    config.adapted = [
        {'field': c.field, 'given': c.given, 'used': c.used,
         'why': c.why.split(', but ', 1)[-1]} for c in changes]
  return config


def adaptations(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  return [dict(a) for a in config.get('adapted', ())]


def describe(config: ml_collections.ConfigDict, *, task: str,
             splits: split_recipes.Splits, streams: tuple[str, ...],
             steps_per_epoch: int, total_steps: int, mesh_size: int,
             cache_dir: str | Path, data_workers: int = 0) -> dict[str, Any]:
  """The plan of a training run, as JSON-ready values."""
  eval_steps = max(1, round(config.eval_every_epochs * steps_per_epoch))
  data = config.data
  source = data.get('source', 'synthetic')
  return {
      'method': config.method, 'task': task,
      'data': {'source': source, 'cache': str(cache_dir),
               **({'synthetic_subjects': data.synthetic.num_subjects,
                   'synthetic_seed': data.synthetic.seed}
                  if source == 'synthetic' else {})},
      'adapted': adaptations(config),
      'knees': {'labeled': len(splits.labeled),
                'unlabeled': (len(splits.unlabeled) if 'unlabeled' in streams
                              else 0),
                'val': len(splits.val), 'test': len(splits.test)},
      'epochs': config.num_epochs, 'steps_per_epoch': steps_per_epoch,
      'steps': total_steps,
      'evaluations': math.ceil(total_steps / eval_steps),
      'batch_size': config.batch_size,
      'devices': {'platform': jax.devices()[0].platform,
                  'count': jax.device_count(), 'used': mesh_size},
      'data_workers': data_workers,  # reading processes per stream
  }


def log_plan(plan: dict[str, Any]) -> None:
  """The plan as the first lines of a run's log."""
  k = plan['knees']
  log.info('Plan: %s on task %s; data %s (%s)', plan['method'], plan['task'],
           plan['data']['source'], plan['data']['cache'])
  if plan['adapted']:
    for a in plan['adapted']:
      log.warning('Adapted to this data: %s=%s (the config gives %s): %s',
                  a['field'], a['used'], a['given'], a['why'])
  else:
    log.info('Every setting as the config gives it; nothing adapted')
  log.info('Knees: %d labeled, %d unlabeled, %d val, %d test', k['labeled'],
           k['unlabeled'], k['val'], k['test'])
  log.info('Steps: %d epochs x %d = %d steps of batch %d, %d evaluations; on '
           '%d of %d %s devices', plan['epochs'], plan['steps_per_epoch'],
           plan['steps'], plan['batch_size'], plan['evaluations'],
           plan['devices']['used'], plan['devices']['count'],
           plan['devices']['platform'])
  if plan.get('data_workers'):
    log.info('Input: %d reading processes per stream', plan['data_workers'])


def estimate(plan: dict[str, Any], seconds_per_step: float,
             remaining_steps: int) -> dict[str, Any]:
  """The plan with the wall time of the remaining training steps."""
  total = seconds_per_step * remaining_steps
  plan = {**plan, 'seconds_per_step': round(seconds_per_step, 4),
          'remaining_steps': remaining_steps,
          'estimated_training_seconds': round(total, 1)}
  hours, rest = divmod(int(total), 3600)
  log.info('Estimate: %.3g s per step, about %dh%02dm for the %d remaining '
           'steps (evaluations not counted)', seconds_per_step, hours,
           rest // 60, remaining_steps)
  if plan['devices']['platform'] == 'cpu' and total > _LONG_RUN_S:
    log.warning('On a CPU this run takes %.1f hours; the :quick preset of '
                'its config file (--config=configs/<file>.py:quick) gives a '
                'first look in minutes', total / 3600)
  return plan


def write(workdir: str | Path, plan: dict[str, Any]) -> None:
  """WORKDIR/plan.json, atomically (process 0)."""
  if jax.process_index() != 0:
    return
  path = Path(workdir) / PLAN_JSON
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
  tmp.write_text(json.dumps(plan, indent=1, default=str) + '\n')
  os.replace(tmp, path)
