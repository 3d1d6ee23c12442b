r"""Semixup's claim on koajax's data: Semixup against supervised learning.

Thabet Nguyen et al. (2020) report that Semixup with few labels matches or
beats supervised learning (SL) with many, and beats SL at the same labels
(one-sided Wilcoxon test over 20 subject-disjoint chunks of the test set).
This script trains SL and Semixup (and, with --methods, the Pi-model, ICT
and MixMatch baselines) at each label setting (labels per KL grade, with the
preset's unlabeled multiple) for several seeds, each run through
`koajax.main` in its own workdir, then compares Semixup with SL:

  per setting, over the seeds: each method's mean and spread of test
  balanced accuracy, kappa and ROC AUC, the paired difference, a paired
  t-test and the Wilcoxon signed-rank test (SciPy);
  per seed (the seed of the run and of its split, which knees get
  labels): the paper's one-sided Wilcoxon test of "Semixup beats SL" over
  20 subject-disjoint chunks of the test knees
  (`koajax.evaluation.compare.compare_predictions`).

With --ablation, Semixup without each consistency term (the paper's Table
V: in-manifold, out-of-manifold, interpolation) at the first label setting.

  python benchmarks/reproduction/semixup.py --preset=quick --labels=25,50 \
      --seeds=0,1,2 --ablation

Runs are resumable (benchmarks/reproduction/runs.py). Raw results, one row
per run, go to `--out`/semixup_<preset>.csv and the comparison to a
Markdown file beside it. On a GPU the same script runs the paper's preset
(`--preset=default`; 100 and more labels per grade need OAI-sized data).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from runs import against_truth, arguments, estimate, machine_line, paired, paired_row, publish, report, results, seeds_png, train
from koajax import cli
from koajax.evaluation import compare

METHODS = ('supervised', 'semixup', 'pi_model', 'ict', 'mixmatch')
# Table V: each consistency term of Semixup switched off.
ABLATIONS = {'semixup-no-in-manifold': 'in_manifold',
             'semixup-no-out-of-manifold': 'out_of_manifold',
             'semixup-no-interpolation': 'interpolation'}
METRICS = ('balanced_accuracy', 'kappa', 'roc_auc')
SHOWN = {'balanced_accuracy': 'balanced accuracy', 'kappa': 'kappa',
         'roc_auc': 'ROC AUC (KL >= 2)',
         'kl_accuracy_truth': 'accuracy against the noise-free KL',
         'kl_kappa_truth': 'kappa against the noise-free KL'}
TRUTH = ('kl_accuracy_truth', 'kl_kappa_truth')
BASELINE = 'supervised'
CHUNKS = 20  # the paper's subject-disjoint chunks


def run(preset: str, arm: str, labels: int, seed: int, workdir: Path,
        extra: list[str]) -> dict:
  """Trains (or resumes) one run and returns its row."""
  method, overrides = arm, []
  if arm in ABLATIONS:
    method = 'semixup'
    overrides = [f'--config.method_kwargs.terms.{ABLATIONS[arm]}=0']
  seconds = train(
      f'{method}.py', preset, workdir,
      [f'--config.seed={seed}', f'--config.split.seed={seed}',
       f'--config.split.labels_per_grade={labels}', *overrides, *extra])
  result = report(workdir)
  row = {'arm': arm, 'labels_per_grade': labels, 'seed': seed,
         'preset': preset, 'train_seconds': round(seconds, 1),
         'workdir': str(workdir)}
  for name in METRICS:
    row.update(estimate(result['metrics'], name))
  row.update(against_truth(workdir))
  return row


def chunked_tests(rows: pd.DataFrame, arm: str) -> list[str]:
  """The paper's per-seed test of `arm` against SL, as table rows."""
  lines = []
  for (labels, seed), group in rows.groupby(['labels_per_grade', 'seed']):
    dirs = dict(zip(group['arm'], group['workdir']))
    if arm not in dirs or BASELINE not in dirs:
      continue
    paths = [Path(dirs[a]) / 'predictions.csv' for a in (arm, BASELINE)]
    try:
      result = compare.compare_predictions(*paths, n_chunks=CHUNKS)
    except cli.BadInput:  # a test set of fewer than 20 subjects
      lines.append(f'| {labels} | {seed} | — | — | — | not run: fewer than '
                   f'{CHUNKS} test subjects |')
      continue
    lines.append(f'| {labels} | {seed} | {result["n_knees"]} | '
                 f'{result["mean_a"]:.4f} | {result["mean_b"]:.4f} | '
                 f'{result["p_value"]:.4f} |')
  return lines


def compare_arms(rows: pd.DataFrame) -> str:
  """The Markdown comparison, per label setting: every method against SL,
  every ablation against the whole of Semixup."""
  sections = []
  for labels in sorted(rows['labels_per_grade'].unique()):
    at = rows[rows['labels_per_grade'] == labels]
    wide = at.pivot(index='seed', columns='arm')
    for arm in at['arm'].unique():
      base = 'semixup' if arm in ABLATIONS else BASELINE
      if arm == BASELINE or base not in set(at['arm']):
        continue
      lines = [f'### {arm} against {base}, {labels} labels per grade', '',
               f'| metric | {base} mean (sd) | {arm} mean (sd) | {arm} - '
               f'{base}, mean (min, max) | paired t p | Wilcoxon p |',
               '|---|---|---|---|---|---|']
      for name in (*METRICS, *TRUTH):
        if name in at:
          lines.append(paired_row(SHOWN[name], paired(wide[name][base],
                                                      wide[name][arm])))
      sections.append('\n'.join(lines))
  settings = sorted(rows['labels_per_grade'].unique())
  if len(settings) > 1 and 'semixup' in set(rows['arm']):
    # The paper's headline: Semixup with few labels against SL with more.
    low, high = settings[0], settings[-1]
    few = rows[(rows['arm'] == 'semixup') & (rows['labels_per_grade'] == low)
               ].set_index('seed')
    many = rows[(rows['arm'] == BASELINE)
                & (rows['labels_per_grade'] == high)].set_index('seed')
    seeds = sorted(set(few.index) & set(many.index))
    if seeds:
      lines = [f'### semixup with {low} labels per grade against {BASELINE} '
               f'with {high}', '',
               f'| metric | {BASELINE} ({high}) mean (sd) | semixup ({low}) '
               f'mean (sd) | difference, mean (min, max) | paired t p | '
               'Wilcoxon p |', '|---|---|---|---|---|---|']
      for name in (*METRICS, *TRUTH):
        if name in rows:
          lines.append(paired_row(SHOWN[name], paired(
              many.loc[seeds, name], few.loc[seeds, name])))
      sections.append('\n'.join(lines))
  tests = chunked_tests(rows, 'semixup')
  if tests:
    sections.append('\n'.join([
        f'### Semixup beats supervised? One-sided Wilcoxon over {CHUNKS} '
        'subject-disjoint chunks of the test knees (balanced accuracy)', '',
        '| labels per grade | seed | test knees | semixup, chunk mean | '
        'supervised, chunk mean | p |', '|---|---|---|---|---|---|',
        *tests]))
  return '\n\n'.join(sections)


def main() -> None:
  def options(parser):
    parser.add_argument('--labels', default='25,50',
                        help='labels per KL grade, one setting each')
    parser.add_argument('--methods', default='supervised,semixup',
                        help='a subset of ' + ', '.join(METHODS))
    parser.add_argument('--ablation', action='store_true',
                        help='also Semixup without each consistency term, '
                        'at the first label setting')
  args, parser = arguments('semixup', __doc__.split('\n')[0], options)
  settings = [int(n) for n in args.labels.split(',')]
  methods = args.methods.split(',')
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f'unknown method(s) {", ".join(unknown)}; the methods are '
                 f'{", ".join(METHODS)}')
  rows = []
  for seed in args.seeds:  # alternating the arms spreads any drift
    for labels in settings:
      arms = list(methods)
      if args.ablation and labels == settings[0]:
        arms += list(ABLATIONS)
      for arm in arms:
        rows.append(run(args.preset, arm, labels, seed,
                        args.workdirs / f'{arm}-labels{labels}-seed{seed}',
                        args.extra))
  table = pd.DataFrame(rows)
  name = f'semixup_{args.preset}'
  out = results(args.out, name, table)
  png = seeds_png(table, arm='arm', arms=[*METHODS, *ABLATIONS],
                  panel='labels_per_grade',
                  metrics={k: SHOWN[k] for k in ('balanced_accuracy',
                                                 'kappa')},
                  path=out / f'{name}.png',
                  title=f'Semixup and SL, test set, preset {args.preset}')
  publish(out, name,
          f'# Semixup against supervised learning, preset {args.preset}, '
          f'seeds {",".join(map(str, args.seeds))}\n\n{machine_line()}\n\n'
          f'Test set of each run; metrics of the snapshot the run kept.\n\n'
          f'{compare_arms(table)}\n\n![each seed]({png.name})\n')


if __name__ == '__main__':
  main()
