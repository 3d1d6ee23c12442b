"""Converts OAI and MOST grade tables into a koajax manifest.

  python -m koajax.data.oai \\
      --grades=kxr_sq_bu00.txt,kxr_sq_bu01.sas7bdat --images=images.csv \\
      --out=manifest.csv [--sites=Enrollees.txt] [--prefer_readprj=15,37]

writes manifest.csv (see `koajax.data.schema`) and manifest.issues.csv, one
row per problem found (kind, subject_id, visit, side, source, detail), and
prints a summary.

Grade tables (SAS `.sas7bdat`/`.xpt`, or delimited text: `|`, tab or `,`,
sniffed from the header line):

  OAI central readings, `kxr_sq_bu00` .. `kxr_sq_bu12`: one row per reading
    of one knee with ID, SIDE (1 = right, 2 = left), READPRJ (the reading
    project) and, for the visit the table covers, VxxXRKL, VxxXROSFL,
    VxxXROSFM, VxxXROSTL, VxxXROSTM, VxxXRJSL, VxxXRJSM. The visit code xx
    maps to months as in `OAI_VISIT_MONTHS` (00 baseline, 01 12, 02 18,
    03 24, 04 30, 05 36, 06 48, 07 60, 08 72, 09 84, 10 96, 11 108, 12 120).
  MOST, `mostv01235xray`: one row per subject with MOSTID and, per visit v and
    knee s (R or L, in the column name), VvXsKL, VvXsOSFL, VvXsOSFM, VvXsOSTL,
    VvXsOSTM, VvXsJSL, VvXsJSM; visits 0, 1, 2, 3, 5 are months 0, 15, 30,
    60, 84 (`MOST_VISIT_MONTHS`).

These conventions are those of public OAI/MOST processing code (MIPT-Oulu
KneeOARSIGrading, OAProgression, RobustCartilageSegmentation); the data
dictionaries shipped with each release are the authority. The kind of each
table is detected from its columns.

Grade cells may be numbers (2, 2.0), labelled text ('2: 2') or missing ('',
'.', '.: Missing Form/Incomplete Workbook', SAS missing). Anything else (MOST
letter codes such as 'X', fractions such as 1.5) and grades outside 0..4 (KL)
or 0..3 (OARSI) are reported and left ungraded.

Several readings of one knee at one visit (OAI reading projects, or the same
visit in two tables) are resolved by one rule: prefer the READPRJ listed
first in --prefer_readprj (unlisted projects come after listed ones), then
the reading with the most valid grades, then the one read first (tables in
the order given, rows in file order). Every reading not kept is reported.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from koajax.data import schema

log = logging.getLogger(__name__)

# V11 and V12 follow the yearly schedule after V05; the others are as the
# OAI releases name them (e.g. '1.C.2' = 12 months).
OAI_VISIT_MONTHS = {0: 0, 1: 12, 2: 18, 3: 24, 4: 30, 5: 36, 6: 48, 7: 60,
                    8: 72, 9: 84, 10: 96, 11: 108, 12: 120}
MOST_VISIT_MONTHS = {0: 0, 1: 15, 2: 30, 3: 60, 5: 84}
VISIT_MONTHS = {'oai': OAI_VISIT_MONTHS, 'most': MOST_VISIT_MONTHS}

# Column suffix in the reading tables -> koajax grade name.
FIELD_TO_GRADE = {'KL': 'kl', 'OSFL': 'ost_fl', 'OSFM': 'ost_fm',
                  'OSTL': 'ost_tl', 'OSTM': 'ost_tm', 'JSL': 'jsn_l',
                  'JSM': 'jsn_m'}
_FIELDS = '|'.join(FIELD_TO_GRADE)
_OAI_COLUMN = re.compile(rf'^V(\d\d)XR({_FIELDS})$')
_MOST_COLUMN = re.compile(rf'^V(\d)X([RL])({_FIELDS})$')

_LABELLED_NUMBER = re.compile(r'^([-+]?\d+(?:\.\d*)?)\s*(?::.*)?$')
_MISSING_WORDS = {'', 'nan', 'none', 'na', 'n/a', 'null'}

ISSUE_COLUMNS = ('kind', 'subject_id', 'visit', 'side', 'source', 'detail')


@dataclasses.dataclass(frozen=True)
class Issue:
  """One problem found while converting; kinds are listed in `convert`."""
  kind: str
  subject_id: str = ''
  visit: int | None = None
  side: str = ''
  source: str = ''
  detail: str = ''


@dataclasses.dataclass
class Reading:
  """One reader's grades of one knee at one visit."""
  subject_id: str
  visit: int
  side: str
  grades: dict[str, int]
  source: str  # 'file:row' for the report
  readprj: str = ''
  order: int = 0  # position among all readings, for the tie-break


# ---------------------------------------------------------------- parsing --


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    value = value.decode('latin-1')
  return str(value).strip()


def is_missing(value: Any) -> bool:
  """True for empty cells: None/NaN, blanks and SAS-style '.' codes."""
  if value is None:
    return True
  if isinstance(value, float) and math.isnan(value):
    return True
  text = _text(value)
  # '.', '.A'..'.Z' and '.: Missing Form/Incomplete Workbook' are SAS missing.
  return text.lower() in _MISSING_WORDS or text.startswith('.')


def parse_grade(value: Any) -> int | None:
  """A grade cell as an int; None when missing.

  Accepts 2, 2.0, '2', '2.0' and labelled values like '2: 2'.

  Raises:
    ValueError: for text that is not a number or a number with a fraction.
  """
  if is_missing(value):
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  match = _LABELLED_NUMBER.match(_text(value))
  if not match:
    raise ValueError(f'not a grade: {_text(value)!r}')
  number = float(match.group(1))
  if not number.is_integer():
    raise ValueError(f'not a whole grade: {_text(value)!r}')
  return int(number)


def parse_side(value: Any) -> str:
  """'R' or 'L' from 1, 2, '1: Right', 'R', 'left', ...; else ValueError."""
  text = _text(value).upper()
  match = _LABELLED_NUMBER.match(text)
  if match and float(match.group(1)) in (1, 2):
    return 'R' if float(match.group(1)) == 1 else 'L'
  if text in ('R', 'RIGHT'):
    return 'R'
  if text in ('L', 'LEFT'):
    return 'L'
  raise ValueError(f'not a side: {_text(value)!r}')


def normalize_id(value: Any) -> str:
  """Subject ids as text; SAS numeric ids lose their '.0'."""
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    return str(int(value))
  text = _text(value)
  return text[:-2] if re.fullmatch(r'\d+\.0', text) else text


def parse_visit(value: Any, kind: str | None) -> int:
  """Visit months from '12' / 12 / 12.0, or a study visit code ('V01', 'V5')."""
  text = _text(value).upper()
  code = re.fullmatch(r'V(\d+)', text)
  if code:
    if kind is None:
      raise ValueError(f'visit code {text!r} needs grade tables of one study')
    months = VISIT_MONTHS[kind].get(int(code.group(1)))
    if months is None:
      raise ValueError(f'unknown {kind.upper()} visit code {text!r}')
    return months
  number = float(text)
  if not number.is_integer() or number < 0:
    raise ValueError(f'not a visit in months: {text!r}')
  return int(number)


def _site_label(value: Any) -> str:
  # Labelled values ('C: Pittsburgh') keep their code.
  text = '' if is_missing(value) else _text(value)
  return text.split(':', 1)[0].strip()


# ----------------------------------------------------------------- tables --


def _separator(path: Path) -> str:
  with open(path, encoding='latin-1') as f:
    header = f.readline()
  counts = {sep: header.count(sep) for sep in ('|', '\t', ',')}
  return max(counts, key=counts.get) if max(counts.values()) else '|'


def read_table(path: str | os.PathLike) -> pd.DataFrame:
  """Reads a SAS or delimited-text table; column names upper-cased."""
  path = Path(path)
  if path.suffix.lower() in ('.sas7bdat', '.xpt'):
    df = pd.read_sas(path, encoding='latin-1')
  else:
    # Everything as text: ids keep leading zeros, grades are parsed later.
    df = pd.read_csv(path, sep=_separator(path), dtype=str,
                     keep_default_na=False, encoding='latin-1')
  df.columns = [str(c).strip().upper() for c in df.columns]
  return df


def table_kind(df: pd.DataFrame) -> str:
  """'oai' or 'most', from the column names."""
  columns = set(df.columns)
  if any(_MOST_COLUMN.match(c) for c in columns) and columns & {'MOSTID', 'ID'}:
    return 'most'
  if any(_OAI_COLUMN.match(c) for c in columns) and {'ID', 'SIDE'} <= columns:
    return 'oai'
  raise ValueError(
      'not an OAI reading table (ID, SIDE, VxxXRKL, ...) nor a MOST x-ray '
      f'table (MOSTID, VvXRKL, VvXLKL, ...); columns: {sorted(columns)[:20]}')


def _grades_of(row: dict[str, Any], columns: dict[str, str], *,
               where: Issue, issues: list[Issue]) -> dict[str, int]:
  """Valid grades from `columns` (grade name -> column); reports the rest."""
  grades = {}
  for grade, column in columns.items():
    try:
      value = parse_grade(row[column])
    except ValueError as e:
      issues.append(dataclasses.replace(where, kind='unparsable',
                                        detail=f'{column}: {e}'))
      continue
    if value is None:
      continue
    if not 0 <= value <= schema.GRADE_MAX[grade]:
      issues.append(dataclasses.replace(
          where, kind='out_of_range',
          detail=f'{column}={value} outside 0..{schema.GRADE_MAX[grade]}'))
      continue
    grades[grade] = value
  return grades


def _visit_columns(df: pd.DataFrame, pattern: re.Pattern[str]
                   ) -> dict[tuple[str, ...], dict[str, str]]:
  """{visit code (+ side for MOST): {grade name: column}}."""
  out: dict[tuple[str, ...], dict[str, str]] = {}
  for column in df.columns:
    match = pattern.match(column)
    if match:
      *key, field = match.groups()
      out.setdefault(tuple(key), {})[FIELD_TO_GRADE[field]] = column
  return out


def _visit_months(kind: str, code: str, source: str,
                  issues: list[Issue]) -> int | None:
  months = VISIT_MONTHS[kind].get(int(code))
  if months is None:
    issues.append(Issue('unknown_visit', source=source,
                        detail=f'{kind.upper()} visit code V{code} has no '
                               'known month; its columns are ignored'))
  return months


def oai_readings(df: pd.DataFrame, source: str,
                 issues: list[Issue]) -> list[Reading]:
  """Readings in an OAI `kxr_sq_bu` table (one row per knee and project)."""
  visits = {}
  for (code,), columns in _visit_columns(df, _OAI_COLUMN).items():
    months = _visit_months('oai', code, source, issues)
    if months is not None:
      visits[months] = columns
  readings = []
  for i, row in enumerate(df.to_dict('records')):
    subject = normalize_id(row['ID'])
    where = Issue('', subject_id=subject, source=f'{source}:{i + 2}')
    try:
      side = parse_side(row['SIDE'])
    except ValueError as e:
      issues.append(dataclasses.replace(where, kind='bad_side', detail=str(e)))
      continue
    readprj = '' if is_missing(row.get('READPRJ')) else normalize_id(
        row['READPRJ'])
    for months, columns in visits.items():
      at = dataclasses.replace(where, visit=months, side=side)
      grades = _grades_of(row, columns, where=at, issues=issues)
      if grades:
        readings.append(Reading(subject, months, side, grades,
                                source=at.source, readprj=readprj))
  return readings


def most_readings(df: pd.DataFrame, source: str,
                  issues: list[Issue]) -> list[Reading]:
  """Readings in a MOST x-ray table (one row per subject, side in columns)."""
  id_column = 'MOSTID' if 'MOSTID' in df.columns else 'ID'
  knees = {}
  for (code, side), columns in _visit_columns(df, _MOST_COLUMN).items():
    months = _visit_months('most', code, source, issues)
    if months is not None:
      knees[months, side] = columns
  readings = []
  for i, row in enumerate(df.to_dict('records')):
    subject = normalize_id(row[id_column])
    for (months, side), columns in knees.items():
      at = Issue('', subject_id=subject, visit=months, side=side,
                 source=f'{source}:{i + 2}')
      grades = _grades_of(row, columns, where=at, issues=issues)
      if grades:
        readings.append(Reading(subject, months, side, grades,
                                source=at.source))
  return readings


def select_readings(readings: Iterable[Reading], *,
                    prefer_readprj: Sequence[str] = (),
                    issues: list[Issue]) -> dict[tuple[str, int, str], Reading]:
  """One reading per knee and visit by the rule in the module docstring."""
  rank = {str(p): i for i, p in enumerate(prefer_readprj)}
  by_knee: dict[tuple[str, int, str], list[Reading]] = {}
  for order, r in enumerate(readings):
    r.order = order
    by_knee.setdefault((r.subject_id, r.visit, r.side), []).append(r)
  chosen = {}
  for key, group in by_knee.items():
    group.sort(key=lambda r: (rank.get(r.readprj, len(rank)), -len(r.grades),
                              r.order))
    chosen[key] = keep = group[0]
    for other in group[1:]:
      issues.append(Issue(
          'duplicate_reading', *key, source=other.source,
          detail=f'READPRJ {other.readprj or "-"} not used; kept '
                 f'READPRJ {keep.readprj or "-"} from {keep.source}'))
  return chosen


def read_sites(path: str | os.PathLike) -> dict[str, str]:
  """{subject_id: site} from a table such as OAI Enrollees (ID, V00SITE)."""
  df = read_table(path)
  id_column = next((c for c in ('SUBJECT_ID', 'ID', 'MOSTID')
                    if c in df.columns), None)
  site_column = next((c for c in ('SITE', 'V00SITE') if c in df.columns),
                     None) or next((c for c in df.columns
                                    if c.endswith('SITE')), None)
  if id_column is None or site_column is None:
    raise ValueError(f'{path}: needs a subject column (subject_id, ID or '
                     'MOSTID) and a site column (site, V00SITE)')
  return {normalize_id(s): _site_label(v)
          for s, v in zip(df[id_column], df[site_column])}


# ----------------------------------------------------------------- images --


def read_images(path: str | os.PathLike, *, kind: str | None,
                issues: list[Issue]) -> pd.DataFrame:
  """The images CSV as one row per knee: subject_id, visit, side, path, site.

  Side-less rows are expanded to both knees; relative paths are made
  absolute against the CSV's folder.
  """
  path = Path(path)
  df = pd.read_csv(path, dtype=str, keep_default_na=False)
  df.columns = [c.strip().lower() for c in df.columns]
  missing = {'subject_id', 'visit', 'path'} - set(df.columns)
  if missing:
    raise ValueError(f'{path}: missing columns {sorted(missing)}; expected '
                     'subject_id, visit, path[, side][, site]')
  rows = []
  for i, row in enumerate(df.to_dict('records')):
    where = Issue('', subject_id=normalize_id(row['subject_id']),
                  source=f'{path.name}:{i + 2}')
    try:
      visit = parse_visit(row['visit'], kind)
      sides = (parse_side(row['side']),) if _text(row.get('side', '')) else (
          schema.SIDES)
      if not _text(row['path']):
        raise ValueError('empty path')
    except ValueError as e:
      issues.append(dataclasses.replace(where, kind='bad_image_row',
                                        detail=str(e)))
      continue
    image = Path(_text(row['path'])).expanduser()
    image = image if image.is_absolute() else path.parent / image
    for side in sides:
      rows.append({'subject_id': where.subject_id, 'visit': visit,
                   'side': side, 'path': str(image),
                   'site': _site_label(row.get('site', '')),
                   'source': where.source})
  out = pd.DataFrame(rows, columns=['subject_id', 'visit', 'side', 'path',
                                    'site', 'source'])
  dup = out.duplicated(['subject_id', 'visit', 'side'])
  for row in out[dup].itertuples():
    issues.append(Issue('duplicate_image', row.subject_id, row.visit, row.side,
                        source=row.source,
                        detail=f'{row.path} not used; an earlier row names '
                               'this knee'))
  return out[~dup].reset_index(drop=True)


# --------------------------------------------------------------- manifest --


def _relative_to(path: str, folder: Path) -> str:
  try:
    return os.path.relpath(path, folder)
  except ValueError:  # another drive on Windows
    return path


def build_manifest(readings: dict[tuple[str, int, str], Reading],
                   images: pd.DataFrame, *, manifest_dir: str | os.PathLike,
                   sites: dict[str, str] | None,
                   issues: list[Issue]) -> pd.DataFrame:
  """Joins chosen readings with images into manifest rows (schema order)."""
  manifest_dir = Path(manifest_dir).absolute()
  rows = []
  for image in images.itertuples(index=False):
    key = (image.subject_id, image.visit, image.side)
    reading = readings.get(key)
    if reading is None:
      issues.append(Issue('no_grades', *key, source=image.source,
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
      issues.append(Issue('no_image', *key, source=reading.source,
                          detail='graded knee with no image in --images: '
                                 'left out'))
  df = pd.DataFrame(rows, columns=list(schema.MANIFEST_COLUMNS))
  for g in schema.GRADES:
    df[g] = df[g].astype('Int64')
  df['visit'] = df['visit'].astype(int)
  return df.sort_values(['subject_id', 'visit', 'side'], kind='stable',
                        ignore_index=True)


def issues_frame(issues: Sequence[Issue]) -> pd.DataFrame:
  df = pd.DataFrame([dataclasses.asdict(i) for i in issues],
                    columns=list(ISSUE_COLUMNS))
  df['visit'] = df['visit'].astype('Int64')
  return df


def issues_path(out: str | os.PathLike) -> Path:
  """Where `convert` writes the report: manifest.csv -> manifest.issues.csv."""
  out = Path(out)
  return out.with_name(f'{out.stem}.issues.csv')


def convert(grades: Sequence[str | os.PathLike], images: str | os.PathLike,
            out: str | os.PathLike, *, sites: str | os.PathLike | None = None,
            prefer_readprj: Sequence[str] = ()) -> dict[str, Any]:
  """Writes the manifest and the issues report; returns a summary.

  Issue kinds: unparsable, out_of_range (grade cells), bad_side,
  unknown_visit, duplicate_reading (readings not kept), bad_image_row,
  duplicate_image, no_image (graded knee left out), no_grades (image kept as
  an unlabeled knee).
  """
  issues: list[Issue] = []
  readings: list[Reading] = []
  kinds = set()
  for path in grades:
    df = read_table(path)
    kind = table_kind(df)
    kinds.add(kind)
    parse = oai_readings if kind == 'oai' else most_readings
    found = parse(df, Path(path).name, issues)
    log.info('%s: %s table, %d rows, %d graded readings', path, kind.upper(),
             len(df), len(found))
    readings.extend(found)
  chosen = select_readings(readings, prefer_readprj=prefer_readprj,
                           issues=issues)
  study = next(iter(kinds)) if len(kinds) == 1 else None
  image_df = read_images(images, kind=study, issues=issues)
  site_map = read_sites(sites) if sites else None
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  manifest = build_manifest(chosen, image_df, manifest_dir=out.parent,
                            sites=site_map, issues=issues)
  manifest.to_csv(out, index=False)
  issues_frame(issues).to_csv(issues_path(out), index=False)
  counts = pd.Series([i.kind for i in issues], dtype=str).value_counts()
  return {
      'manifest': str(out),
      'issues_file': str(issues_path(out)),
      'studies': sorted(kinds),
      'knees': len(manifest),
      'graded_knees': int(manifest['kl'].notna().sum()),
      'subjects': int(manifest['subject_id'].nunique()),
      'readings': len(readings),
      'issues': {k: int(v) for k, v in counts.sort_index().items()},
  }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m koajax.data.oai',
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
  return 0


if __name__ == '__main__':
  sys.exit(main())
