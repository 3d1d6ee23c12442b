"""Reads and checks the manifest CSV and the landmarks CSV (see `schema`).

A damaged file is fatal only when it cannot be interpreted at all: it is
missing, empty, has no rows, is not UTF-8 text, uses another delimiter than
the comma, has rows of another length than its header, or lacks required
columns (`ManifestError`, a `cli.BadInput` whose one line names the file and
what to do). Otherwise every row is checked on its own, and a row with a
problem is marked, not dropped, so the build can report each one by its row
number and still use the rest:

  df = read_manifest('manifest.csv')
  df[df.problem == '']      # usable knees
  df[df.problem != '']      # each with a reason a user can act on

Row numbers count lines as a spreadsheet does: the header is row 1, the first
knee is row 2.

The optional kl_reader_<name> columns (further readers' KL grades, see
`schema`) are the exception: they never decide whether a knee is used, so a
bad cell there is fatal (`ManifestError` naming the file, row and column)
rather than a silently lost comparison with that reader.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from koajax import cli
from koajax.data import schema

log = logging.getLogger(__name__)

KneeKey = tuple[str, int, str]  # (subject_id, visit, side)

# Added by `validate_manifest`.
ROW = 'row'  # spreadsheet row number
PROBLEM = 'problem'  # '' when the row is usable, else why it is not
PROBLEM_KIND = 'problem_kind'  # category of the first problem, for counting
# The path cell as the manifest wrote it, for messages: `path` is resolved
# against the manifest's folder for reading, which would show the folders
# above the manifest.
PATH_AS_WRITTEN = 'path_in_manifest'


class ManifestError(cli.BadInput):
  """A manifest or landmarks file that cannot be read at all."""


# Other delimiters spreadsheets write, and how to name them.
_OTHER_DELIMITERS = {';': "';'", '\t': 'tabs', '|': "'|'"}


def read_csv_text(path: str | os.PathLike, what: str, *,
                  error: type[Exception] = ManifestError) -> str:
  """The text of a comma-separated file, or `error` saying in one line why
  it is not one: missing, a folder, empty, not UTF-8, or another delimiter.

  Args:
    path: the file, named in messages as given.
    what: what the file is, for messages ('manifest', 'landmarks', ...).
    error: the exception type to raise.
  """
  path = Path(path)
  if not path.exists():
    raise error(f'{what} file not found: {path}')
  if not path.is_file():
    raise error(f'{what} file {path} is a folder, not a CSV file')
  data = path.read_bytes()
  if not data.strip():
    raise error(f'{path} is empty; a {what} file has a header line of '
                'column names and one row per line')
  if data.startswith((b'\xff\xfe', b'\xfe\xff')):
    raise error(f'{path} is UTF-16 text ("Unicode text" in spreadsheets): '
                'save it as CSV UTF-8')
  try:
    text = data.decode('utf-8-sig')  # spreadsheets often write a BOM
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise error(f'{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at '
                f'offset {e.start}, line {line}): save it as UTF-8') from None
  header = next(line for line in text.splitlines() if line.strip())
  counts = {d: header.count(d) for d in _OTHER_DELIMITERS}
  other = max(counts, key=counts.get)
  if counts[other] > header.count(','):
    raise error(f'{path} uses {_OTHER_DELIMITERS[other]} as its delimiter; '
                f'koajax reads comma-separated files: save it with commas')
  return text


def read_csv(path: str | os.PathLike, what: str,
             required: tuple[str, ...] = (), *,
             error: type[Exception] = ManifestError, see: str = '',
             **read_kwargs) -> pd.DataFrame:
  """A comma-separated file as a DataFrame (see `read_csv_text`), with
  stripped column names; `error` if it lacks any `required` column (`see`:
  where its columns are described) or rows do not parse."""
  path = Path(path)
  text = read_csv_text(path, what, error=error)
  _check_fields(path, text, error)
  try:
    df = pd.read_csv(io.StringIO(text), index_col=False, **read_kwargs)
  except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
    raise error(f'{path} is not a well-formed CSV file '
                f'({" ".join(str(e).split())}); every row needs as many '
                'fields as the header') from None
  df.columns = [str(c).strip() for c in df.columns]
  missing = [c for c in required if c not in df.columns]
  if missing:
    raise error(
        f'{path}: missing column(s) {_columns_text(missing)}; a {what} file '
        f'has columns {_columns_text(required)}' +
        (f' (see {see})' if see else ''))
  return df


def _check_fields(path: Path, text: str, error: type[Exception]) -> None:
  """Every row has the header's number of fields: pandas would otherwise
  take extra leading cells for an index and shift the columns silently."""
  rows = csv.reader(io.StringIO(text))
  header = next(rows, [])
  for row in rows:
    if row and len(row) != len(header):
      raise error(
          f'{path} line {rows.line_num} has {len(row)} fields, the header '
          f'{len(header)}: every row needs as many comma-separated fields as '
          'the header (quote cells that contain commas)')


def _read_csv(path: str | os.PathLike, required: tuple[str, ...],
              what: str) -> pd.DataFrame:
  # Everything as text: subject ids keep leading zeros, and cells are
  # interpreted (and complained about) one by one below.
  df = read_csv(path, what, required, see='koajax/data/schema.py', dtype=str,
                keep_default_na=False, skipinitialspace=True)
  if not len(df):
    raise ManifestError(f'{path} has a header but no rows; a {what} file '
                        'lists one knee per row')
  return df


def _columns_text(columns) -> str:
  columns = list(columns)
  if len(columns) > 12:  # the 32 landmark coordinates
    columns = columns[:5] + ['...'] + columns[-2:]
  return ', '.join(columns)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
  """Reads a manifest and checks every row.

  Args:
    path: the manifest CSV (columns `schema.MANIFEST_COLUMNS` and optional
      kl_reader_<name> columns; others are ignored). Grade columns must be
      present but may be empty.

  Returns:
    One row per manifest row, in file order, with typed columns
    (subject_id str, visit int or -1 if unparsable, side 'R'/'L', site str,
    path str resolved against the manifest's folder, grades and reader
    grades int with -1 for ungraded) plus `row` (spreadsheet row number),
    `path_in_manifest` (the path cell as written) and `problem` ('' if the
    row is usable).

  Raises:
    ManifestError: the file is missing, empty, not comma-separated UTF-8
      text, has no rows, lacks required columns, or has a reader column
      with a bad name or a cell that is not a KL grade.
  """
  path = Path(path)
  df = _read_csv(path, schema.MANIFEST_COLUMNS, 'manifest')
  readers = schema.reader_columns(df.columns)
  df = df[list(schema.MANIFEST_COLUMNS) + readers].copy()
  df.insert(0, ROW, np.arange(len(df)) + 2)
  parse_readers(df, path)
  folder = path.parent
  df[PATH_AS_WRITTEN] = [p.strip() for p in df['path']]
  df['path'] = [str(folder / p) if p else '' for p in df[PATH_AS_WRITTEN]]
  return validate_manifest(df)


def parse_readers(df: pd.DataFrame, where: str | os.PathLike) -> list[str]:
  """Turns the kl_reader_<name> columns of `df` into ints, -1 for empty.

  Args:
    df: manifest rows, with `row` (spreadsheet row numbers) if known.
    where: how messages name the manifest (its path).

  Returns:
    The reader columns, in their order.

  Raises:
    ManifestError: a reader name that is not letters, digits and _, or a
      cell that is neither empty nor a KL grade 0-4.
  """
  columns = schema.reader_columns(df.columns)
  for column in columns:
    name = column[len(schema.READER_PREFIX):]
    if not schema.READER_NAME.match(name):
      raise ManifestError(
          f'{where}: column {column!r} names no reader; name reader columns '
          f'{schema.READER_PREFIX}<name> with letters, digits and _ only')
    rows = df[ROW] if ROW in df.columns else np.arange(len(df)) + 2
    values = []
    for row, cell in zip(rows, df[column]):
      value = _parse_int(cell)
      if _is_empty(cell) or value == schema.UNGRADED:
        values.append(schema.UNGRADED)
      elif value is None or not 0 <= value <= schema.GRADE_MAX['kl']:
        raise ManifestError(
            f'{where} row {row}: {column}={str(cell).strip()!r} is not a KL '
            'grade 0-4; correct it, or leave the cell empty if that reader '
            'did not grade the knee')
      else:
        values.append(value)
    df[column] = np.asarray(values, int)
  return columns


def _is_empty(cell) -> bool:
  return cell is None or cell is pd.NA or (
      isinstance(cell, float) and np.isnan(cell)) or str(cell).strip() == ''


def _parse_int(cell) -> int | None:
  """An integer cell ('3', '3.0', 3, 3.0) or None."""
  if cell is None or (isinstance(cell, float) and np.isnan(cell)):
    return None
  text = str(cell).strip()
  if not text:
    return None
  try:
    value = float(text)
  except ValueError:
    return None
  return int(value) if value.is_integer() else None


def _row_problems(
    row: pd.Series) -> tuple[list[tuple[str, str]], dict[str, int]]:
  """Problems (kind, message) of one row, and its parsed visit and grades."""
  problems = []
  parsed = {}
  if not str(row['subject_id']).strip():
    problems.append(('bad_id', 'empty subject_id'))
  visit = _parse_int(row['visit'])
  if visit is None or visit < 0:
    problems.append(
        ('bad_id', f'visit {str(row["visit"])!r} is not a whole number >= 0'))
  parsed['visit'] = -1 if visit is None else visit
  if str(row['side']).strip().upper() not in schema.SIDES:
    problems.append(
        ('bad_side', f"side {str(row['side'])!r} is not 'R' or 'L'"))
  if not str(row['path']).strip():
    problems.append(('bad_path', 'empty path'))
  for grade in schema.GRADES:
    cell = row[grade]
    empty = cell is None or (isinstance(cell, float) and np.isnan(cell)) or (
        str(cell).strip() == '')
    value = _parse_int(cell)
    if empty or value == schema.UNGRADED:
      parsed[grade] = schema.UNGRADED
    elif value is None or not 0 <= value <= schema.GRADE_MAX[grade]:
      problems.append(
          ('bad_grade', f'{grade}={str(cell).strip()!r} out of range '
           f'0-{schema.GRADE_MAX[grade]} (leave the cell empty if ungraded)'))
      parsed[grade] = schema.UNGRADED
    else:
      parsed[grade] = value
  return problems, parsed


def validate_manifest(df: pd.DataFrame) -> pd.DataFrame:
  """Types the columns and fills `problem` for every row.

  For frames made by hand with the manifest columns (paths are used as
  given); `read_manifest` calls it. Not for its own output: a grade cell
  found out of range is already replaced by -1 there. Reader columns are
  typed by `parse_readers`, which raises on a bad cell.
  """
  missing = [c for c in schema.MANIFEST_COLUMNS if c not in df.columns]
  if missing:
    raise ManifestError(f'manifest DataFrame lacks column(s) '
                        f'{", ".join(missing)}')
  df = df.reset_index(drop=True).copy()
  if ROW not in df.columns:
    df.insert(0, ROW, np.arange(len(df)) + 2)
  parse_readers(df, 'the manifest')
  problems, parsed = zip(*(_row_problems(r) for _, r in df.iterrows())) if (
      len(df)) else ((), ())
  parsed = pd.DataFrame(list(parsed), index=df.index,
                        columns=['visit', *schema.GRADES])
  df['subject_id'] = df['subject_id'].astype(str).str.strip()
  df['side'] = df['side'].astype(str).str.strip().str.upper()
  df['site'] = df['site'].fillna('').astype(str).str.strip()
  df['path'] = df['path'].fillna('').astype(str)
  if PATH_AS_WRITTEN not in df.columns:
    df[PATH_AS_WRITTEN] = df['path']
  for column in parsed.columns:
    df[column] = parsed[column].astype(int)
  df[PROBLEM] = ['; '.join(message for _, message in p) for p in problems]
  df[PROBLEM_KIND] = [p[0][0] if p else '' for p in problems]
  _mark_duplicates(df)
  return df


def _mark_duplicates(df: pd.DataFrame) -> None:
  """Marks every copy of a repeated (subject_id, visit, side): which one is
  right cannot be known, so none is used."""
  keyed = df[(df['subject_id'] != '') & (df['visit'] >= 0)]
  groups = keyed.groupby(list(schema.ID_COLUMNS), sort=False).groups
  for key, index in groups.items():
    if len(index) < 2:
      continue
    rows = df.loc[index, ROW].tolist()
    for i, row in zip(index, rows):
      others = ', '.join(str(r) for r in rows if r != row)
      note = (f'duplicate knee {schema.knee_id(*key)} (also on row(s) '
              f'{others}); all copies skipped')
      df.at[i, PROBLEM] = '; '.join(p for p in (df.at[i, PROBLEM], note) if p)
      df.at[i, PROBLEM_KIND] = df.at[i, PROBLEM_KIND] or 'duplicate'


def read_readers(path: str | os.PathLike) -> pd.DataFrame:
  """The further readers' grades of a manifest, without checking the rest.

  Cheaper than `read_manifest` for a manifest that was built already.

  Returns:
    Columns knee_id and every kl_reader_<name> (int, -1 for empty), one row
    per manifest row with a usable key (later copies of a key dropped); no
    reader columns when the manifest has none.

  Raises:
    ManifestError: as `read_manifest` does for the file and reader columns.
  """
  path = Path(path)
  df = _read_csv(path, schema.MANIFEST_COLUMNS, 'manifest')
  df.insert(0, ROW, np.arange(len(df)) + 2)
  readers = parse_readers(df, path)
  visits = [_parse_int(v) for v in df['visit']]
  ids = [schema.knee_id(str(s).strip(), v, str(side).strip().upper())
         if v is not None and v >= 0 else ''
         for s, v, side in zip(df['subject_id'], visits, df['side'])]
  out = pd.DataFrame({'knee_id': ids})
  for column in readers:
    out[column] = df[column].to_numpy()
  return out[out.knee_id != ''].drop_duplicates('knee_id').reset_index(
      drop=True)


def read_landmarks(path: str | os.PathLike, *, shown: str | None = None
                   ) -> dict[KneeKey, np.ndarray]:
  """Reads the landmarks CSV.

  Args:
    path: CSV with columns `schema.LANDMARK_COLUMNS` (x, y in pixels of the
      image file the manifest names).
    shown: how log messages name the file (default: `path` as given).

  Returns:
    {(subject_id, visit, side): (16, 2) float64 array of (x, y)}. Cells that
    are empty or not numbers become NaN, so the knee is reported when it is
    built rather than silently missing. A knee listed twice keeps its first
    row (a warning names both).

  Raises:
    ManifestError: the file is missing, empty, not comma-separated UTF-8
      text, has no rows or lacks required columns.
  """
  path = Path(path)
  df = _read_csv(path, schema.LANDMARK_COLUMNS, 'landmarks')
  coords = df[list(schema.LANDMARK_COLUMNS[3:])].apply(
      pd.to_numeric, errors='coerce').to_numpy(np.float64)
  coords = coords.reshape(len(df), schema.NUM_LANDMARKS, 2)
  out: dict[KneeKey, np.ndarray] = {}
  first_row: dict[KneeKey, int] = {}
  for i, (subject, visit, side) in enumerate(
      df[list(schema.ID_COLUMNS)].itertuples(index=False)):
    visit_int = _parse_int(visit)
    key = (subject.strip(), -1 if visit_int is None else visit_int,
           side.strip().upper())
    if key in out:
      log.warning('%s row %d repeats the landmarks of row %d; using row %d',
                  shown or path, i + 2, first_row[key], first_row[key])
      continue
    out[key] = coords[i]
    first_row[key] = i + 2
  return out
