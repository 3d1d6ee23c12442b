r"""The confidence-driven paper's claim on koajax's data: hybrid loss vs CE.

Wang et al. (2025) report that their hybrid loss beats plain cross-entropy
on KL-0 vs KL-2 (accuracy 88.38 % -> 89.14 %, one run each). This script
trains both losses with the same preset, split and budget for several seeds
(each run through `koajax.main`, in its own workdir), then compares the
test metrics seed by seed: mean and spread of each loss, the paired
difference, a paired t-test and the Wilcoxon signed-rank test (SciPy).

  python benchmarks/reproduction/confidence.py --preset=quick --seeds=0,1,2

Runs are resumable: a finished run (its metrics.json) is read, not
retrained, and a killed one goes on from its last checkpoint, so the same
command picks up where it stopped. Raw results, one row per run, go to
`--out`/confidence_<preset>.csv and the comparison to a Markdown file
beside it. On a GPU the same script runs the paper's preset
(`--preset=default`, 500 epochs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from runs import REPO, against_truth, estimate, machine_line, paired, paired_row, report, seeds_png, train

LOSSES = ('ce', 'hybrid')
METRICS = ('accuracy', 'f1', 'recall_1', 'recall_0', 'roc_auc',
           'balanced_accuracy')
SHOWN = {'recall_1': 'sensitivity', 'recall_0': 'specificity',
         'roc_auc': 'ROC AUC', 'f1': 'F1 (KL-2)',
         'balanced_accuracy': 'balanced accuracy',
         'kl0_vs_kl2_accuracy_truth': 'accuracy against the noise-free KL',
         'kl0_vs_kl2_kappa_truth': 'kappa against the noise-free KL'}
TRUTH = ('kl0_vs_kl2_accuracy_truth', 'kl0_vs_kl2_kappa_truth')


def run(preset: str, loss: str, seed: int, workdir: Path,
        extra: list[str]) -> dict:
  """Trains (or resumes) one run and returns its row."""
  seconds = train(
      'confidence.py', preset, workdir,
      [f'--config.seed={seed}', f'--config.method_kwargs.loss_kind={loss}',
       *extra])
  result = report(workdir)
  row = {'loss': loss, 'seed': seed, 'preset': preset,
         'train_seconds': round(seconds, 1), 'workdir': str(workdir)}
  for name in METRICS:
    row.update(estimate(result['metrics'], name))
  row.update(against_truth(workdir))
  return row


def compare(rows: pd.DataFrame) -> str:
  """The Markdown comparison of the two losses over the seeds."""
  wide = rows.pivot(index='seed', columns='loss')
  lines = ['| metric | CE mean (sd) | hybrid mean (sd) | hybrid - CE, mean '
           '(min, max) | paired t p | Wilcoxon p |',
           '|---|---|---|---|---|---|']
  for name in METRICS:
    lines.append(paired_row(SHOWN.get(name, name),
                            paired(wide[name]['ce'], wide[name]['hybrid'])))
  for name in TRUTH:
    if name in rows:
      lines.append(paired_row(SHOWN[name], paired(wide[name]['ce'],
                                                  wide[name]['hybrid'])))
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='quick')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default=str(
      Path.home() / '.cache' / 'koajax' / 'reproduction' / 'confidence'),
                      help='folder of the runs\' workdirs')
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' /
                                           'reproduction'))
  parser.add_argument('extra', nargs='*',
                      help='more --config.FIELD=VALUE for every run')
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  rows = []
  for seed in seeds:  # alternating the losses spreads any drift of the host
    for loss in LOSSES:
      rows.append(run(args.preset, loss, seed,
                      Path(args.root) / args.preset / f'{loss}-seed{seed}',
                      args.extra))
  table = pd.DataFrame(rows)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  csv = out / f'confidence_{args.preset}.csv'
  table.to_csv(csv, index=False)
  png = seeds_png(table, arm='loss', arms=list(LOSSES),
                  metrics={'accuracy': 'accuracy', 'f1': 'F1 (KL-2)',
                           'roc_auc': 'ROC AUC'},
                  path=out / f'confidence_{args.preset}.png',
                  title=f'Hybrid loss vs CE, test set, preset {args.preset}')
  text = (f'# Hybrid loss vs cross-entropy, preset {args.preset}, seeds '
          f'{args.seeds}\n\n{machine_line()}\n\n{compare(table)}\n\n'
          f'![each seed]({png.name})\n')
  (out / f'confidence_{args.preset}.md').write_text(text)
  print(text)
  print(f'raw results: {csv}')


if __name__ == '__main__':
  main()
