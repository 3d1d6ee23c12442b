"""What every reproduction script shares: resumable runs of `koajax.main`
and the paired comparison of two arms over seeds.

A run lives in its own workdir. Its `metrics.json` means it finished and is
read, not retrained; a workdir without one goes on from its last checkpoint
(`koajax.main` resumes), so a killed script picks up where it stopped.
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
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'benchmarks'))
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)


def train(config: str, preset: str, workdir: Path, overrides: list[str], *,
          done: str = 'metrics.json') -> float:
  """Trains the run unless its file `done` says it finished; returns the
  seconds the scripts spent training it. `config` is a file under configs/.
  The seconds are kept beside the workdir (<workdir>.seconds), so a table
  written again keeps them; nan for a run trained some other way."""
  ledger = workdir.with_name(workdir.name + '.seconds')
  if not (workdir / done).is_file():
    cmd = [sys.executable, '-m', 'koajax.main',
           f'--config={REPO / "configs" / config}:{preset}',
           f'--workdir={workdir}', '--config.progress_bar=False', *overrides]
    print(f'training {workdir.name}: {" ".join(cmd[3:])}', flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    # A run resumed after a kill counts the part that finished it.
    ledger.write_text(f'{time.perf_counter() - start:.1f}\n')
  return float(ledger.read_text()) if ledger.is_file() else float('nan')


def report(workdir: Path) -> dict[str, Any]:
  """The test report (metrics.json) of a finished run."""
  return json.loads((workdir / 'metrics.json').read_text())


def against_truth(workdir: Path,
                  predictions_csv: Path | None = None) -> dict[str, float]:
  """Accuracy and quadratic kappa of a run's test predictions (or of
  `predictions_csv`, an evaluation of the run, e.g. an ensemble) against the
  synthetic generator's noise-free grades (raw/truth.csv), per head:
  <head>_accuracy_truth, <head>_kappa_truth and <head>_knees_truth (the
  knees the task takes by their true grades, e.g. true KL 0 or 2 for KL-0
  vs KL-2). Beside the metrics against the recorded (reader) grades, they
  show how much of the remaining error is reader noise. {} for a run on
  other data."""
  from sklearn import metrics
  from koajax import config_lib
  from koajax import tasks
  from koajax.data import schema
  from koajax.data import sources
  from koajax.evaluation import predictions
  config = config_lib.load_run_config(workdir)
  if config.data.source != 'synthetic':
    return {}
  truth = pd.read_csv(sources.synthetic_dir(config.data) / 'raw' /
                      'truth.csv', dtype={'subject_id': str})
  truth.index = [schema.knee_id(s, v, d) for s, v, d in
                 zip(truth['subject_id'], truth['visit'], truth['side'])]
  frame, _, probs = predictions.read_heads(
      predictions_csv or workdir / 'predictions.csv')
  task = tasks.from_config(config)
  true = task.index_labels(truth.loc[frame['knee_id']])
  out = {}
  for head in task.head_names:
    keep = true[head] >= 0
    y, pred = true[head][keep], probs[head][keep].argmax(axis=1)
    classes = list(range(probs[head].shape[1]))
    out[f'{head}_accuracy_truth'] = metrics.accuracy_score(y, pred)
    out[f'{head}_kappa_truth'] = metrics.cohen_kappa_score(
        y, pred, labels=classes, weights='quadratic')
    out[f'{head}_knees_truth'] = int(keep.sum())
  return out


def estimate(metrics: dict[str, Any], name: str) -> dict[str, float]:
  """{name, name_ci_low, name_ci_high} of one metric of a report section."""
  m = metrics[name]
  return {name: m['estimate'], f'{name}_ci_low': m['ci_low'],
          f'{name}_ci_high': m['ci_high']}


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """b against a over the same seeds: means, spreads, the paired
  difference, a paired t-test and the exact two-sided Wilcoxon signed-rank
  test (with n seeds its smallest p is 2 / 2^n)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  diff = b - a
  n = len(diff)
  return {
      'n': n, 'mean_a': a.mean(), 'sd_a': a.std(ddof=1) if n > 1 else np.nan,
      'mean_b': b.mean(), 'sd_b': b.std(ddof=1) if n > 1 else np.nan,
      'diff': diff.mean(), 'diff_min': diff.min(), 'diff_max': diff.max(),
      't_p': stats.ttest_rel(b, a).pvalue if n > 1 else np.nan,
      'wilcoxon_p': (stats.wilcoxon(b, a).pvalue
                     if n > 1 and np.any(diff) else np.nan)}


def paired_row(label: str, result: dict[str, float]) -> str:
  """One Markdown table row of `paired`'s result."""
  r = result
  return (f'| {label} | {r["mean_a"]:.4f} ({r["sd_a"]:.4f}) | '
          f'{r["mean_b"]:.4f} ({r["sd_b"]:.4f}) | {r["diff"]:+.4f} '
          f'({r["diff_min"]:+.4f}, {r["diff_max"]:+.4f}) | {r["t_p"]:.3f} | '
          f'{r["wilcoxon_p"]:.3f} |')


def machine_line() -> str:
  return (f'Machine: {cpu_name()}, {os.cpu_count()} cores; Python '
          f'{platform.python_version()}.')


def seeds_png(rows: pd.DataFrame, *, arm: str, arms: list[str],
              metrics: dict[str, str], path: Path, title: str,
              panel: str | None = None) -> Path:
  """One panel per metric (per `panel` value too, if given): each seed's
  value of every arm, a seed's arms joined by a grey line, the arms' means
  as black bars. `arm` names the column holding the arm."""
  from matplotlib.figure import Figure
  panels = [None] if panel is None else sorted(rows[panel].unique(),
                                               reverse=True)
  fig = Figure(figsize=(3.2 * len(metrics), 2.8 * len(panels)),
               layout='constrained')
  axes = fig.subplots(len(panels), len(metrics), squeeze=False)
  for r, value in enumerate(panels):
    at = rows if value is None else rows[rows[panel] == value]
    shown = [a for a in arms if a in set(at[arm])]
    for c, (name, label) in enumerate(metrics.items()):
      ax = axes[r, c]
      wide = at.pivot(index='seed', columns=arm, values=name)[shown]
      x = np.arange(len(shown))
      for _, seed_values in wide.iterrows():
        ax.plot(x, seed_values.to_numpy(), color='0.7', marker='o',
                markersize=4, lw=1)
      ax.hlines(wide.mean().to_numpy(), x - 0.25, x + 0.25, color='k', lw=2)
      ax.set_xticks(x, shown, rotation=30, ha='right', fontsize=8)
      ax.set_title(label if value is None else f'{label}, {panel} {value}',
                   fontsize=9)
  fig.suptitle(title, fontsize=10)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def arguments(paper: str, description: str,
              extra: Any = None) -> tuple[argparse.Namespace, Any]:
  """(parsed arguments, the parser) of a reproduction script: --preset,
  --seeds, --root (the runs' workdirs, default
  ~/.cache/koajax/reproduction/<paper>), --out and the trailing
  --config.FIELD=VALUE for every run, plus what `extra(parser)` adds."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--preset', default='quick')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default=str(
      Path.home() / '.cache' / 'koajax' / 'reproduction' / paper),
                      help='folder of the runs\' workdirs')
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' /
                                           'reproduction'))
  if extra is not None:
    extra(parser)
  parser.add_argument('extra', nargs='*',
                      help='more --config.FIELD=VALUE for every run')
  args, unknown = parser.parse_known_args()
  # --config.FIELD=VALUE go to every run as they are; anything else is a
  # mistake the parser names.
  fields = [a for a in unknown if a.startswith('--config.')]
  if len(fields) < len(unknown):
    parser.error('unrecognized arguments: ' + ' '.join(
        a for a in unknown if not a.startswith('--config.')))
  args.extra = [*args.extra, *fields]
  args.seeds = [int(seed) for seed in args.seeds.split(',')]
  args.workdirs = Path(args.root) / args.preset
  return args, parser


def results(out: str | Path, name: str, table: pd.DataFrame) -> Path:
  """Writes the raw rows to `out`/<name>.csv; returns the folder."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  table.to_csv(out / f'{name}.csv', index=False)
  return out


def publish(out: Path, name: str, text: str) -> None:
  """The comparison as `out`/<name>.md, printed too."""
  (out / f'{name}.md').write_text(text)
  print(text)
  print(f'raw results: {out / name}.csv')
