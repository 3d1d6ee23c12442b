"""Converts OAI and MOST grade tables into a koajax manifest.

  python -m koajax.data.oai \\
      --grades=kxr_sq_bu00.txt,kxr_sq_bu01.sas7bdat --images=images.csv \\
      --out=manifest.csv [--sites=Enrollees.txt] [--prefer_readprj=15,37]

writes manifest.csv (see `koajax.data.schema`) and manifest.issues.csv, one
row per problem found (kind, subject_id, visit, side, source, detail), and
prints a summary.

The grade tables (OAI `kxr_sq_bu00` .. `kxr_sq_bu12`, MOST `mostv01235xray`;
SAS or delimited text) and how several readings of one knee are resolved are
described in `koajax.data.oai_tables`.

The images CSV maps knees to radiographs, because real OAI/MOST folder
layouts differ between releases:

  subject_id,visit,path[,side][,site]
  9000099,0,00m/0.C.2/9000099/20040624/00123456/001
  9000099,V01,12m/1.C.2/9000099/20050714/01234567/001

visit is in months (0, 12, ...) or a visit code of the tables' study (V01,
V5); side (R/L, right/left, 1/2) is optional: without it the (bilateral)
image is used for both knees. Relative paths are taken from the CSV's folder
and written relative to the manifest's folder. Graded knees with no image
are reported and left out; images without grades become unlabeled knees.

--sites names a table with a subject column (ID, MOSTID or subject_id) and a
site column (V00SITE, SITE or site), e.g. OAI `Enrollees.txt`; a site
column in the images CSV is used when --sites is not given.

A table or CSV that cannot be read is named on one line with what to do
(exit status 2, `koajax.cli`); the manifest and its issues file are written
to temporary names and renamed into place, so a failed run leaves any
earlier ones as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from koajax import cli
from koajax.data import atomic
from koajax.data import manifest as manifest_lib
from koajax.data import oai_cells
from koajax.data import oai_issues
from koajax.data import oai_tables
from koajax.data import schema

log = logging.getLogger(__name__)

PROGRAM = 'koajax.data.oai'


# ----------------------------------------------------------------- images --


def read_images(path: str | os.PathLike, *, kind: str | None,
                issues: list[oai_issues.Issue]) -> pd.DataFrame:
  """The images CSV as one row per knee: subject_id, visit, side, path, site.

  Side-less rows are expanded to both knees; relative paths are made
  absolute against the CSV's folder.
  """
  path = Path(path)
  df = manifest_lib.read_csv(path, 'images', error=cli.BadInput, dtype=str,
                             keep_default_na=False)
  df.columns = [c.strip().lower() for c in df.columns]
  missing = {'subject_id', 'visit', 'path'} - set(df.columns)
  if missing:
    raise cli.BadInput(f'{path}: missing column(s) {", ".join(sorted(missing))}'
                       '; an images file has columns subject_id, visit, '
                       'path[, side][, site]')
  rows = []
  for i, row in enumerate(df.to_dict('records')):
    where = oai_issues.Issue(
        '', subject_id=oai_cells.normalize_id(row['subject_id']),
        source=f'{path.name}:{i + 2}')
    try:
      visit = oai_cells.parse_visit(row['visit'], kind)
      sides = ((oai_cells.parse_side(row['side']),)
               if oai_cells.cell_text(row.get('side', '')) else schema.SIDES)
      if not oai_cells.cell_text(row['path']):
        raise ValueError('empty path')
    except ValueError as e:
      issues.append(dataclasses.replace(where, kind='bad_image_row',
                                        detail=str(e)))
      continue
    image = Path(oai_cells.cell_text(row['path'])).expanduser()
    image = image if image.is_absolute() else path.parent / image
    for side in sides:
      rows.append({'subject_id': where.subject_id, 'visit': visit,
                   'side': side, 'path': str(image),
                   'site': oai_cells.site_label(row.get('site', '')),
                   'source': where.source})
  out = pd.DataFrame(rows, columns=['subject_id', 'visit', 'side', 'path',
                                    'site', 'source'])
  dup = out.duplicated(['subject_id', 'visit', 'side'])
  for row in out[dup].itertuples():
    issues.append(oai_issues.Issue(
        'duplicate_image', row.subject_id, row.visit, row.side,
        source=row.source,
        detail=f'{row.path} not used; an earlier row names this knee'))
  return out[~dup].reset_index(drop=True)


# --------------------------------------------------------------- manifest --


def _relative_to(path: str, folder: Path) -> str:
  try:
    return os.path.relpath(path, folder)
  except ValueError:  # another drive on Windows
    return path


def build_manifest(readings: dict[tuple[str, int, str], oai_tables.Reading],
                   images: pd.DataFrame, *, manifest_dir: str | os.PathLike,
                   sites: dict[str, str] | None,
                   issues: list[oai_issues.Issue]) -> pd.DataFrame:
  """Joins chosen readings with images into manifest rows (schema order)."""
  manifest_dir = Path(manifest_dir).absolute()
  rows = []
  for image in images.itertuples(index=False):
    key = (image.subject_id, image.visit, image.side)
    reading = readings.get(key)
    if reading is None:
      issues.append(oai_issues.Issue(
          'no_grades', *key, source=image.source,
          detail='image without grades: kept as unlabeled'))
    site = sites.get(image.subject_id, '') if sites is not None else image.site
    grades = reading.grades if reading else {}
    rows.append({'subject_id': image.subject_id, 'visit': image.visit,
                 'side': image.side, 'site': site,
                 'path': _relative_to(image.path, manifest_dir),
                 **{g: grades.get(g) for g in schema.GRADES}})
  imaged = set(zip(images['subject_id'], images['visit'], images['side']))
  for key, reading in readings.items():
    if key not in imaged:
      issues.append(oai_issues.Issue(
          'no_image', *key, source=reading.source,
          detail='graded knee with no image in --images: left out'))
  df = pd.DataFrame(rows, columns=list(schema.MANIFEST_COLUMNS))
  for g in schema.GRADES:
    df[g] = df[g].astype('Int64')
  df['visit'] = df['visit'].astype(int)
  return df.sort_values(['subject_id', 'visit', 'side'], kind='stable',
                        ignore_index=True)


def convert(grades: Sequence[str | os.PathLike], images: str | os.PathLike,
            out: str | os.PathLike, *, sites: str | os.PathLike | None = None,
            prefer_readprj: Sequence[str] = ()) -> dict[str, Any]:
  """Writes the manifest and the issues report; returns a summary.

  Issue kinds: unparsable, out_of_range (grade cells), bad_side,
  unknown_visit, duplicate_reading (readings not kept), bad_image_row,
  duplicate_image, no_image (graded knee left out), no_grades (image kept as
  an unlabeled knee).
  """
  issues: list[oai_issues.Issue] = []
  readings: list[oai_tables.Reading] = []
  kinds = set()
  if not grades:
    raise cli.BadInput('--grades names no table; give OAI kxr_sq_bu or MOST '
                       'x-ray tables, comma-separated')
  for path in grades:
    df = _read_grade_table(path)
    try:
      kind = oai_tables.table_kind(df)
    except ValueError as e:
      raise cli.BadInput(f'{path} is {e}') from None
    kinds.add(kind)
    parse = (oai_tables.oai_readings if kind == 'oai'
             else oai_tables.most_readings)
    found = parse(df, Path(path).name, issues)
    log.info('%s: %s table, %d rows, %d graded readings', path, kind.upper(),
             len(df), len(found))
    readings.extend(found)
  chosen = oai_tables.select_readings(readings, prefer_readprj=prefer_readprj,
                                      issues=issues)
  study = next(iter(kinds)) if len(kinds) == 1 else None
  image_df = read_images(images, kind=study, issues=issues)
  site_map = None
  if sites:
    try:
      site_map = oai_tables.read_sites(_readable(sites))
    except (ValueError, UnicodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as e:
      raise cli.BadInput(f'cannot read the sites table: {_one_line(e)}'
                         ) from None
  out = Path(out)
  manifest = build_manifest(chosen, image_df, manifest_dir=out.parent,
                            sites=site_map, issues=issues)
  atomic.write_with(out, lambda tmp: manifest.to_csv(tmp, index=False))
  atomic.write_with(oai_issues.issues_path(out),
                    lambda tmp: oai_issues.issues_frame(issues).to_csv(
                        tmp, index=False))
  counts = pd.Series([i.kind for i in issues], dtype=str).value_counts()
  return {
      'manifest': str(out),
      'issues_file': str(oai_issues.issues_path(out)),
      'studies': sorted(kinds),
      'knees': len(manifest),
      'graded_knees': int(manifest['kl'].notna().sum()),
      'subjects': int(manifest['subject_id'].nunique()),
      'readings': len(readings),
      'issues': {k: int(v) for k, v in counts.sort_index().items()},
  }


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split())


def _readable(path: str | os.PathLike) -> Path:
  path = Path(path)
  if not path.is_file():
    raise cli.BadInput(f'table not found: {path}' if not path.exists()
                       else f'{path} is a folder, not a table')
  return path


def _read_grade_table(path: str | os.PathLike) -> pd.DataFrame:
  """A grade table, or `cli.BadInput` naming it and why it cannot be read."""
  path = _readable(path)
  if path.stat().st_size == 0:
    raise cli.BadInput(f'{path} is empty; give an OAI kxr_sq_bu or MOST x-ray '
                       'table')
  try:
    return oai_tables.read_table(path)
  except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
    raise cli.BadInput(f'{path} is not a readable delimited table '
                       f'({_one_line(e)})') from None
  except Exception as e:  # pylint: disable=broad-except
    if path.suffix.lower() not in ('.sas7bdat', '.xpt'):
      raise
    # pandas' SAS readers fail in many ways on a damaged file.
    raise cli.BadInput(f'{path} is not a readable SAS file '
                       f'({type(e).__name__}: {_one_line(e)}); export the '
                       'table again or give its .txt version') from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=f'python -m {PROGRAM}',
      description='Convert OAI/MOST grade tables to a koajax manifest.')
  comma_list = lambda text: [t.strip() for t in text.split(',') if t.strip()]
  parser.add_argument('--grades', required=True, type=comma_list,
                      help='OAI kxr_sq_bu / MOST x-ray tables, comma-separated '
                      '(.sas7bdat or delimited .txt)')
  parser.add_argument('--images', required=True,
                      help='CSV: subject_id, visit, path[, side][, site]')
  parser.add_argument('--out', required=True, help='manifest CSV to write')
  parser.add_argument('--sites', default=None,
                      help='table with subject and site columns, e.g. OAI '
                      'Enrollees (ID, V00SITE)')
  parser.add_argument('--prefer_readprj', type=comma_list, default=[],
                      help='OAI reading projects in order of preference when '
                      'one knee was read more than once')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  summary = convert(args.grades, args.images, args.out, sites=args.sites,
                    prefer_readprj=args.prefer_readprj)
  print(json.dumps(summary, indent=2))
  return cli.OK


if __name__ == '__main__':
  cli.run(PROGRAM, main)
