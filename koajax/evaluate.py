"""Evaluates a saved checkpoint of a training run on a split or another cache.

  python -m koajax.evaluate --workdir=DIR [--split=test] \\
      [--checkpoint=best_balanced_accuracy] [--cache=OTHER_CACHE] [--out=OUT]

DIR is a `python -m koajax.main` training workdir: its config.json rebuilds
the run (data, splits, model) and its checkpoints hold the weights.
--checkpoint is 'best_balanced_accuracy' (default), 'best_kappa' or 'latest'.
--split is 'test' (the held-out site; 'val' when none was held out), 'val',
'labeled' or 'unlabeled'. With --cache, every graded knee of that koajax cache
(`python -m koajax.data.build` output, for instance an external test set) is
evaluated instead. OUT (default DIR/eval/<checkpoint>-<split or cache name>)
receives metrics.json, predictions.csv and the plots, as at the end of
training; compare two of them with `python -m koajax.evaluation.compare`.
"""

from __future__ import annotations

import logging as std_logging
from pathlib import Path
from typing import Any

from absl import app
from absl import flags
from absl import logging

from koajax import config_lib


def _define_flags() -> None:
  """Flags of the command, defined only when it runs as a program, so that
  importing this module beside another command defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_string('split', 'test', 'test, val, labeled or unlabeled.')
  flags.DEFINE_string('checkpoint', 'best_balanced_accuracy',
                      'best_balanced_accuracy, best_kappa or latest.')
  flags.DEFINE_string('cache', None, 'Evaluate every graded knee of this '
                      'koajax cache instead of a split.')
  flags.DEFINE_string('out', None, 'Output folder.')


def evaluate(workdir: str | Path, *, split: str = 'test',
             checkpoint: str = 'best_balanced_accuracy',
             cache_dir: str | Path | None = None,
             out: str | Path | None = None) -> dict[str, Any]:
  """Writes the report of `checkpoint` on `split` (or all of `cache_dir`)."""
  config = config_lib.load_run_config(workdir)
  from koajax import runtime
  runtime.configure_host(config)
  import jax
  import numpy as np
  from koajax import train
  from koajax.data import cache as cache_lib
  from koajax.evaluation import report

  if cache_dir is not None:  # checked before the run is rebuilt
    cache = cache_lib.open_cache(cache_dir)
    indices = np.flatnonzero(cache.index['kl'].to_numpy() >= 0)
    if not len(indices):
      raise ValueError(f'{cache_dir} has no graded knees to evaluate')
    target = Path(cache_dir).name
  trainer = train.Trainer(config, workdir, splits=train.saved_splits(workdir))
  state = trainer.load_checkpoint(checkpoint)
  if cache_dir is None:
    cache, indices, target = trainer.cache, trainer.split_indices(split), split
  out = Path(out) if out else Path(workdir) / 'eval' / f'{checkpoint}-{target}'
  with jax.set_mesh(trainer.mesh):
    result = trainer.write_report(out, state, indices, cache)
  print(f'{checkpoint} on {target} ({len(indices)} knees): '
        f'{report.headline(result)}; report in {out / "metrics.json"}')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('koajax').setLevel(std_logging.INFO)
  f = flags.FLAGS
  evaluate(f.workdir, split=f.split, checkpoint=f.checkpoint,
           cache_dir=f.cache, out=f.out)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
