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
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import time

import numpy as np
import pandas as pd
from scipy import stats

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'benchmarks'))
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)
LOSSES = ('ce', 'hybrid')
METRICS = ('accuracy', 'f1', 'recall_1', 'recall_0', 'roc_auc',
           'balanced_accuracy')
SHOWN = {'recall_1': 'sensitivity', 'recall_0': 'specificity',
         'roc_auc': 'ROC AUC', 'f1': 'F1 (KL-2)',
         'balanced_accuracy': 'balanced accuracy'}


def run(preset: str, loss: str, seed: int, workdir: Path,
        extra: list[str]) -> dict:
  """Trains (or resumes) one run and returns its row."""
  metrics_json = workdir / 'metrics.json'
  seconds = float('nan')
  if not metrics_json.is_file():
    cmd = [sys.executable, '-m', 'koajax.main',
           f'--config={REPO / "configs" / "confidence.py"}:{preset}',
           f'--workdir={workdir}', f'--config.seed={seed}',
           f'--config.method_kwargs.loss_kind={loss}',
           '--config.progress_bar=False', *extra]
    print(f'training {loss} seed {seed} in {workdir}', flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    seconds = time.perf_counter() - start
  metrics = json.loads(metrics_json.read_text())['metrics']
  row = {'loss': loss, 'seed': seed, 'preset': preset,
         'train_seconds': round(seconds, 1), 'workdir': str(workdir)}
  for name in METRICS:
    row[name] = metrics[name]['estimate']
    row[f'{name}_ci_low'] = metrics[name]['ci_low']
    row[f'{name}_ci_high'] = metrics[name]['ci_high']
  return row


def compare(rows: pd.DataFrame) -> str:
  """The Markdown comparison of the two losses over the seeds."""
  wide = rows.pivot(index='seed', columns='loss')
  lines = ['| metric | CE mean (sd) | hybrid mean (sd) | hybrid - CE, mean '
           '(min, max) | paired t p | Wilcoxon p |',
           '|---|---|---|---|---|---|']
  for name in METRICS:
    ce, hybrid = wide[name]['ce'].to_numpy(), wide[name]['hybrid'].to_numpy()
    diff = hybrid - ce
    t_p = stats.ttest_rel(hybrid, ce).pvalue if len(diff) > 1 else np.nan
    # Exact two-sided Wilcoxon: with n seeds its smallest p is 2 / 2^n.
    w_p = (stats.wilcoxon(hybrid, ce).pvalue
           if len(diff) > 1 and np.any(diff) else np.nan)
    lines.append(
        f'| {SHOWN.get(name, name)} | {ce.mean():.4f} ({ce.std(ddof=1):.4f}) '
        f'| {hybrid.mean():.4f} ({hybrid.std(ddof=1):.4f}) | '
        f'{diff.mean():+.4f} ({diff.min():+.4f}, {diff.max():+.4f}) | '
        f'{t_p:.3f} | {w_p:.3f} |')
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
  text = (f'# Hybrid loss vs cross-entropy, preset {args.preset}, seeds '
          f'{args.seeds}\n\nMachine: {cpu_name()}, {os.cpu_count()} cores; Python '
          f'{platform.python_version()}.\n\n{compare(table)}\n')
  (out / f'confidence_{args.preset}.md').write_text(text)
  print(text)
  print(f'raw results: {csv}')


if __name__ == '__main__':
  main()
