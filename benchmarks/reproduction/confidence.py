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

from pathlib import Path

import pandas as pd

from runs import against_truth, arguments, estimate, machine_line, paired, paired_row, publish, report, results, seeds_png, train

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


def main() -> None:
  args, _ = arguments('confidence', __doc__.split('\n')[0])
  rows = []
  for seed in args.seeds:  # alternating the losses spreads any drift
    for loss in LOSSES:
      rows.append(run(args.preset, loss, seed,
                      args.workdirs / f'{loss}-seed{seed}', args.extra))
  table = pd.DataFrame(rows)
  name = f'confidence_{args.preset}'
  out = results(args.out, name, table)
  png = seeds_png(table, arm='loss', arms=list(LOSSES),
                  metrics={'accuracy': 'accuracy', 'f1': 'F1 (KL-2)',
                           'roc_auc': 'ROC AUC'},
                  path=out / f'{name}.png',
                  title=f'Hybrid loss vs CE, test set, preset {args.preset}')
  publish(out, name,
          f'# Hybrid loss vs cross-entropy, preset {args.preset}, seeds '
          f'{",".join(map(str, args.seeds))}\n\n{machine_line()}\n\n'
          f'{compare(table)}\n\n![each seed]({png.name})\n')


if __name__ == '__main__':
  main()
