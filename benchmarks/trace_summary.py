r"""What a jax.profiler trace of a few train steps says: the top device ops,
how busy the device was, its idle gaps, and where the host spent its time.

Reads the Chrome-format `*.trace.json.gz` that `jax.profiler.trace` writes
(`<folder>/plugins/profile/<run>/`). Device work is every event XLA tags
with the HLO op it ran (`args.hlo_op`): on a GPU the kernels on the
device's streams, on a CPU the thunks on XLA's threads. Over the span from
the first to the last such event:
  busy   the union of their intervals (overlapping streams count once);
  gaps   the stretches with no device work, largest first;
  ops    total time by kernel (GPU) or HLO op (CPU) name, numbered
         instances together (`convolution.4` and `convolution.7` are
         `convolution`);
  host   total time by the runtime's events on the threads with no device
         work (dispatch, transfers, waiting); the Python tracer's frames
         (`$file:line`) nest inside each other and are left out.

  python benchmarks/trace_summary.py FOLDER [STEPS]

FOLDER is one of the `--trace` folders of benchmarks/train_step.py (e.g.
/tmp/koajax-gpu/traces/semixup_b256_bfloat16); STEPS defaults to the count
written beside the trace.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
import sys


def trace_file(folder: Path) -> Path:
  """The newest trace JSON under `folder`."""
  files = sorted(Path(folder).rglob('*.trace.json.gz'),
                 key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f'{folder}: no *.trace.json.gz; trace with '
                            'benchmarks/train_step.py --trace=FOLDER')
  return files[-1]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
  merged = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], end))
    else:
      merged.append((start, end))
  return merged


def op_kind(name: str) -> str:
  """`name` without XLA's instance number (`fusion.12` -> `fusion`)."""
  return re.sub(r'[._]\d+$', '', name)


def summarise(events: list[dict], steps: int, top: int = 8) -> dict:
  """The summary of one trace's events (times in ms per step)."""
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  device = [e for e in complete if 'hlo_op' in e.get('args', {})]
  if not device:
    raise ValueError('no device work in the trace (no event has an hlo_op)')
  device_threads = {(e['pid'], e.get('tid')) for e in device}
  busy = _union([(e['ts'], e['ts'] + e['dur']) for e in device])
  first, last = busy[0][0], busy[-1][1]
  gaps = sorted((b[0] - a[1] for a, b in zip(busy, busy[1:])), reverse=True)
  busy_us = sum(end - start for start, end in busy)

  def per_step_ms(us: float) -> float:
    return us / 1e3 / steps

  def totals(selected: list[dict]) -> list[dict]:
    time = collections.Counter()
    count = collections.Counter()
    for e in selected:
      time[op_kind(e['name'])] += e['dur']
      count[op_kind(e['name'])] += 1
    return [{'name': name, 'ms_per_step': per_step_ms(us),
             'calls_per_step': count[name] / steps}
            for name, us in time.most_common(top)]

  host = [e for e in complete if (e['pid'], e.get('tid')) not in device_threads
          and not e['name'].startswith(('end: ', '$'))]
  return {'steps': steps,
          'span_ms_per_step': per_step_ms(last - first),
          'busy_ms_per_step': per_step_ms(busy_us),
          'busy_share': busy_us / (last - first) if last > first else 1.0,
          'gaps_per_step': len(gaps) / steps,
          'largest_gaps_ms': [g / 1e3 for g in gaps[:3]],
          'device_ops': totals(device),
          'host': totals(host)}


def summarise_folder(folder: Path, steps: int | None = None,
                     top: int = 8) -> dict:
  """The summary of the trace in `folder`, over `steps` steps (default:
  the count `CompiledStep.trace` wrote beside it)."""
  if steps is None:
    steps = int((Path(folder) / 'steps.txt').read_text())
  with gzip.open(trace_file(folder), 'rt') as f:
    events = json.load(f)['traceEvents']
  return {'trace': Path(folder).name, **summarise(events, steps, top)}


def markdown(summary: dict) -> str:
  s = summary
  lines = [f"### {s['trace']}", '',
           f"{s['steps']} steps; per step: {s['span_ms_per_step']:.2f} ms from "
           f"the first device op to the last, device busy "
           f"{s['busy_ms_per_step']:.2f} ms ({s['busy_share']:.0%}), "
           f"{s['gaps_per_step']:.0f} idle gaps (largest "
           + ', '.join(f'{g:.3f}' for g in s['largest_gaps_ms']) + ' ms)',
           '', '| device op | ms/step | calls/step |', '|---|---|---|']
  lines += [f"| `{o['name'][:90]}` | {o['ms_per_step']:.3f} | "
            f"{o['calls_per_step']:g} |" for o in s['device_ops']]
  lines += ['', '| host event | ms/step | calls/step |', '|---|---|---|']
  lines += [f"| `{o['name'][:90]}` | {o['ms_per_step']:.3f} | "
            f"{o['calls_per_step']:g} |" for o in s['host']]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  steps_arg = int(sys.argv[2]) if len(sys.argv) > 2 else None
  for arg in sys.argv[1:2]:
    print(markdown(summarise_folder(Path(arg), steps_arg)))
