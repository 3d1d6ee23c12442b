r"""The multi-task OARSI paper's claims on koajax's data: one network grades
KL and the six OARSI features, and an ensemble grades better than its
members.

Tiulpin & Saarakkala (2020) train one network with seven heads (KL and the
OARSI osteophyte and joint-space-narrowing grades) and report, for the
ensemble of two ImageNet-pretrained backbones x 5 fold snapshots, KL kappa
0.82 and balanced accuracy 66.7 % on MOST (single OAI models 0.81). This
script trains one run per seed (`configs/oarsi.py`, fold = seed, so the
members see different training knees as the paper's fold snapshots do),
then evaluates, with `koajax.evaluate`, every pair of members and all of
them as ensembles (probabilities averaged) on the same held-out site:

  per run and per ensemble: every head's kappa, balanced accuracy and
  accuracy (bootstrap CIs), the OARSI heads' mean, and KL accuracy and
  kappa against the synthetic generator's noise-free grades;
  per pair: the ensemble against the mean and against the better of its
  two members, paired over the pairs (t-test and Wilcoxon, SciPy).

  python benchmarks/reproduction/oarsi.py --preset=quick --seeds=0,1,2

The paper's ImageNet transfer needs a weights file (`model.init`;
nothing is downloaded): pass `--config.model.init=...` and a preset whose
backbone it fits to run the members from it. Runs are resumable
(benchmarks/reproduction/runs.py), ensembles are read once written. Raw
results go to `--out`/oarsi_<preset>.csv and the comparison to a Markdown
file beside it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
import subprocess
import sys

import pandas as pd

from runs import REPO, against_truth, arguments, estimate, machine_line, paired, paired_row, publish, report, results, seeds_png, train

HEADS = ('kl', 'ost_tl', 'ost_fl', 'jsn_l', 'ost_tm', 'ost_fm', 'jsn_m')
METRICS = ('kappa', 'balanced_accuracy', 'accuracy')
SHOWN = {'kl_kappa': 'KL kappa', 'kl_balanced_accuracy': 'KL balanced accuracy',
         'kl_accuracy': 'KL accuracy', 'mean_kappa': 'OARSI mean kappa',
         'mean_balanced_accuracy': 'OARSI mean balanced accuracy',
         'mean_accuracy': 'OARSI mean accuracy',
         'kl_accuracy_truth': 'KL accuracy against the noise-free grades',
         'kl_kappa_truth': 'KL kappa against the noise-free grades'}


def scores(workdir: Path, result: dict, predictions_csv: Path) -> dict:
  """The columns of one run or ensemble: every head's metrics, the OARSI
  mean and the noise-free comparison."""
  row = {}
  for head in HEADS:
    for name in METRICS:
      row.update({f'{head}_{k}': v for k, v in estimate(
          result['heads'][head]['metrics'], name).items()})
  for name in METRICS:
    row.update({f'mean_{k}': v for k, v in estimate(result['mean'],
                                                    name).items()})
  truth = against_truth(workdir, predictions_csv)
  row.update({k: v for k, v in truth.items() if k.startswith('kl_')})
  return row


def member(preset: str, seed: int, workdir: Path, extra: list[str]) -> dict:
  """Trains (or resumes) one member and returns its row."""
  seconds = train('oarsi.py', preset, workdir,
                  [f'--config.seed={seed}', f'--config.split.fold={seed}',
                   *extra])
  return {'arm': 'single', 'members': workdir.name, 'seed': seed,
          'preset': preset, 'train_seconds': round(seconds, 1),
          'workdir': str(workdir),
          **scores(workdir, report(workdir), workdir / 'predictions.csv')}


def ensemble(preset: str, workdirs: list[Path], out: Path) -> dict:
  """Evaluates `workdirs` as one ensemble into `out` (once) and returns its
  row."""
  if not (out / 'metrics.json').is_file():
    subprocess.run([sys.executable, '-m', 'koajax.evaluate',
                    f'--workdir={",".join(map(str, workdirs))}',
                    f'--out={out}'], cwd=REPO, check=True)
  # With a held-out test site every fold tests the same knees; without one
  # (the smoke preset) each fold's test knees are its validation fold and
  # the ensemble is evaluated on the first member's, which the others saw.
  knees = [set(pd.read_csv(w / 'predictions.csv', usecols=['knee_id'])
               ['knee_id']) for w in workdirs]
  return {'arm': f'ensemble of {len(workdirs)}',
          'members': '+'.join(w.name for w in workdirs), 'seed': None,
          'preset': preset, 'workdir': str(out),
          'same_test_knees': all(k == knees[0] for k in knees),
          **scores(workdirs[0], report(out), out / 'predictions.csv')}


def compare(rows: pd.DataFrame) -> str:
  """Each pair's ensemble against its members, paired over the pairs."""
  singles = rows[rows['arm'] == 'single'].set_index('members')
  pairs = rows[rows['arm'] == 'ensemble of 2']
  columns = [c for c in SHOWN if c in rows]
  lines = ['| metric | members mean (sd) | ensemble mean (sd) | ensemble - '
           'members mean (min, max) | paired t p | Wilcoxon p |',
           '|---|---|---|---|---|---|']
  best_lines = list(lines[:2])
  for column in columns:
    members = [singles.loc[p.split('+'), column] for p in pairs['members']]
    lines.append(paired_row(SHOWN[column], paired(
        [m.mean() for m in members], pairs[column])))
    best_lines.append(paired_row(SHOWN[column], paired(
        [m.max() for m in members], pairs[column])))
  best_lines[0] = best_lines[0].replace('members mean (sd)',
                                        'better member (sd)').replace(
                                            'ensemble - members mean',
                                            'ensemble - better member')
  table = ['| run | ' + ' | '.join(SHOWN[c] for c in columns) + ' |',
           '|---|' + '---|' * len(columns)]
  for _, r in rows.iterrows():
    table.append(f"| {r['arm']}: {r['members']} | "
                 + ' | '.join(f'{r[c]:.3f}' for c in columns) + ' |')
  return ('## Every run and ensemble (test set)\n\n' + '\n'.join(table)
          + '\n\n## Each pair\'s ensemble against the mean of its two '
          'members\n\n' + '\n'.join(lines)
          + '\n\n## Each pair\'s ensemble against the better of its two '
          'members\n\n' + '\n'.join(best_lines))


def main() -> None:
  args, _ = arguments('oarsi', __doc__.split('\n')[0])
  workdirs = {seed: args.workdirs / f'fold{seed}' for seed in args.seeds}
  rows = [member(args.preset, seed, workdirs[seed], args.extra)
          for seed in args.seeds]
  groups = [list(p) for p in itertools.combinations(args.seeds, 2)]
  if len(args.seeds) > 2:
    groups.append(list(args.seeds))
  for group in groups:
    name = 'ensemble-' + '+'.join(f'fold{s}' for s in group)
    rows.append(ensemble(args.preset, [workdirs[s] for s in group],
                         args.workdirs / name))
  table = pd.DataFrame(rows)
  name = f'oarsi_{args.preset}'
  out = results(args.out, name, table)
  pairs = table[table['arm'] == 'ensemble of 2']
  text = (f'# Multi-task OARSI: ensembles against their members, preset '
          f'{args.preset}, folds and seeds {",".join(map(str, args.seeds))}'
          f'\n\n{machine_line()}\n\n{compare(table)}\n')
  if not pairs['same_test_knees'].all():
    text += ('\n**The members were tested on different knees** (no held-out '
             'test site): each ensemble was evaluated on its first member\'s '
             'test knees, which the other members trained on. Not a fair '
             'comparison.\n')
  if len(pairs) > 1:
    # Per pair: its two members and their ensemble, joined by a line.
    long = []
    for i, (_, pair) in enumerate(pairs.iterrows()):
      for arm, members in [('member A', pair['members'].split('+')[0]),
                           ('member B', pair['members'].split('+')[1])]:
        single = table[(table['arm'] == 'single')
                       & (table['members'] == members)].iloc[0]
        long.append({**single.to_dict(), 'arm': arm, 'seed': i})
      long.append({**pair.to_dict(), 'arm': 'ensemble', 'seed': i})
    png = seeds_png(pd.DataFrame(long), arm='arm',
                    arms=['member A', 'member B', 'ensemble'],
                    metrics={'kl_kappa': 'KL kappa',
                             'mean_kappa': 'OARSI mean kappa',
                             'kl_balanced_accuracy': 'KL balanced accuracy'},
                    path=out / f'{name}.png',
                    title=f'Pairs of fold runs and their ensembles, preset '
                    f'{args.preset}')
    text += f'\n![each pair]({png.name})\n'
  publish(out, name, text)


if __name__ == '__main__':
  main()
