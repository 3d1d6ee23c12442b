r"""Coherence learning's claims on koajax's data: the 2 x 2 ablation and the
low-label setting.

Zheng et al. (2021) report that the keypoint pooling network (KPN) and the
incoherence loss on unlabeled knees each add accuracy (KL 0.708 -> 0.727 and
the OARSI heads' mean 0.753 -> 0.764 on OAI, one run each), and that the loss
helps most when few knees have grades (Table 4). This script trains, for
several seeds and the same preset, split and budget (each run through
`koajax.main`, in its own workdir):

  kpn-coh   KPN + incoherence loss (the paper's method)
  kpn       KPN, no incoherence loss
  gap-coh   global pooling of the last stage + incoherence loss
  gap       global pooling, no incoherence loss (a plain multi-task ResNet)

with every grade (label fraction 1.0), and kpn-coh against kpn at each
further label fraction (default 0.2: a fifth of the training subjects'
grades, the rest in the unlabeled pool). It compares the test metrics seed
by seed: each arm's mean and spread, the paired difference, a paired t-test
and the Wilcoxon signed-rank test (SciPy).

  python benchmarks/reproduction/coherence.py --preset=quick --seeds=0,1,2

Runs are resumable (benchmarks/reproduction/runs.py). Raw results, one row
per run, go to `--out`/coherence_<preset>.csv and the comparison to a
Markdown file beside it. On a GPU the same script runs the paper's preset
(`--preset=default`, 60 epochs of ResNet-50 at 320 px).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from runs import against_truth, arguments, estimate, machine_line, paired, paired_row, publish, report, results, seeds_png, train

# arm -> (model.kpn, method_kwargs.coherence)
ARMS = {'kpn-coh': (True, True), 'kpn': (True, False),
        'gap-coh': (False, True), 'gap': (False, False)}
# Only the method's own pair runs at the lower label fractions.
LOW_LABEL_ARMS = ('kpn-coh', 'kpn')
# (section of metrics.json, metric): the paper's accuracies, then kappa.
METRICS = {'kl_accuracy': ('kl', 'accuracy'), 'kl_kappa': ('kl', 'kappa'),
           'kl_balanced_accuracy': ('kl', 'balanced_accuracy'),
           'oarsi_accuracy': ('mean', 'accuracy'),
           'oarsi_kappa': ('mean', 'kappa')}
SHOWN = {'kl_accuracy': 'KL accuracy', 'kl_kappa': 'KL kappa',
         'kl_balanced_accuracy': 'KL balanced accuracy',
         'oarsi_accuracy': 'OARSI mean accuracy',
         'oarsi_kappa': 'OARSI mean kappa',
         'log_density': 'mean log-density of the predictions',
         'incoherent': 'share of incoherent predictions',
         'kl_accuracy_truth': 'KL accuracy against the noise-free grades',
         'kl_kappa_truth': 'KL kappa against the noise-free grades'}
TRUTH = ('kl_accuracy_truth', 'kl_kappa_truth')
# (what is compared, arm a, arm b): b against a, at each label fraction.
CONTRASTS = (('incoherence loss, with KPN', 'kpn', 'kpn-coh'),
             ('incoherence loss, global pooling', 'gap', 'gap-coh'),
             ('KPN, no incoherence loss', 'gap', 'kpn'),
             ('KPN, with incoherence loss', 'gap-coh', 'kpn-coh'),
             ('KPN + incoherence loss against neither', 'gap', 'kpn-coh'))


def arms_of(fraction: float) -> tuple[str, ...]:
  return tuple(ARMS) if fraction == 1.0 else LOW_LABEL_ARMS


def workdir_name(arm: str, fraction: float, seed: int) -> str:
  return f'{arm}-labels{round(100 * fraction)}-seed{seed}'


def run(preset: str, arm: str, fraction: float, seed: int, workdir: Path,
        extra: list[str]) -> dict:
  """Trains (or resumes) one run and returns its row."""
  kpn, coherence = ARMS[arm]
  seconds = train(
      'coherence.py', preset, workdir,
      [f'--config.seed={seed}', f'--config.model.kpn={kpn}',
       f'--config.method_kwargs.coherence={coherence}',
       f'--config.split.label_fraction={fraction}', *extra])
  result = report(workdir)
  row = {'arm': arm, 'label_fraction': fraction, 'seed': seed,
         'preset': preset, 'train_seconds': round(seconds, 1),
         'workdir': str(workdir)}
  for column, (section, name) in METRICS.items():
    metrics = (result['heads'][section]['metrics'] if section != 'mean'
               else result['mean'])
    row.update({k.replace(name, column, 1): v
                for k, v in estimate(metrics, name).items()})
  predicted = result['coherence']['predicted']
  row['log_density'] = predicted['mean_log_density']
  row['incoherent'] = predicted['incoherent']['any']
  row.update(against_truth(workdir))
  return row


def compare(rows: pd.DataFrame) -> str:
  """The Markdown comparison: one table per contrast and label fraction
  whose two arms both ran, one row per metric."""
  sections = []
  for fraction in sorted(rows['label_fraction'].unique(), reverse=True):
    at = rows[rows['label_fraction'] == fraction]
    wide = at.pivot(index='seed', columns='arm')
    for label, a, b in CONTRASTS:
      if a not in set(at['arm']) or b not in set(at['arm']):
        continue
      lines = [f'### {label}: {b} against {a}, '
               f'{round(100 * fraction)} % of the grades', '',
               f'| metric | {a} mean (sd) | {b} mean (sd) | {b} - {a}, mean '
               '(min, max) | paired t p | Wilcoxon p |',
               '|---|---|---|---|---|---|']
      for name in (*METRICS, 'log_density', 'incoherent', *TRUTH):
        if name in at:
          lines.append(paired_row(SHOWN[name],
                                  paired(wide[name][a], wide[name][b])))
      sections.append('\n'.join(lines))
  return '\n\n'.join(sections)


def main() -> None:
  def options(parser):
    parser.add_argument('--fractions', default='1.0,0.2',
                        help='label fractions; all four arms run at 1.0, '
                        'kpn-coh and kpn at the others')
    parser.add_argument('--arms', default=','.join(ARMS),
                        help='a subset of ' + ', '.join(ARMS))
  args, parser = arguments('coherence', __doc__.split('\n')[0], options)
  fractions = [float(f) for f in args.fractions.split(',')]
  chosen = args.arms.split(',')
  unknown = sorted(set(chosen) - set(ARMS))
  if unknown:
    parser.error(f'unknown arm(s) {", ".join(unknown)}; the arms are '
                 f'{", ".join(ARMS)}')
  rows = []
  for seed in args.seeds:  # alternating the arms spreads any drift
    for fraction in fractions:
      for arm in arms_of(fraction):
        if arm in chosen:
          rows.append(run(args.preset, arm, fraction, seed,
                          args.workdirs / workdir_name(arm, fraction, seed),
                          args.extra))
  table = pd.DataFrame(rows)
  name = f'coherence_{args.preset}'
  out = results(args.out, name, table)
  png = seeds_png(table, arm='arm', arms=list(ARMS), panel='label_fraction',
                  metrics={k: SHOWN[k] for k in ('kl_accuracy', 'kl_kappa',
                                                 'oarsi_accuracy',
                                                 'oarsi_kappa')},
                  path=out / f'{name}.png',
                  title=f'Coherence learning, test set, preset {args.preset}')
  publish(out, name,
          f'# Coherence learning: KPN x incoherence loss, preset '
          f'{args.preset}, seeds {",".join(map(str, args.seeds))}\n\n'
          f'{machine_line()}\n\nTest set of each run; metrics of the '
          f'snapshot the run kept.\n\n{compare(table)}\n\n'
          f'![each seed]({png.name})\n')


if __name__ == '__main__':
  main()
