"""Grades new radiographs with trained runs: every head, per knee.

  python -m koajax.predict --runs=RUN[,RUN...] --input=PATH [PATH ...] \\
      --out=DIR [--localizer=DIR] [--landmarks=CSV] [--checkpoint=best] \\
      [--mc_samples=20] [--batch_size=8]

PATH is a DICOM file, a folder of them (and of knee PNGs; searched
recursively), a manifest CSV (`koajax.data.manifest`: knees named by their
subject, visit and side) or a pre-cropped knee PNG. A bilateral film gives
both knees, a single-knee film the one its header's laterality (or its
manifest row) names. Landmarks come from --landmarks (with a manifest), else
from the localiser (--localizer, or the first run's `data.localizer`). See
`koajax.grader` for what is predicted and how.

Writes, each file whole or not at all (other files in DIR are left alone):
  DIR/predictions.csv   one row per knee: every head's grade and class
                        probabilities, its uncertainty, the joint centre
  DIR/predictions.json  the same with all landmarks, the model's description
                        and the skipped inputs with their reasons
  DIR/gradcam/<knee>.png  the knee as acquired under its Grad-CAM heatmap

An input that cannot be graded (not a DICOM, no spacing, colour, several
frames, no knee found, a PNG of the wrong size or depth) is skipped with a
one-line reason, printed and kept in predictions.json; the other inputs are
still graded. Exit status 2 when no knee could be graded (`koajax.cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from koajax import cli
from koajax.data import atomic

PROGRAM = 'koajax.predict'
GRADCAM_DIR = 'gradcam'


def png_name(knee: str) -> str:
  """The overlay's file name: the knee id with its folders joined by '__'."""
  return knee.replace('\\', '/').strip('/').replace('/', '__') + '.png'


def csv_row(record: dict[str, Any]) -> dict[str, Any]:
  """One predictions.csv row of a `Grader.record`."""
  row = {'input': record['input'], 'knee': record['knee'],
         'side': record['side'],
         'landmarks_from': record['localisation']['from']}
  centre = record['localisation'].get('joint_centre', [np.nan, np.nan])
  row['joint_centre_x'], row['joint_centre_y'] = centre
  for name, head in record['heads'].items():
    row[name] = head['grade']
    for grade, p in zip(head['classes'], head['probabilities']):
      row[f'{name}_p{grade}'] = p
    row[f'{name}_uncertainty'] = head['uncertainty']
  row['uncertainty_kind'] = record['uncertainty_kind']
  row['gradcam'] = record.get('gradcam_png', '')
  return row


def predict(runs: Sequence[str], inputs: Sequence[str], out: str, *,
            localizer: str | None = None, landmarks: str | None = None,
            checkpoint: str = 'best', mc_samples: int = 20,
            batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
  """Grades `inputs`, writes DIR's files and returns predictions.json's
  content."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from koajax import grader as grader_lib  # pylint: disable=g-import-not-at-top
  from koajax.data import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  out_dir = Path(out).expanduser()
  if out_dir.exists() and not out_dir.is_dir():
    raise cli.BadInput(f'--out={out} is a file; give a folder')
  if batch_size < 1 or mc_samples < 0:
    raise cli.BadInput('--batch_size must be >= 1 and --mc_samples >= 0')
  grader = grader_lib.Grader.load(runs, checkpoint=checkpoint,
                                  localizer=localizer, batch_size=batch_size,
                                  mc_samples=mc_samples)
  sources, skipped = inputs_lib.find_inputs(inputs, landmarks=landmarks)
  records = []
  pending: list = []

  def flush():
    for result in grader.grade(pending):
      record = grader.record(result)
      name = png_name(result.knee.knee)
      atomic.write_with(out_dir / GRADCAM_DIR / name,
                        lambda tmp, r=result: Image.fromarray(
                            grader.overlay(r)).save(tmp, format='png'))
      record['gradcam_png'] = f'{GRADCAM_DIR}/{name}'
      records.append(record)
    pending.clear()

  for source in tqdm(sources, desc='radiographs', unit='file',
                     disable=not progress):
    knees, bad = grader.knees(source)
    skipped += bad
    for s in bad:
      logging.getLogger(PROGRAM).warning('skipped %s%s: %s', s.input,
                                         f' ({s.knee})' if s.knee else '',
                                         s.reason)
    pending += knees
    if len(pending) >= grader.batch_size:
      flush()
  flush()
  result = {'model': grader.info(), 'knees': records,
            'skipped': [s.as_dict() for s in skipped],
            'summary': {'inputs': len(sources), 'knees': len(records),
                        'skipped': len(skipped)}}
  frame = pd.DataFrame([csv_row(r) for r in records])
  atomic.write_with(out_dir / 'predictions.csv',
                    lambda tmp: frame.to_csv(tmp, index=False))
  atomic.write_text(out_dir / 'predictions.json',
                    json.dumps(result, indent=1) + '\n')
  return result


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=f'python -m {PROGRAM}', description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True,
                      help='training run folder(s), comma-separated; '
                      'several make an ensemble')
  parser.add_argument('--input', required=True, action='extend', nargs='+',
                      help='DICOM files, folders, manifests or knee PNGs')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--localizer', default=None,
                      help='localiser folder (coarse/ and fine/ runs of '
                      'configs/localizer.py); default: the run\'s '
                      'data.localizer')
  parser.add_argument('--landmarks', default=None,
                      help='landmarks CSV for the knees of a manifest')
  parser.add_argument('--checkpoint', default='best',
                      help='best, best_<metric> or latest')
  parser.add_argument('--mc_samples', type=int, default=20,
                      help='MC-dropout passes for the uncertainty of a '
                      'model with dropout (0: entropy instead)')
  parser.add_argument('--batch_size', type=int, default=8,
                      help='knees per network call')
  parser.add_argument('--no_progress', action='store_true',
                      help='no progress bar')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(message)s')
  # Orbax warns about every read-only checkpoint folder it opens.
  logging.getLogger('absl').setLevel(logging.ERROR)
  result = predict([r for r in args.runs.split(',') if r], args.input,
                   args.out, localizer=args.localizer,
                   landmarks=args.landmarks, checkpoint=args.checkpoint,
                   mc_samples=args.mc_samples, batch_size=args.batch_size,
                   progress=not args.no_progress)
  summary = result['summary']
  kinds: dict[str, int] = {}
  for s in result['skipped']:
    kinds[s['kind']] = kinds.get(s['kind'], 0) + 1
  print(f'{summary["knees"]} knees graded from {summary["inputs"]} inputs; '
        f'{summary["skipped"]} skipped'
        + (f' ({", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))})'
           if kinds else '')
        + f'; predictions in {Path(args.out) / "predictions.json"}')
  if not summary['knees']:
    raise cli.BadInput('no knee could be graded; the reasons are in '
                       f'{Path(args.out) / "predictions.json"}')
  return cli.OK


if __name__ == '__main__':
  cli.run(PROGRAM, main)
