"""Grade tables of OAI and MOST as readings of knees, and site tables.

Grade tables (SAS `.sas7bdat`/`.xpt`, or delimited text: `|`, tab or `,`,
sniffed from the header line):

  OAI central readings, `kxr_sq_bu00` .. `kxr_sq_bu12`: one row per reading
    of one knee with ID, SIDE (1 = right, 2 = left), READPRJ (the reading
    project) and, for the visit the table covers, VxxXRKL, VxxXROSFL,
    VxxXROSFM, VxxXROSTL, VxxXROSTM, VxxXRJSL, VxxXRJSM. The visit code xx
    maps to months as in `oai_cells.OAI_VISIT_MONTHS` (00 baseline, 01 12,
    02 18, 03 24, 04 30, 05 36, 06 48, 07 60, 08 72, 09 84, 10 96, 11 108,
    12 120).
  MOST, `mostv01235xray`: one row per subject with MOSTID and, per visit v and
    knee s (R or L, in the column name), VvXsKL, VvXsOSFL, VvXsOSFM, VvXsOSTL,
    VvXsOSTM, VvXsJSL, VvXsJSM; visits 0, 1, 2, 3, 5 are months 0, 15, 30,
    60, 84 (`oai_cells.MOST_VISIT_MONTHS`).

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
first in `prefer_readprj` (--prefer_readprj of `koajax.data.oai`; unlisted
projects come after listed ones), then
the reading with the most valid grades, then the one read first (tables in
the order given, rows in file order). Every reading not kept is reported.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from koajax.data import oai_cells
from koajax.data import oai_issues
from koajax.data import schema

# Column suffix in the reading tables -> koajax grade name.
FIELD_TO_GRADE = {'KL': 'kl', 'OSFL': 'ost_fl', 'OSFM': 'ost_fm',
                  'OSTL': 'ost_tl', 'OSTM': 'ost_tm', 'JSL': 'jsn_l',
                  'JSM': 'jsn_m'}
_FIELDS = '|'.join(FIELD_TO_GRADE)
_OAI_COLUMN = re.compile(rf'^V(\d\d)XR({_FIELDS})$')
_MOST_COLUMN = re.compile(rf'^V(\d)X([RL])({_FIELDS})$')


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
               where: oai_issues.Issue,
               issues: list[oai_issues.Issue]) -> dict[str, int]:
  """Valid grades from `columns` (grade name -> column); reports the rest."""
  grades = {}
  for grade, column in columns.items():
    try:
      value = oai_cells.parse_grade(row[column])
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
                  issues: list[oai_issues.Issue]) -> int | None:
  months = oai_cells.VISIT_MONTHS[kind].get(int(code))
  if months is None:
    issues.append(oai_issues.Issue(
        'unknown_visit', source=source,
        detail=f'{kind.upper()} visit code V{code} has no known month; its '
               'columns are ignored'))
  return months


def oai_readings(df: pd.DataFrame, source: str,
                 issues: list[oai_issues.Issue]) -> list[Reading]:
  """Readings in an OAI `kxr_sq_bu` table (one row per knee and project)."""
  visits = {}
  for (code,), columns in _visit_columns(df, _OAI_COLUMN).items():
    months = _visit_months('oai', code, source, issues)
    if months is not None:
      visits[months] = columns
  readings = []
  for i, row in enumerate(df.to_dict('records')):
    subject = oai_cells.normalize_id(row['ID'])
    where = oai_issues.Issue('', subject_id=subject,
                             source=f'{source}:{i + 2}')
    try:
      side = oai_cells.parse_side(row['SIDE'])
    except ValueError as e:
      issues.append(dataclasses.replace(where, kind='bad_side', detail=str(e)))
      continue
    readprj = ('' if oai_cells.is_missing(row.get('READPRJ'))
               else oai_cells.normalize_id(row['READPRJ']))
    for months, columns in visits.items():
      at = dataclasses.replace(where, visit=months, side=side)
      grades = _grades_of(row, columns, where=at, issues=issues)
      if grades:
        readings.append(Reading(subject, months, side, grades,
                                source=at.source, readprj=readprj))
  return readings


def most_readings(df: pd.DataFrame, source: str,
                  issues: list[oai_issues.Issue]) -> list[Reading]:
  """Readings in a MOST x-ray table (one row per subject, side in columns)."""
  id_column = 'MOSTID' if 'MOSTID' in df.columns else 'ID'
  knees = {}
  for (code, side), columns in _visit_columns(df, _MOST_COLUMN).items():
    months = _visit_months('most', code, source, issues)
    if months is not None:
      knees[months, side] = columns
  readings = []
  for i, row in enumerate(df.to_dict('records')):
    subject = oai_cells.normalize_id(row[id_column])
    for (months, side), columns in knees.items():
      at = oai_issues.Issue('', subject_id=subject, visit=months, side=side,
                            source=f'{source}:{i + 2}')
      grades = _grades_of(row, columns, where=at, issues=issues)
      if grades:
        readings.append(Reading(subject, months, side, grades,
                                source=at.source))
  return readings


def select_readings(readings: Iterable[Reading], *,
                    prefer_readprj: Sequence[str] = (),
                    issues: list[oai_issues.Issue]
                    ) -> dict[tuple[str, int, str], Reading]:
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
      issues.append(oai_issues.Issue(
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
  return {oai_cells.normalize_id(s): oai_cells.site_label(v)
          for s, v in zip(df[id_column], df[site_column])}
