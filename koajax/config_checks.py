"""A run config's values, checked when it is read.

Every check names the field and the allowed range, so a bad value stops the
run before a dataset is built or a step compiled (a NaN learning rate used to
surface after the first compile, a batch of 0 as a ZeroDivisionError).
`check(config)` raises `koajax.cli.BadInput`; `reconcile_method` makes
`--config.method=` work on a config written for another method.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import ml_collections

from koajax import cli

log = logging.getLogger(__name__)


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split('.'):
    value = value[part]
  return value


def _has(config: ml_collections.ConfigDict, field: str) -> bool:
  value = config
  for part in field.split('.'):
    if not hasattr(value, 'keys') or part not in value:
      return False
    value = value[part]
  return True


def _int(config, field: str, lo: int, hi: int | None = None) -> None:
  if not _has(config, field):
    return
  value = _get(config, field)
  if _is_int(value) and value >= lo and (hi is None or value <= hi):
    return
  allowed = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
  raise cli.BadInput(f'config field {field} must be an integer {allowed}; '
                     f'got {value!r}')


def _real(config, field: str, lo: float, *, strict: bool = False,
          hi: float | None = None, hi_strict: bool = False) -> None:
  if not _has(config, field):
    return
  value = _get(config, field)
  ok = _is_real(value) and (value > lo if strict else value >= lo)
  if ok and hi is not None:
    ok = value < hi if hi_strict else value <= hi
  if ok:
    return
  low = f'> {lo}' if strict else f'>= {lo}'
  high = '' if hi is None else f' and {"<" if hi_strict else "<="} {hi}'
  raise cli.BadInput(f'config field {field} must be a finite number {low}'
                     f'{high}; got {value!r}')


def _check_data(config) -> None:
  if not _has(config, 'data'):
    return
  sources = ('synthetic', 'manifest', 'cache')
  source = config.data.get('source', 'synthetic')
  if source not in sources:
    raise cli.BadInput(f'config field data.source must be one of '
                       f'{", ".join(sources)}; got {source!r}')
  if source == 'manifest' and not config.data.get('manifest'):
    raise cli.BadInput('config field data.manifest is empty; with '
                       'data.source=manifest give the manifest CSV')
  if source == 'cache' and not config.data.get('cache_dir'):
    raise cli.BadInput('config field data.cache_dir is empty; with '
                       'data.source=cache give the cache folder')
  _int(config, 'data.synthetic.num_subjects', 1)
  _int(config, 'data.synthetic.seed', 0)
  # The ROI is cut around the joint: less than 20 mm holds no joint, more
  # than 400 mm more than the radiograph.
  _real(config, 'data.roi_mm', 20.0, hi=400.0)
  _int(config, 'data.roi_px', 32, 4096)
  _int(config, 'data.workers', 0)
  crops = ('knee', 'side')
  if config.data.get('crop', 'knee') not in crops:
    raise cli.BadInput(f'config field data.crop must be one of '
                       f'{", ".join(crops)}; got {config.data.crop!r}')
  localizer = config.data.get('localizer', '')
  if localizer and source == 'cache':
    raise cli.BadInput('config field data.localizer is for building a cache '
                       'from radiographs; with data.source=cache the cache '
                       'is already built: leave it empty')


def _check_training(config) -> None:
  _int(config, 'seed', 0)
  _int(config, 'batch_size', 1)
  _int(config, 'unlabeled_batch_size', 0)  # 0: same as batch_size
  _int(config, 'eval_batch_size', 1)
  _int(config, 'num_epochs', 1)
  _real(config, 'eval_every_epochs', 0.0, strict=True)
  _int(config, 'log_every_steps', 1)
  _int(config, 'data_workers', -1)  # -1: by the platform
  _int(config, 'cpu_devices', -1)  # -1: one per core
  _int(config, 'bootstrap_resamples', 0)
  _int(config, 'view_size', 0)
  if _has(config, 'view_size') and 0 < config.view_size < 16:
    raise cli.BadInput(f'config field view_size must be 0 (the view\'s own '
                       f'size) or >= 16 px; got {config.view_size}')
  _real(config, 'optimizer.learning_rate', 0.0, strict=True)
  _real(config, 'optimizer.b1', 0.0, hi=1.0, hi_strict=True)
  _real(config, 'optimizer.b2', 0.0, hi=1.0, hi_strict=True)
  _real(config, 'optimizer.weight_decay', 0.0)
  _real(config, 'optimizer.warmup_epochs', 0.0)
  _real(config, 'optimizer.cosine_epochs', 0.0)
  _real(config, 'optimizer.heads_only_epochs', 0.0)
  if _has(config, 'optimizer.weight_decay_mode') and \
      config.optimizer.weight_decay_mode not in ('decoupled', 'l2'):
    raise cli.BadInput("config field optimizer.weight_decay_mode must be "
                       "'decoupled' (AdamW) or 'l2' (PyTorch's Adam "
                       f"weight_decay); got {config.optimizer.weight_decay_mode!r}")
  for group in ('boundaries', 'boundary_epochs'):
    if not _has(config, f'optimizer.{group}'):
      continue
    for key, value in config.optimizer[group].items():
      field = f'optimizer.{group}.{key}'
      try:
        at = float(key)
      except ValueError:
        at = math.nan
      if not (math.isfinite(at) and at >= 0):
        raise cli.BadInput(f'config field {field}: the key must be a '
                           f'{group[:-2] or "step"} >= 0; got {key!r}')
      if not (_is_real(value) and value >= 0):
        raise cli.BadInput(f'config field {field} must be a finite factor '
                           f'>= 0; got {value!r}')
  if _has(config, 'predict'):
    tta = config.predict.get('tta', 'none')
    if tta not in ('none', 'five_crop'):
      raise cli.BadInput(f"config field predict.tta must be 'none' or "
                         f"'five_crop'; got {tta!r}")
    _int(config, 'predict.tta_crop', 0)
    _int(config, 'predict.crop', 0)
    ensemble = config.predict.get('ensemble', 'probs')
    if ensemble not in ('probs', 'logits'):
      raise cli.BadInput(f"config field predict.ensemble must be 'probs' or "
                         f"'logits'; got {ensemble!r}")
  if _has(config, 'localize.max_disagreement_mm'):
    value = config.localize.max_disagreement_mm
    if not (_is_real(value) and value > 0):
      raise cli.BadInput('config field localize.max_disagreement_mm must be '
                         f'a distance > 0 mm; got {value!r}')
  if _has(config, 'selection') and not tuple(config.selection):
    raise cli.BadInput('config field selection names no metric; give at '
                       "least one, e.g. ('balanced_accuracy',)")


def _check_active(config) -> None:
  if not _has(config, 'active'):
    return
  for field in ('pool_size', 'n_init', 'n_batch', 'budget'):
    if _has(config, f'active.{field}'):
      _int(config, f'active.{field}', 1 if field != 'pool_size' else 0)
  if all(_has(config, f'active.{f}') for f in ('n_init', 'budget')) and \
      config.active.budget < config.active.n_init:
    raise cli.BadInput(
        f'config field active.budget ({config.active.budget}) is below '
        f'active.n_init ({config.active.n_init}); the budget counts the '
        'initial labels too')
  for field in ('mc_samples', 'num_samples'):
    _int(config, f'active.{field}', 1)


def _check_split(config) -> None:
  if not _has(config, 'split'):
    return
  from koajax.data import split_recipes  # pylint: disable=g-import-not-at-top
  try:
    split_recipes.check(config.split)
  except ValueError as e:
    raise cli.BadInput(f'config field {e}') from e


def reconcile_method(config: ml_collections.ConfigDict) -> None:
  """Resets `method_kwargs` to the defaults of `config.method` when they are
  another method's options (`--config.method=supervised` on a Semixup
  config), saying so in the log. Unknown methods raise BadInput."""
  if not config.get('method'):
    return
  from koajax import methods  # pylint: disable=g-import-not-at-top
  try:
    defaults = methods.options(config.method)
  except (KeyError, ValueError, ImportError, AttributeError) as e:
    raise cli.BadInput(f'config field method: {cli.message(e)}') from e
  given = dict(config.get('method_kwargs', {}))
  foreign = sorted(set(given) - set(defaults))
  if not foreign:
    if set(defaults) - set(given):  # shown in config.json, as set_method does
      with config.unlocked():
        config.method_kwargs = ml_collections.ConfigDict(
            {**defaults, **given})
    return
  with config.unlocked():
    config.method_kwargs = ml_collections.ConfigDict(defaults)
  log.warning('method_kwargs reset to the defaults of method %r: the config '
              'held options of another method (%s)', config.method,
              ', '.join(foreign))


def check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises BadInput naming the first field whose value cannot work; returns
  `config` (method options reconciled) otherwise."""
  _check_data(config)
  if config.get('job', 'train') in ('train', 'active_learning'):
    _check_training(config)
    _check_split(config)
    _check_active(config)
    reconcile_method(config)
    if config.get('task'):
      from koajax import tasks  # pylint: disable=g-import-not-at-top
      from koajax.train import predictor  # pylint: disable=g-import-not-at-top
      try:
        task = tasks.from_config(config)
        if config.get('predict'):
          predictor.check_settings(task, **dict(config.predict))
      except ValueError as e:
        raise cli.BadInput(cli.message(e)) from e
    count = config.get('gradcam_knees', 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
      raise cli.BadInput(
          f'config field gradcam_knees={count!r}: give how many most and '
          'least confident test knees get Grad-CAM overlays, 0 for none')
    if config.get('oversample', '') not in ('', 'bootstrap'):
      raise cli.BadInput(
          f"config field oversample={config.oversample!r}: give 'bootstrap' "
          "(the training stream's smaller classes drawn with replacement up "
          "to the largest) or '' (none)")
    if (config.optimizer.get('heads_only_epochs', 0) > 0
        and not config.model.get('init')):
      log.warning(
          'optimizer.heads_only_epochs=%g trains the heads alone on a '
          'randomly initialised backbone: give pretrained weights with '
          '--config.model.init=PATH, or use the from-scratch schedule '
          '(configs/oarsi.py:scratch)', config.optimizer.heads_only_epochs)
  return config
