"""Reads pre-cropped knee PNG collections laid out as <split>/<KL>/*.png.

The widely shared KL-graded OAI derivative (Chen et al. 2019, "kneeKL224":
224 x 224 8-bit crops in train/, val/, test/ and auto_test/, one folder per
KL grade 0-4) names its files after the knee: '<OAI subject id><L|R>.png',
e.g. '9003175R.png'. From a file name we take

  subject_id  the leading digits ('9003175'), so the two knees of a subject
              stay together when koajax makes subject-grouped splits; a name
              without leading digits is its own subject (the whole stem)
  side        the L/R letter right after the digits; 'R' when there is none
  visit       0: the file names carry no visit (kneeKL224 is from one visit)

so '9003175R.png' is knee 9003175_v00_R. A second file that maps to a knee
already seen in the same split (e.g. '9003175R_1.png' next to
'9003175R.png') is reported and skipped rather than guessed at.

  python -m koajax.data.png_folders --root=kneeKL224 --out=caches/kneeKL224

writes one koajax cache per split at OUT/<split> (images resized to roi_px,
left knees mirrored to look like right knees as in every koajax cache,
keypoints NaN, OARSI grades ungraded) and OUT/summary.json. Unreadable
files, folders that are not a KL grade and duplicate knees are reported and
skipped. Each cache replaces OUT/<split> in one step when complete, so a run
that fails or is killed leaves what was there; an OUT/<split> or
OUT/summary.json that koajax did not write is refused before anything is
written (exit status 2, `koajax.cli`). The crops have no pixel spacing, so `roi_mm` in the cache metadata
is nominal (140 mm, the koajax ROI) and `roi_mm_nominal` is set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from koajax import cli
from koajax.data import atomic
from koajax.data import cache as cache_lib
from koajax.data import schema

log = logging.getLogger(__name__)

PROGRAM = 'koajax.data.png_folders'
SUMMARY = 'summary.json'

IMAGE_SUFFIXES = ('.png',)
_NAME = re.compile(r'^(?P<subject>\d+)(?P<side>[LR](?![A-Za-z]))?', re.I)
COLUMNS = ('split', 'kl', 'path', 'knee', 'subject_id', 'visit', 'side')


def parse_name(stem: str) -> tuple[str, str]:
  """(subject_id, side) from a file stem, as the module docstring says."""
  match = _NAME.match(stem)
  if not match:
    return stem, 'R'
  side = (match.group('side') or 'R').upper()
  return match.group('subject'), side


def _skip(skipped: list[dict[str, str]] | None, where: Path | str,
          reason: str) -> None:
  log.warning('skipping %s: %s', where, reason)
  if skipped is not None:
    skipped.append({'where': str(where), 'reason': reason})


def read_png_folders(root: str | os.PathLike, *,
                     skipped: list[dict[str, str]] | None = None
                     ) -> pd.DataFrame:
  """Lists the knees under root/<split>/<KL>/*.png.

  Args:
    root: the folder holding one folder per split.
    skipped: if given, gets {'where', 'reason'} for every folder or file that
      is not used (a grade folder that is not 0-4, a duplicate knee).

  Returns:
    One row per image, sorted by split and path, with columns split, kl
    (int), path (str), knee (the file stem), subject_id, visit (0), side.
  """
  root = Path(root)
  if not root.is_dir():
    raise cli.BadInput(f'--root {root} is not a folder; give the folder '
                       'holding <split>/<KL>/*.png')
  rows = []
  for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    for grade_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
      if not re.fullmatch(r'[0-4]', grade_dir.name):
        n = sum(1 for _ in grade_dir.glob('*.png'))
        _skip(skipped, grade_dir, f'folder name is not a KL grade 0-4 '
              f'({n} images)')
        continue
      for path in sorted(grade_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
          continue
        subject, side = parse_name(path.stem)
        rows.append({'split': split_dir.name, 'kl': int(grade_dir.name),
                     'path': str(path), 'knee': path.stem,
                     'subject_id': subject, 'visit': 0, 'side': side})
  df = pd.DataFrame(rows, columns=list(COLUMNS))
  # One knee per (subject, side) in a split, across its grade folders.
  dup = df.duplicated(['split', 'subject_id', 'side'])
  for row in df[dup].itertuples():
    first = df[(df.split == row.split) & (df.subject_id == row.subject_id) &
               (df.side == row.side)].iloc[0]
    _skip(skipped, row.path, f'same knee as {first.path} '
          f'({schema.knee_id(row.subject_id, 0, row.side)})')
  return df[~dup].sort_values(['split', 'path'], ignore_index=True)


def load_png(path: str | os.PathLike, roi_px: int, *,
             flip: bool = False) -> np.ndarray:
  """A PNG as a (roi_px, roi_px) uint8 array; raises OSError if unreadable."""
  with Image.open(path) as img:
    img.load()
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
      # 16-bit or float PNGs: stretch to 8 bits rather than clip.
      a = np.asarray(img, np.float32)
      lo, hi = float(a.min()), float(a.max())
      a = (a - lo) * (255.0 / max(hi - lo, 1e-6))
      img = Image.fromarray(a.round().astype(np.uint8))
    else:
      img = img.convert('L')
    if img.size != (roi_px, roi_px):
      img = img.resize((roi_px, roi_px), Image.Resampling.BICUBIC)
    if flip:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, np.uint8)


def _knee(row: Any, roi_px: int, flip_left: bool) -> cache_lib.Knee:
  grades = np.full(len(schema.GRADES), schema.UNGRADED, np.int8)
  grades[schema.GRADES.index('kl')] = row.kl
  image = load_png(row.path, roi_px, flip=flip_left and row.side == 'L')
  return cache_lib.Knee(
      subject_id=row.subject_id, visit=row.visit, side=row.side, site='',
      image=image,
      keypoints=np.full((schema.NUM_LANDMARKS, 2), np.nan, np.float32),
      grades=grades)


def _load_all(rows: pd.DataFrame, roi_px: int, flip_left: bool,
              workers: int | None):
  """Yields (row, Knee or the error) in row order, decoding in threads."""
  def load(row):
    try:
      return row, _knee(row, roi_px, flip_left)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors
      return row, e
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as ex:
    yield from ex.map(load, rows.itertuples(index=False))


def build_png_cache(root: str | os.PathLike, out_dir: str | os.PathLike, *,
                    roi_px: int = 224, roi_mm: float = 140.0,
                    flip_left: bool = True,
                    splits: Sequence[str] | None = None,
                    workers: int | None = None) -> dict[str, Any]:
  """Writes one koajax cache per split at out_dir/<split>.

  Args:
    root: root/<split>/<KL>/*.png.
    out_dir: where the caches and summary.json go.
    roi_px: side of the stored images (the crops are resized to it).
    roi_mm: nominal physical size recorded in the cache metadata.
    flip_left: mirror left knees (koajax stores every knee as a right one);
      pass False if your copy is already mirrored.
    splits: the splits to build; all found when None.
    workers: decoding threads (default: CPU count).

  Returns:
    The summary written to out_dir/summary.json.
  """
  out_dir = Path(out_dir)
  skipped: list[dict[str, str]] = []
  table = read_png_folders(root, skipped=skipped)
  found = sorted(table['split'].unique())
  if not found:
    raise cli.BadInput(f'no images in {root}: expected <split>/<KL>/*.png '
                       'with KL folders 0-4')
  names = found if splits is None else list(splits)
  unknown = [n for n in names if n not in found]
  if unknown:
    raise cli.BadInput(f'no split {", ".join(unknown)} with images in {root}; '
                       f'it has {", ".join(found)}')
  # Everything this run replaces is checked before anything is written.
  for split in names:
    cache_lib.check_output_dir(out_dir / split, f'the {split} cache')
  _check_summary(out_dir / SUMMARY)
  summary: dict[str, Any] = {'root': str(root),
                             'roi_px': roi_px, 'roi_mm': roi_mm,
                             'flip_left': flip_left, 'splits': {}}
  unreadable: list[dict[str, str]] = []
  for split in names:
    rows = table[table['split'] == split]
    listed = [s for s in skipped
              if Path(s['where']).is_relative_to(Path(root) / split)]
    bad: list[dict[str, str]] = []
    built = []
    with cache_lib.CacheWriter(out_dir / split, roi_mm=roi_mm, roi_px=roi_px,
                               extra_meta={'source': 'png_folders',
                                           'roi_mm_nominal': True}) as writer:
      for row, knee in _load_all(rows, roi_px, flip_left, workers):
        if isinstance(knee, Exception):
          _skip(bad, row.path, f'unreadable image: {knee}')
          continue
        writer.add(knee)
        built.append(row)
      built = pd.DataFrame(built, columns=rows.columns)
      info = {'knees': len(writer),
              'subjects': int(built['subject_id'].nunique()),
              'kl_counts': {g: int((built['kl'] == g).sum())
                            for g in range(schema.GRADE_MAX['kl'] + 1)},
              'skipped': listed + bad}
      writer.close(summary={'source': str(Path(root) / split), **info})
    unreadable.extend(bad)
    summary['splits'][split] = info
    log.info('%s: %d knees, %d skipped', out_dir / split, info['knees'],
             len(info['skipped']))
  # The same subject in several splits leaks between train and test.
  by_subject = table.groupby('subject_id')['split'].nunique()
  summary['subjects_in_several_splits'] = int((by_subject > 1).sum())
  summary['skipped'] = skipped + unreadable
  atomic.write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + '\n')
  return summary


def _check_summary(path: Path) -> None:
  """Refuses to replace a summary.json that this command did not write."""
  if not (path.exists() or path.is_symlink()):
    return
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError):
    data = None
  if not (isinstance(data, dict) and 'splits' in data and 'root' in data):
    raise cli.BadInput(f'{path} exists and is not a summary koajax wrote; '
                       'give a new or empty folder for --out')


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=f'python -m {PROGRAM}',
      description='Build koajax caches from <split>/<KL>/*.png folders.')
  parser.add_argument('--root', required=True,
                      help='folder with <split>/<KL>/*.png')
  parser.add_argument('--out', required=True,
                      help='output folder: one cache per split')
  parser.add_argument('--roi_px', type=int, default=224,
                      help='stored image size in pixels')
  parser.add_argument('--no_flip_left', dest='flip_left',
                      action='store_false',
                      help='do not mirror left knees (already mirrored)')
  parser.add_argument('--splits', default=None,
                      type=lambda text: text.split(','),
                      help='comma-separated splits to build (default: all)')
  parser.add_argument('--workers', type=int, default=None,
                      help='decoding threads (default: CPU count)')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  summary = build_png_cache(args.root, args.out, roi_px=args.roi_px,
                            flip_left=args.flip_left, splits=args.splits,
                            workers=args.workers)
  for split, info in summary['splits'].items():
    print(f"{split}: {info['knees']} knees, {len(info['skipped'])} skipped, "
          f"KL {info['kl_counts']}")
  print(f"summary: {Path(args.out) / SUMMARY}")
  return cli.OK


if __name__ == '__main__':
  cli.run(PROGRAM, main)
