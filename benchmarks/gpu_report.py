r"""Gathers the JSON files of benchmarks/gpu.sh into one JSON and one table.

Reads, from the folder given, whatever of these the script wrote:
  train_step*.json         SL and Semixup steps (batch, dtype, PyTorch eager
                           and torch.compile)
  oarsi_step.json, confidence_step.json, coherence_step.json,
  landmark_step.json       the method networks' steps (the localiser's also
                           its prediction, `predict_img_s`)
  mc_dropout.json          the MC-dropout sweep's modes
  pipeline.json            the input pipeline by worker count
  stages.tsv               each stage's outcome (ok, failed, timed_out,
                           skipped) and seconds
  traces/*/                jax.profiler traces of steps (trace_summary.py)
and writes `gpu.json` (everything, with the machine and the peak used) and
`gpu.md` (Markdown tables) beside them. Each step row gets koajax's
achieved TFLOP/s (XLA's operation count of the step over its median time)
and the share of the device's peak; the pipeline rows get the ratio of what
the pipeline delivers to what the fastest Semixup step consumes. The
issue's GPU targets are checked at the end of the Markdown:
  Semixup batch 256 bfloat16 at least 3x PyTorch eager and 35 % of peak;
  MC-dropout sweep at least 5x the loop of T passes;
  the input pipeline (with workers) at least 3x what the step consumes.

  python benchmarks/gpu_report.py /tmp/koajax-gpu [--peak_tflops=790]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trace_summary  # noqa: E402  (benchmarks/trace_summary.py)

# Dense bfloat16 peak, TFLOP/s, by a substring of JAX's device_kind.
PEAK_BF16_TFLOPS = {'H200': 790.0, 'H100': 989.0, 'A100': 312.0}

# (file stem prefix, the row field that names the step, the step's family)
STEP_FILES = (('train_step', 'method', 'Semixup network'),
              ('oarsi_step', 'network', 'multi-task OARSI'),
              ('confidence_step', 'loss', 'Siamese-GAP'),
              ('coherence_step', 'backbone', 'keypoint pooling'),
              ('landmark_step', 'network', 'localiser fine stage'))
TARGETS = {'semixup_vs_eager': 3.0, 'semixup_peak': 0.35, 'mc_vs_loop': 5.0,
           'pipeline_vs_step': 3.0}


def peak_tflops(device: str, given: float | None) -> float | None:
  """The peak to divide by: `given`, else the device kind's, else None."""
  if given:
    return given
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)


def _load(path: Path) -> dict:
  with path.open() as f:
    return json.load(f)


def step_rows(folder: Path, peak: float | None) -> list[dict]:
  """Every timed step, one row each, with rates and the share of peak."""
  rows = []
  for prefix, name_field, family in STEP_FILES:
    for path in sorted(folder.glob(f'{prefix}*.json')):
      for r in _load(path)['results']:
        seconds = {side[:-len('_step_s')]: statistics.median(t)
                   for side, t in r.items()
                   if side.endswith('_step_s') and isinstance(t, list) and t}
        row = {'family': family, 'step': r[name_field],
               'batch_size': r['batch_size'], 'dtype': r.get('dtype', 'float32'),
               'knees_per_step': r.get('knees_per_step', r['batch_size']),
               **{f'{side}_img_s': r['batch_size'] / s
                  for side, s in seconds.items()},
               'koajax_compile_s': r.get('koajax_compile_s'),
               'koajax_flops': r.get('koajax_flops')}
        if r.get('predict_s'):
          row['predict_img_s'] = (r['batch_size']
                                  / statistics.median(r['predict_s']))
        if r.get('koajax_flops') and 'koajax' in seconds:
          row['koajax_tflop_s'] = r['koajax_flops'] / seconds['koajax'] / 1e12
          if peak:
            row['peak_share'] = row['koajax_tflop_s'] / peak
        for side in ('torch', 'torch_compile'):
          if f'{side}_img_s' in row:
            row[f'vs_{side}'] = row['koajax_img_s'] / row[f'{side}_img_s']
        rows.append(row)
  return rows


def mc_rows(folder: Path) -> list[dict]:
  path = folder / 'mc_dropout.json'
  if not path.exists():
    return []
  data = _load(path)
  seconds = {r['mode']: r['sweep_s'] for r in data['results']}
  return [{**r, 'settings': data['settings'],
           **{f'vs_{m}': seconds[m] / r['sweep_s']
              for m in ('loop', 'forward', 'torch') if m in seconds}}
          for r in data['results']]


def pipeline_rows(folder: Path, steps: list[dict]) -> list[dict]:
  """Pipeline rows against the knees/s the fastest Semixup step consumes
  (labeled and unlabeled knees; the SL step where Semixup was not timed)."""
  path = folder / 'pipeline.json'
  if not path.exists():
    return []
  net = [s for s in steps if s['family'] == 'Semixup network']
  semixup = [s for s in net if s['step'] == 'semixup'] or net
  consumed = max((s['koajax_img_s'] * s['knees_per_step'] / s['batch_size']
                  for s in semixup), default=None)
  rows = []
  for r in _load(path)['pipeline']:
    rate = statistics.median(r['knees_per_s'])
    rows.append({'workers': r['workers'], 'knees_per_s': rate,
                 'first_batch_s': r['first_batch_s'],
                 'step': semixup[0]['step'] if semixup else None,
                 'step_knees_per_s': consumed,
                 'vs_step': rate / consumed if consumed else None})
  return rows


def targets(steps: list[dict], mc: list[dict],
            pipe: list[dict]) -> list[tuple[str, float | None, float]]:
  """(what, measured, target) for each of the GPU targets."""
  hit = [s for s in steps if s['step'] == 'semixup' and s['batch_size'] == 256
         and s['dtype'] == 'bfloat16']
  predictor = [r for r in mc if r['mode'] == 'predictor']
  workers = [p['vs_step'] for p in pipe if p['workers'] > 0 and p['vs_step']]
  return [
      ('Semixup step, batch 256 bf16: koajax / PyTorch eager',
       hit[0].get('vs_torch') if hit else None, TARGETS['semixup_vs_eager']),
      ('Semixup step, batch 256 bf16: share of peak',
       hit[0].get('peak_share') if hit else None, TARGETS['semixup_peak']),
      ('MC-dropout sweep: vmapped / loop of T passes',
       predictor[0].get('vs_loop') if predictor else None,
       TARGETS['mc_vs_loop']),
      ('input pipeline (best with workers) / what the step consumes',
       max(workers) if workers else None, TARGETS['pipeline_vs_step'])]


def stage_rows(folder: Path) -> list[dict]:
  path = folder / 'stages.tsv'
  if not path.exists():
    return []
  with path.open(newline='') as f:
    return list(csv.DictReader(f, delimiter='\t'))


def profiles(folder: Path) -> list[dict]:
  """The summary of every trace under `folder`/traces; a trace that cannot
  be read is named with the reason instead."""
  found = []
  for trace in sorted((folder / 'traces').glob('*')):
    try:
      found.append(trace_summary.summarise_folder(trace))
    except (OSError, ValueError, KeyError) as e:
      found.append({'trace': trace.name, 'error': str(e)})
  return found


def _f(value, spec: str = '.2f', suffix: str = '') -> str:
  return '' if value is None else f'{value:{spec}}{suffix}'


def markdown(machine: dict, peak: float | None, steps: list[dict],
             mc: list[dict], pipe: list[dict], stages: list[dict] = (),
             traced: list[dict] = ()) -> str:
  lines = [f"# koajax on {machine['device']} ({machine['backend']})", '',
           f"{machine['date']}; host {machine['cpu']}, {machine['cores']} "
           f"cores; jax {machine['jax']}; peak used: "
           + (f'{peak:g} TFLOP/s (bf16 dense)' if peak else 'none known'),
           '', '## Train steps', '',
           '| network | step | batch | dtype | koajax img/s | PyTorch eager '
           'img/s | koajax / eager | torch.compile img/s | koajax / compile '
           '| koajax TFLOP/s | share of peak | koajax compile s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for s in steps:
    lines.append(
        f"| {s['family']} | {s['step']} | {s['batch_size']} | {s['dtype']} | "
        f"{_f(s.get('koajax_img_s'), ',.1f')} | "
        f"{_f(s.get('torch_img_s'), ',.1f')} | "
        f"{_f(s.get('vs_torch'), '.2f', 'x')} | "
        f"{_f(s.get('torch_compile_img_s'), ',.1f')} | "
        f"{_f(s.get('vs_torch_compile'), '.2f', 'x')} | "
        f"{_f(s.get('koajax_tflop_s'), '.2f')} | "
        f"{_f(s.get('peak_share'), '.1%')} | "
        f"{_f(s.get('koajax_compile_s'), '.1f')} |")
  if steps:
    lines += ['', 'koajax compile s: trace, lower and compile; the stages '
              'share one compilation cache, so a program a stage before '
              'compiled (the Semixup step against torch.compile) is read '
              'from it.']
  if mc:
    st = mc[0]['settings']
    lines += ['', f"## MC-dropout sweep (pool {st['pool']}, T = "
              f"{st['samples']}, chunk {st['chunk']})", '',
              '| mode | sweep s | knees x passes / s | vs loop | '
              'vs forward x T |', '|---|---|---|---|---|']
    for r in mc:
      lines.append(f"| {r['mode']} | {r['sweep_s']:.2f} | "
                   f"{r['knee_passes_per_s']:,.0f} | "
                   f"{_f(r.get('vs_loop'), '.2f', 'x')} | "
                   f"{_f(r.get('vs_forward'), '.2f', 'x')} |")
  if pipe:
    lines += ['', '## Input pipeline against the fastest '
              f"{pipe[0]['step'] or 'Semixup'} step", '',
              '| workers | knees/s | first batch s | step consumes knees/s | '
              'pipeline / step |', '|---|---|---|---|---|']
    for p in pipe:
      lines.append(f"| {p['workers']} | {p['knees_per_s']:,.0f} | "
                   f"{p['first_batch_s']:.1f} | "
                   f"{_f(p['step_knees_per_s'], ',.0f')} | "
                   f"{_f(p['vs_step'], '.2f', 'x')} |")
  lines += ['', '## Targets', '', '| what | measured | target | |',
            '|---|---|---|---|']
  for what, value, target in targets(steps, mc, pipe):
    pct = 'peak' in what
    shown = _f(value, '.1%') if pct else _f(value, '.2f', 'x')
    verdict = ('not measured' if value is None
               else 'met' if value >= target else 'missed')
    lines.append(f"| {what} | {shown} | "
                 f"{f'{target:.0%}' if pct else f'{target:g}x'} | {verdict} |")
  if stages:
    lines += ['', '## Stages', '', '| stage | outcome | s |', '|---|---|---|']
    lines += [f"| {r['stage']} | {r['outcome']} | {r['seconds']} |"
              for r in stages]
  if traced:
    lines += ['', '## Profiles (jax.profiler)', '']
    for t in traced:
      lines.append(trace_summary.markdown(t) if 'error' not in t
                   else f"### {t['trace']}\n\nnot read: {t['error']}\n")
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('folder', type=Path)
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help="the device's dense bf16 peak (default: by device "
                      f'kind, {PEAK_BF16_TFLOPS})')
  args = parser.parse_args()
  files = sorted(args.folder.glob('*.json'))
  sources = [f for f in files if f.name != 'gpu.json']
  if not sources:
    raise SystemExit(f'{args.folder}: no benchmark JSON files; run '
                     'benchmarks/gpu.sh first')
  first = _load(sources[0])
  machine = {'date': time.strftime('%Y-%m-%d'),
             'cpu': first.get('cpu', first.get('machine', '')),
             'cores': first.get('cores', first.get('cpu_count')),
             'jax': first.get('jax', first.get('versions', {}).get('jax')),
             'backend': first.get('backend', ''),
             'device': first.get('device', first.get('backend', ''))}
  peak = peak_tflops(machine['device'], args.peak_tflops)
  steps = step_rows(args.folder, peak)
  mc = mc_rows(args.folder)
  pipe = pipeline_rows(args.folder, steps)
  stages = stage_rows(args.folder)
  traced = profiles(args.folder)
  report = {'machine': machine, 'peak_tflops': peak, 'steps': steps,
            'mc_dropout': mc, 'pipeline': pipe, 'stages': stages,
            'profiles': traced,
            'targets': [{'what': w, 'measured': v, 'target': t}
                        for w, v, t in targets(steps, mc, pipe)]}
  (args.folder / 'gpu.json').write_text(json.dumps(report, indent=1))
  text = markdown(machine, peak, steps, mc, pipe, stages, traced)
  (args.folder / 'gpu.md').write_text(text)
  print(text)


if __name__ == '__main__':
  main()
