"""The problems found while converting grade tables, and the file listing them.

`oai.convert` writes one row per problem next to the manifest
(manifest.csv -> manifest.issues.csv).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

ISSUE_COLUMNS = ('kind', 'subject_id', 'visit', 'side', 'source', 'detail')


@dataclasses.dataclass(frozen=True)
class Issue:
  """One problem found while converting; kinds are listed in `oai.convert`."""
  kind: str
  subject_id: str = ''
  visit: int | None = None
  side: str = ''
  source: str = ''
  detail: str = ''


def issues_frame(issues: Sequence[Issue]) -> pd.DataFrame:
  """The issues as rows of ISSUE_COLUMNS, visit an integer or missing."""
  df = pd.DataFrame([dataclasses.asdict(i) for i in issues],
                    columns=list(ISSUE_COLUMNS))
  df['visit'] = df['visit'].astype('Int64')
  return df


def issues_path(out: str | os.PathLike) -> Path:
  """Where `oai.convert` writes the issues of manifest `out`.

  manifest.csv -> manifest.issues.csv.
  """
  out = Path(out)
  return out.with_name(f'{out.stem}.issues.csv')
