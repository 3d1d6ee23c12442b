"""Evaluates a finished training run (or an ensemble of runs) on a split or
another cache.

  python -m koajax.evaluate --workdir=DIR[,DIR2,...] [--split=test] \\
      [--checkpoint=best] [--cache=OTHER_CACHE] [--out=OUT] \\
      [--tta=five_crop --tta_crop=120] [--ensemble=probs]

DIR is a `python -m koajax.main` training workdir: its config.json names the
data, task and model, its splits.npz the knees and its checkpoints hold the
weights. The run is only read (`koajax.train.predictor`): evaluating a
read-only copy works and leaves every file of the run as it was. Several
DIRs are evaluated as one ensemble on the first run's split.
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


def evaluate(workdirs: str | Path | Sequence[str | Path], *,
             split: str = 'test', checkpoint: str = 'best',
             cache_dir: str | Path | None = None,
             out: str | Path | None = None, **predict) -> dict[str, Any]:
  """Writes the report of `checkpoint` on `split` (or all of `cache_dir`).

  `predict` overrides the run's prediction settings (tta, tta_crop,
  ensemble); None values are ignored.
  """
  if isinstance(workdirs, (str, Path)):
    workdirs = [workdirs]
  config = config_lib.load_run_config(workdirs[0])
  from koajax import runtime
  runtime.configure_host(config)
  import jax
  import numpy as np
  from koajax import tasks
  from koajax import train
  from koajax.data import cache as cache_lib
  from koajax.data import sources
  from koajax.evaluation import report
  from koajax.train import predictor as predictor_lib

  task = tasks.from_config(config)
  if cache_dir is not None:  # checked before any run is loaded
    cache = cache_lib.open_cache(cache_dir)
    indices = np.flatnonzero(task.qualifies(cache.index))
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
  result = train.write_report(out, config, task, cache, indices, probs)
  if result is not None:
    print(f'{checkpoint} on {target} ({len(indices)} knees): '
          f'{report.headline(result)}; report in {out / "metrics.json"}')
  return result


def main(argv):
  del argv  # cli.run_absl refuses positional arguments
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('koajax').setLevel(std_logging.INFO)
  # Orbax warns about every read-only checkpoint folder it opens.
  std_logging.getLogger('absl').setLevel(std_logging.ERROR)
  f = flags.FLAGS
  evaluate(f.workdir, split=f.split, checkpoint=f.checkpoint,
           cache_dir=f.cache, out=f.out, tta=f.tta, tta_crop=f.tta_crop,
           ensemble=f.ensemble)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir'])
  cli.run_absl('koajax.evaluate', main)
