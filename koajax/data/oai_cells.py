"""Single cells of OAI and MOST tables: grades, sides, ids, visits, sites.

Cells come as numbers, as text ('2', '2.0'), as SAS labelled values
('2: 2', '1: Right', 'C: Pittsburgh') or as bytes from SAS files; the
parsers here accept all of these and raise ValueError for anything else.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

# V11 and V12 follow the yearly schedule after V05; the others are as the
# OAI releases name them (e.g. '1.C.2' = 12 months).
OAI_VISIT_MONTHS = {0: 0, 1: 12, 2: 18, 3: 24, 4: 30, 5: 36, 6: 48, 7: 60,
                    8: 72, 9: 84, 10: 96, 11: 108, 12: 120}
MOST_VISIT_MONTHS = {0: 0, 1: 15, 2: 30, 3: 60, 5: 84}
VISIT_MONTHS = {'oai': OAI_VISIT_MONTHS, 'most': MOST_VISIT_MONTHS}

_LABELLED_NUMBER = re.compile(r'^([-+]?\d+(?:\.\d*)?)\s*(?::.*)?$')
_MISSING_WORDS = {'', 'nan', 'none', 'na', 'n/a', 'null'}


def cell_text(value: Any) -> str:
  """A cell as stripped text; bytes (from SAS files) are latin-1."""
  if isinstance(value, bytes):
    value = value.decode('latin-1')
  return str(value).strip()


def is_missing(value: Any) -> bool:
  """True for empty cells: None/NaN, blanks and SAS-style '.' codes."""
  if value is None:
    return True
  if isinstance(value, float) and math.isnan(value):
    return True
  text = cell_text(value)
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
  match = _LABELLED_NUMBER.match(cell_text(value))
  if not match:
    raise ValueError(f'not a grade: {cell_text(value)!r}')
  number = float(match.group(1))
  if not number.is_integer():
    raise ValueError(f'not a whole grade: {cell_text(value)!r}')
  return int(number)


def parse_side(value: Any) -> str:
  """'R' or 'L' from 1, 2, '1: Right', 'R', 'left', ...; else ValueError."""
  text = cell_text(value).upper()
  match = _LABELLED_NUMBER.match(text)
  if match and float(match.group(1)) in (1, 2):
    return 'R' if float(match.group(1)) == 1 else 'L'
  if text in ('R', 'RIGHT'):
    return 'R'
  if text in ('L', 'LEFT'):
    return 'L'
  raise ValueError(f'not a side: {cell_text(value)!r}')


def normalize_id(value: Any) -> str:
  """Subject ids as text; SAS numeric ids lose their '.0'."""
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    return str(int(value))
  text = cell_text(value)
  return text[:-2] if re.fullmatch(r'\d+\.0', text) else text


def parse_visit(value: Any, kind: str | None) -> int:
  """Visit months from '12' / 12 / 12.0, or a study visit code ('V01', 'V5')."""
  text = cell_text(value).upper()
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


def site_label(value: Any) -> str:
  """The site code of a cell; '' when missing."""
  # Labelled values ('C: Pittsburgh') keep their code.
  text = '' if is_missing(value) else cell_text(value)
  return text.split(':', 1)[0].strip()
