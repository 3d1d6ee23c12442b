r"""Deep active learning's claim on koajax's data: MC-dropout acquisition
with consistency regularisation against random sampling.

The active-learning paper (DESIGN.md) reports that entropy of MC-dropout
predictions with consistency regularisation (CR) reaches balanced accuracy
56.4 % with 800 labels where random sampling reaches 43.5 %. This script
runs the acquisition loop (`koajax.main` with configs/active_learning.py,
one workdir per run) for each acquisition (default random, entropy and
BALD), each with and without CR, for several seeds (the run's and its
split's), and compares the learning curves (test balanced accuracy and kappa
against labeled knees):

  per run: the area under each curve, as the mean of the metric over the
  labeled range (trapezoid rule divided by the range), and its last point;
  over the seeds: each arm's mean and spread, and every arm against random
  sampling without CR: the paired difference, a paired t-test and the
  Wilcoxon signed-rank test (SciPy).

  python benchmarks/reproduction/active_learning.py --preset=quick \
      --seeds=0,1,2

Runs are resumable (benchmarks/reproduction/runs.py; the loop itself
resumes in the round it was in). Raw results go to `--out`: one row per run
(active_learning_<preset>.csv), one row per run and round
(active_learning_<preset>_curves.csv), the comparison as Markdown and the
mean curves as a PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from runs import against_truth, arguments, machine_line, paired, paired_row, publish, results, train

ACQUISITIONS = ('random', 'entropy', 'least_confidence', 'entropy_mcd',
                'bald')
BASELINE = 'random'
METRICS = ('balanced_accuracy', 'kappa')
SHOWN = {'balanced_accuracy': 'balanced accuracy', 'kappa': 'kappa'}


def arm_name(acquisition: str, consistency: bool) -> str:
  return acquisition + ('+cr' if consistency else '')


def area(curve: pd.DataFrame, name: str) -> float:
  """Mean of metric `name` over the labeled range (trapezoid rule)."""
  x = curve['n_labeled'].to_numpy(float)
  y = curve[name].to_numpy(float)
  if len(x) < 2:
    return float(y[0]) if len(y) else float('nan')
  return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def run(preset: str, acquisition: str, consistency: bool, seed: int,
        workdir: Path, extra: list[str]) -> tuple[dict, pd.DataFrame]:
  """Runs (or resumes) one acquisition loop; (its row, its curve)."""
  seconds = train(
      'active_learning.py', preset, workdir,
      [f'--config.seed={seed}', f'--config.split.seed={seed}',
       f'--config.active.acquisition={acquisition}',
       f'--config.active.consistency={consistency}', *extra],
      done='curve.csv')
  curve = pd.read_csv(workdir / 'curve.csv')
  arm = arm_name(acquisition, consistency)
  row = {'arm': arm, 'seed': seed, 'preset': preset,
         'train_seconds': round(seconds, 1), 'workdir': str(workdir),
         'rounds': len(curve), 'final_n_labeled': int(curve['n_labeled'].iloc[-1])}
  for name in METRICS:
    row[f'{name}_area'] = area(curve, name)
    row[f'{name}_final'] = float(curve[name].iloc[-1])
  # The last round's model against the noise-free grades.
  last = workdir / f'round_{len(curve) - 1:02d}'
  row.update({f'{k}_final': v for k, v in against_truth(last).items()
              if not k.endswith('knees_truth')})
  return row, curve.assign(arm=arm, seed=seed)


def compare(rows: pd.DataFrame) -> str:
  """Every arm against random sampling without CR, over the seeds."""
  wide = rows.pivot(index='seed', columns='arm')
  sections = []
  for arm in rows['arm'].unique():
    if arm == BASELINE or BASELINE not in set(rows['arm']):
      continue
    lines = [f'### {arm} against {BASELINE}', '',
             f'| metric | {BASELINE} mean (sd) | {arm} mean (sd) | {arm} - '
             f'{BASELINE}, mean (min, max) | paired t p | Wilcoxon p |',
             '|---|---|---|---|---|---|']
    for name in METRICS:
      for kind, what in (('area', 'mean over the curve'),
                         ('final', 'at the last round')):
        column = f'{name}_{kind}'
        lines.append(paired_row(f'{SHOWN[name]}, {what}',
                                paired(wide[column][BASELINE],
                                       wide[column][arm])))
    for column, what in (('kl_accuracy_truth_final', 'accuracy'),
                         ('kl_kappa_truth_final', 'kappa')):
      if column in rows:
        lines.append(paired_row(
            f'{what} against the noise-free KL, at the last round',
            paired(wide[column][BASELINE], wide[column][arm])))
    sections.append('\n'.join(lines))
  return '\n\n'.join(sections)


def curves_png(curves: pd.DataFrame, path: Path, title: str) -> Path:
  """Each arm's mean curve over the seeds, the seeds' range shaded."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(4.2 * len(METRICS), 3.4), layout='constrained')
  axes = fig.subplots(1, len(METRICS), squeeze=False)[0]
  for ax, name in zip(axes, METRICS):
    for arm, group in curves.groupby('arm', sort=False):
      by_size = group.groupby('n_labeled')[name]
      x = np.asarray(by_size.mean().index, float)
      line, = ax.plot(x, by_size.mean().to_numpy(), marker='o', markersize=3,
                      label=arm, ls='--' if arm.endswith('+cr') else '-')
      ax.fill_between(x, by_size.min().to_numpy(), by_size.max().to_numpy(),
                      color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel('labeled knees')
    ax.set_ylabel(f'test {SHOWN[name]}')
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def main() -> None:
  def options(parser):
    parser.add_argument('--acquisitions', default='random,entropy,bald',
                        help='a subset of ' + ', '.join(ACQUISITIONS))
    parser.add_argument('--consistency', default='false,true',
                        help='without and/or with consistency '
                        'regularisation')
  args, parser = arguments('active_learning', __doc__.split('\n')[0],
                           options)
  acquisitions = args.acquisitions.split(',')
  unknown = sorted(set(acquisitions) - set(ACQUISITIONS))
  if unknown:
    parser.error(f'unknown acquisition(s) {", ".join(unknown)}; they are '
                 f'{", ".join(ACQUISITIONS)}')
  flags = {'false': False, 'true': True}
  if not set(args.consistency.split(',')) <= set(flags):
    parser.error(f'--consistency takes false and/or true; got '
                 f'{args.consistency!r}')
  consistency = [flags[v] for v in args.consistency.split(',')]
  rows, curves = [], []
  for seed in args.seeds:  # alternating the arms spreads any drift
    for acquisition in acquisitions:
      for cr in consistency:
        row, curve = run(args.preset, acquisition, cr, seed,
                         args.workdirs / f'{arm_name(acquisition, cr)}-seed'
                         f'{seed}', args.extra)
        rows.append(row)
        curves.append(curve)
  table, curves = pd.DataFrame(rows), pd.concat(curves, ignore_index=True)
  name = f'active_learning_{args.preset}'
  out = results(args.out, name, table)
  curves.to_csv(out / f'{name}_curves.csv', index=False)
  png = curves_png(curves, out / f'{name}.png',
                   f'Active learning, test set, preset {args.preset}')
  publish(out, name,
          f'# Active learning: acquisitions with and without consistency '
          f'regularisation, preset {args.preset}, seeds '
          f'{",".join(map(str, args.seeds))}\n\n{machine_line()}\n\nTest '
          f'set of every round; areas are the mean of the metric over the '
          f'labeled range.\n\n{compare(table)}\n\n'
          f'![mean curves, seeds\' range shaded]({png.name})\n')


if __name__ == '__main__':
  main()
