r"""Overlays the learning curves of several active-learning runs.

  python -m koajax.active.curves --runs=DIR_A,DIR_B,... \
      [--full_data=SUPERVISED_RUN] [--out=curves.png]

Each DIR is a `configs/active_learning.py` workdir with its curve.csv; the
legend names its acquisition (and consistency). --full_data is a training
workdir (or its metrics.json) of a model trained on all labeled knees, drawn
as a dashed line: what the active learner is trying to reach with fewer
labels.

Exit status as in `koajax.cli`: a run without curve.csv or config.json, or a
--full_data without readable metrics, is named on one line (status 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app
from absl import flags

from koajax import cli
from koajax import config_lib
from koajax.active import loop
from koajax.active import plots
from koajax.data import manifest as manifest_lib

PROGRAM = 'koajax.active.curves'
_CURVE_COLUMNS = ('n_labeled', 'balanced_accuracy', 'kappa')


def _define_flags() -> None:
  """Flags of the command, defined only when it runs as a program."""
  flags.DEFINE_list('runs', None, 'Active-learning workdirs.')
  flags.DEFINE_string('full_data', None, 'Supervised run (workdir or '
                      'metrics.json) trained on all labeled knees.')
  flags.DEFINE_string('out', 'curves.png', 'PNG to write.')


def _full_data(full_data) -> dict[str, float]:
  """{metric: estimate} of a training workdir or its metrics.json."""
  path = Path(full_data)
  path = path / 'metrics.json' if path.is_dir() else path
  if not path.is_file():
    raise cli.BadInput(f'--full_data: {path} not found; give a training '
                       'workdir or its metrics.json')
  try:
    metrics = json.loads(path.read_text(encoding='utf-8'))['metrics']
    return {k: float(v['estimate']) for k, v in metrics.items()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise cli.BadInput(f'--full_data: {path} is not the metrics.json of a '
                       f'koajax run ({type(e).__name__}: {e})') from None


def overlay(runs, *, full_data=None, out='curves.png') -> Path:
  if not runs:
    raise cli.BadInput('--runs names no run; give active-learning workdirs, '
                       'comma-separated')
  curves = {}
  for run in map(Path, runs):
    path = run / loop.CURVE_CSV
    if not path.is_file():
      raise FileNotFoundError(f'{path} not found: {run} is not a finished '
                              'active-learning run')
    label = loop.label(config_lib.load_run_config(run))
    if label in curves:
      label = f'{label} ({run.name})'
    curves[label] = manifest_lib.read_csv(
        path, 'learning-curve', _CURVE_COLUMNS, error=cli.BadInput)
  full = _full_data(full_data) if full_data else None
  return plots.learning_curves(out, curves, full_data=full)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  print(overlay(f.runs, full_data=f.full_data, out=f.out))


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['runs'])
  cli.run_absl(PROGRAM, main)
