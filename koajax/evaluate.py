"""Evaluates a finished training run (or an ensemble of runs) on a split or
another cache.

  python -m koajax.evaluate --workdir=DIR[,DIR2,...] [--split=test] \\
      [--checkpoint=best] [--cache=OTHER_CACHE] [--out=OUT] \\
      [--tta=five_crop --tta_crop=120] [--ensemble=probs] [--out_of_fold]

DIR is a `python -m koajax.main` training workdir: its config.json names the
data, task and model, its splits.npz the knees and its checkpoints hold the
weights. The run is only read (`koajax.train.predictor`): evaluating a
read-only copy works and leaves every file of the run as it was. Several
DIRs are evaluated as one ensemble on the first run's split; with
--out_of_fold they are the folds of one cross-validation instead
(`--config.split.fold=k`), each predicting its own validation knees, and
the report covers the out-of-fold predictions of every knee they validate.
--checkpoint is 'best' (the run's first selection metric, by default
balanced accuracy), 'best_<metric>' or 'latest'. --split is 'test' (the
held-out site; 'val' when none was held out), 'val', 'labeled' or
'unlabeled'. With --cache, every knee of that koajax cache (`python -m
koajax.data.build` output, for instance an external test set) qualifying for
the run's task is evaluated instead. OUT (default
DIR/eval/<checkpoint>-<split or cache name>) receives metrics.json,
predictions.csv and the plots, as at the end of training; compare two of them
with `python -m koajax.evaluation.compare`.

Errors are one line (`koajax.cli`): exit 2 for what the user can fix (an
unknown workdir or checkpoint, a damaged checkpoint or one holding NaN
weights, both named), 1 for failures.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging as std_logging
from pathlib import Path
from typing import Any

from absl import flags
from absl import logging

from koajax import cli
from koajax import config_lib


def _define_flags() -> None:
  """Flags of the command, defined only when it runs as a program, so that
  importing this module beside another command defines none."""
  flags.DEFINE_list('workdir', None, 'Training workdir(s); several make an '
                    'ensemble.')
  flags.DEFINE_string('split', 'test', 'test, val, labeled or unlabeled.')
  flags.DEFINE_string('checkpoint', 'best',
                      "best, best_<metric> or latest.")
  flags.DEFINE_string('cache', None, 'Evaluate every qualifying knee of this '
                      'koajax cache instead of a split.')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_enum('tta', None, ['none', 'five_crop'],
                    'Test-time augmentation (default: the run config).')
  flags.DEFINE_integer('tta_crop', None, 'Crop size of five_crop, px.')
  flags.DEFINE_enum('ensemble', None, ['probs', 'logits'],
                    'Average the runs\' probabilities or logits.')
  flags.DEFINE_bool('out_of_fold', False, 'The runs are folds of one '
                    'cross-validation: each predicts its own validation '
                    'knees, reported together.')


def evaluate(workdirs: str | Path | Sequence[str | Path], *,
             split: str = 'test', checkpoint: str = 'best',
             cache_dir: str | Path | None = None,
             out: str | Path | None = None, out_of_fold: bool = False,
             **predict) -> dict[str, Any]:
  """Writes the report of `checkpoint` on `split` (or all of `cache_dir`).

  With `out_of_fold` the runs are the folds of one cross-validation: each
  predicts its own validation knees and one report covers them all.
  `predict` overrides the run's prediction settings (tta, tta_crop,
  ensemble); None values are ignored.
  """
  if isinstance(workdirs, (str, Path)):
    workdirs = [workdirs]
  if out_of_fold:
    if cache_dir is not None:
      raise ValueError('--out_of_fold reports each run on its own validation '
                       'knees; it takes no --cache')
    return _out_of_fold(workdirs, checkpoint=checkpoint, out=out, **predict)
  config = config_lib.load_run_config(workdirs[0])
  from koajax import calibrate
  from koajax import runtime
  calibrate.configure_host(config)
  import jax
  import numpy as np
  from koajax import tasks
  from koajax import train
  from koajax.data import cache as cache_lib
  from koajax.data import pipeline
  from koajax.data import sources
  from koajax.train import predictor as predictor_lib

  task = tasks.from_config(config)
  if cache_dir is not None:  # checked before any run is loaded
    cache = cache_lib.open_cache(cache_dir)
    qualifies = task.qualifies(cache.index)
    # As in training: knees the view cannot be cut from are not evaluated.
    usable = pipeline.usable_knees(cache, task.view)
    indices = np.flatnonzero(qualifies if usable is None
                             else qualifies & usable)
    if not len(indices):
      raise ValueError(f'{cache_dir} has no knees graded for the task '
                       f'{task.name!r} to evaluate')
    target = Path(cache_dir).name
  else:
    splits = train.saved_splits(workdirs[0])
    if splits is None:
      raise FileNotFoundError(f'{workdirs[0]} has no {train.SPLITS_NPZ}: '
                              'evaluate it on a --cache instead')
    cache = runtime.process_zero_first(
        lambda: sources.resolve_cache(config.data), 'koajax-cache')
    indices, target = train.split_indices(splits, split), split
  predictor = predictor_lib.Predictor.from_runs(
      workdirs, checkpoint=checkpoint,
      **{k: v for k, v in predict.items() if v is not None})
  name = checkpoint if len(workdirs) == 1 else f'{checkpoint}-ensemble'
  out = (Path(out) if out else
         Path(workdirs[0]) / 'eval' / f'{name}-{target}')
  with jax.set_mesh(predictor.mesh):
    probs = predictor.predict(cache, indices)
  result = train.write_report(
      out, config, task, cache, indices, probs,
      sections=_method_sections(config, task, predictor.members[0], cache,
                                indices, probs))
  if result is not None:
    print(f'{checkpoint} on {target} ({len(indices)} knees): '
          f'{train.headline(task, result)}; report in {out / "metrics.json"}')
  return result


def _method_sections(config, task, member, cache, indices,
                     probs) -> dict[str, Any]:
  """The method's own report entries (`Method.report_sections`: the
  coherence measures), as at the end of training, from `member`'s method
  state: an ensemble's or a cross-validation's first run (each run fits its
  coherence mixture on its own training knees)."""
  import jax
  from koajax import methods
  method = methods.from_config(config, task)
  return method.report_sections(jax.device_get(member.method_state), probs,
                                task.index_labels(cache.index.iloc[indices]))


def _out_of_fold(workdirs: Sequence[str | Path], *, checkpoint: str,
                 out: str | Path | None, **predict) -> dict[str, Any]:
  """One report of every run's predictions on its own validation knees."""
  configs = [config_lib.load_run_config(w) for w in workdirs]
  from koajax import calibrate
  from koajax import runtime
  calibrate.configure_host(configs[0])
  import jax
  import numpy as np
  from koajax import tasks
  from koajax import train
  from koajax.data import sources
  from koajax.train import predictor as predictor_lib

  def without_fold(config):
    split = dict(config.split)
    split.pop('fold', None)
    data = {k: v for k, v in config.data.to_dict().items()
            if k not in ('root', 'workers', 'redact_paths')}
    return data, config.get('task', 'kl'), split

  rows, probs, owner = [], [], {}
  for workdir, config in zip(workdirs, configs):
    if without_fold(config) != without_fold(configs[0]):
      raise ValueError(f'{workdir} is not a fold of the cross-validation of '
                       f'{workdirs[0]}: their data, task or split settings '
                       'other than split.fold differ')
    splits = train.saved_splits(workdir)
    if splits is None:
      raise FileNotFoundError(f'{workdir} has no {train.SPLITS_NPZ}')
    for i in splits.val:
      if int(i) in owner:
        raise ValueError(f'{workdir} and {owner[int(i)]} validate on the '
                         'same knees: they are not different folds')
      owner[int(i)] = workdir
    rows.append(splits.val)
  cache = runtime.process_zero_first(
      lambda: sources.resolve_cache(configs[0].data), 'koajax-cache')
  task = tasks.from_config(configs[0])
  members = []
  for workdir, val in zip(workdirs, rows):
    predictor = predictor_lib.Predictor.from_runs(
        [workdir], checkpoint=checkpoint,
        **{k: v for k, v in predict.items() if v is not None})
    members += predictor.members
    with jax.set_mesh(predictor.mesh):
      probs.append(predictor.predict(cache, val))
  indices = np.concatenate(rows)
  order = np.argsort(indices, kind='stable')
  merged = {name: np.concatenate([p[name] for p in probs])[order]
            for name in task.outputs}
  out = (Path(out) if out else
         Path(workdirs[0]) / 'eval' / f'{checkpoint}-out-of-fold')
  result = train.write_report(
      out, configs[0], task, cache, indices[order], merged,
      sections=_method_sections(configs[0], task, members[0], cache,
                                indices[order], merged))
  if result is not None:
    print(f'{checkpoint}, out of fold ({len(workdirs)} runs, '
          f'{len(indices)} knees): {train.headline(task, result)}; report in '
          f'{out / "metrics.json"}')
  return result


def main(argv):
  del argv  # cli.run_absl refuses positional arguments
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('koajax').setLevel(std_logging.INFO)
  # Orbax warns about every read-only checkpoint folder it opens.
  std_logging.getLogger('absl').setLevel(std_logging.ERROR)
  f = flags.FLAGS
  evaluate(f.workdir, split=f.split, checkpoint=f.checkpoint,
           cache_dir=f.cache, out=f.out, out_of_fold=f.out_of_fold,
           tta=f.tta, tta_crop=f.tta_crop, ensemble=f.ensemble)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir'])
  cli.run_absl('koajax.evaluate', main)
