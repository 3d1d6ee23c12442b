r"""The report of benchmarks/gpu_localizer.sh: localizer.json and localizer.md.

Gathers, from what the stages left:
  - each stage's test report on the held-out site of its training data
    (`metrics.json` of the runs in --localizer: KNEEL's figures, and the
    targets: joint centre within 2 mm for at least 95 % of knees, no
    outlier), with the run's plan (devices, epochs, view size);
  - `localize_films.json`: both stages on whole films (films/s, the time per
    film by part, found and refused, the figures against the true
    landmarks);
  - the two caches' `summary.json` (--caches: with the landmarks file, then
    through the localiser): build seconds and knees, and their ratio (the
    target: at most 2x);
  - stages.tsv: each stage's outcome and seconds.

Run:
  python benchmarks/localizer_report.py --out=OUT --localizer=DIR \
      --caches=CACHE_WITH_LANDMARKS,CACHE_LOCALISED
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

_OUT = flags.DEFINE_string('out', None, 'The script\'s output folder.')
_LOCALIZER = flags.DEFINE_string('localizer', None, 'The localiser folder.')
_CACHES = flags.DEFINE_list('caches', [], 'The cache built with the '
                            'landmarks file, then the one built through the '
                            'localiser.')

CENTRE_TARGET = 0.95  # of knees with the joint centre within 2 mm


def _json(path: Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def stage_report(run: Path) -> dict[str, Any] | None:
  """A trained stage's test-site figures and how it was trained."""
  metrics, plan = _json(run / 'metrics.json'), _json(run / 'plan.json')
  if metrics is None:
    return None
  return {'run': str(run), 'knees': metrics['knees'],
          'pixels': metrics.get('pixels'), 'centre': metrics['centre'],
          'recall': metrics['recall'], 'mean_mm': metrics['mean_mm'],
          'outliers': metrics['outliers'],
          'knees_with_outlier': metrics['knees_with_outlier'],
          'config': (plan or {}).get('config'),
          'epochs': (plan or {}).get('epochs'),
          'devices': (plan or {}).get('devices'),
          'centre_target_met': (metrics['centre']['within_2mm']
                                >= CENTRE_TARGET
                                and metrics['outliers'] == 0)}


def build_report(caches: list[str]) -> dict[str, Any] | None:
  """The two builds' seconds and knees, and their ratio."""
  if len(caches) != 2:
    return None
  summaries = [_json(Path(c) / 'summary.json') for c in caches]
  if any(s is None for s in summaries):
    return None
  rows = [{'cache': c, 'seconds': s['seconds'], 'knees_built': s['knees_built'],
           'knees_skipped': s['knees_skipped'],
           'knees_localised': s.get('knees_localised', 0)}
          for c, s in zip(caches, summaries)]
  ratio = rows[1]['seconds'] / rows[0]['seconds']
  return {'with_landmarks': rows[0], 'localised': rows[1],
          'ratio': ratio, 'target_met': ratio <= 2.0}


def stages(out: Path) -> list[dict[str, Any]]:
  try:
    with open(out / 'stages.tsv', newline='') as f:
      return [{'stage': r['stage'], 'outcome': r['outcome'],
               'seconds': int(r['seconds'])}
              for r in csv.DictReader(f, delimiter='\t')]
  except OSError:
    return []


def report(out: Path, localizer: Path, caches: list[str]) -> dict[str, Any]:
  films = _json(out / 'localize_films.json')
  return {
      'host': {'cpu': cpu_name(), 'cores': os.cpu_count()},
      'device': (films or {}).get('device'),
      'stages': {name: stage_report(localizer / name)
                 for name in ('coarse', 'fine')},
      'films': (films or {}).get('results', [None])[0],
      'build': build_report(caches),
      'script_stages': stages(out)}


def _pct(x: float) -> str:
  return f'{100 * x:.1f} %'


def markdown(r: dict[str, Any]) -> str:
  lines = [f"# The localiser on {r['device'] or 'an unknown device'}", '',
           f"Host: {r['host']['cpu']}, {r['host']['cores']} cores.", '',
           '## Each stage on the held-out site of its training data', '',
           '| stage | run | view | knees | joint centre mean / p95 | '
           'centre within 2 mm | recall at 2 mm tibia / femur | outliers '
           '(>= 10 mm) | target (95 %, no outlier) |',
           '|---|---|---|---|---|---|---|---|---|']
  for name, s in r['stages'].items():
    if s is None:
      lines.append(f'| {name} | not trained here or failed | | | | | | | |')
      continue
    lines.append(
        f"| {name} | {s['config']}, {s['epochs']} epochs | {s['pixels']} | "
        f"{s['knees']} | {s['centre']['mean_mm']:.2f} / "
        f"{s['centre']['p95_mm']:.2f} mm | {_pct(s['centre']['within_2mm'])} "
        f"| {s['recall']['tibia']['2mm']:.3f} / "
        f"{s['recall']['femur']['2mm']:.3f} | {_pct(s['outliers'])} of "
        f"landmarks | {'met' if s['centre_target_met'] else 'missed'} |")
  f = r['films']
  lines += ['', '## Both stages on whole films (`benchmarks/localize_films.py`)',
            '']
  if f is None:
    lines.append('Not measured (the stage failed or did not run).')
  else:
    acc = f['accuracy']
    parts = ', '.join(f'{k} {1e3 * v:.1f} ms'
                      for k, v in f['seconds_per_film'].items())
    sites = f['sites'] if isinstance(f['sites'], str) else ', '.join(
        f['sites'])
    lines += [
        f"{f['films']} films, {f['knees']} knees (sites {sites}): "
        f"**{f['films_per_second']:.1f} "
        f"films/s** in one process; per film: {parts}.", '',
        f"Found {f['found']}, refused {json.dumps(f['refused'])}; joint "
        f"centre mean {acc['centre']['mean_mm']:.2f} mm, within 2 mm "
        f"{_pct(acc['centre']['within_2mm'])}; recall at 2 mm tibia "
        f"{acc['recall']['tibia']['2mm']:.3f}, femur "
        f"{acc['recall']['femur']['2mm']:.3f}; outliers "
        f"{_pct(acc['outliers'])} of landmarks."]
  b = r['build']
  lines += ['', '## The cache of those films, with and without landmarks', '']
  if b is None:
    lines.append('Not measured (a build failed or did not run).')
  else:
    lines += ['| build | seconds | knees built | skipped | localised |',
              '|---|---|---|---|---|']
    for label, key in (('with the landmarks file', 'with_landmarks'),
                       ('through the localiser', 'localised')):
      row = b[key]
      lines.append(f"| {label} | {row['seconds']:.1f} | {row['knees_built']} "
                   f"| {row['knees_skipped']} | {row['knees_localised']} |")
    lines += ['', f"Ratio **{b['ratio']:.2f}x** (target at most 2x: "
              f"{'met' if b['target_met'] else 'missed'})."]
  lines += ['', '## Stages', '', '| stage | outcome | seconds |',
            '|---|---|---|']
  lines += [f"| {s['stage']} | {s['outcome']} | {s['seconds']} |"
            for s in r['script_stages']]
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  del argv
  out = Path(_OUT.value)
  r = report(out, Path(_LOCALIZER.value), _CACHES.value)
  (out / 'localizer.json').write_text(json.dumps(r, indent=1))
  (out / 'localizer.md').write_text(markdown(r))
  print(markdown(r))


if __name__ == '__main__':
  flags.mark_flags_as_required(['out', 'localizer'])
  app.run(main)
