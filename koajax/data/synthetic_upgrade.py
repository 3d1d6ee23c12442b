"""Bringing a synthetic dataset made by an older koajax up to date in place.

The generator gained simulated readers (manifest columns kl_reader_<name>)
after datasets had been made without them. Their grades are a pure function
of truth.csv's severities, the seed and the options
(`synthetic.reader_grades`), so `add_readers` gives such a dataset the
manifest a new run would write, without rendering anything again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from koajax.data import atomic
from koajax.data import grading
from koajax.data import schema
from koajax.data import synthetic

log = logging.getLogger(__name__)


def add_readers(out_dir: str | os.PathLike, *,
                seed: int | None = None) -> list[str]:
  """Adds the further readers' columns that a dataset's manifest lacks.

  For datasets made before the generator had further readers: their grades
  come from truth.csv and the dataset's settings (`reader_grades`), so the
  manifest becomes the one a new run would write, and nothing is rendered
  again. The manifest is replaced in one step (`atomic.write_text`).

  Args:
    out_dir: a dataset of this generator.
    seed: the seed it was made with, for a dataset older than synthetic.json
      (its options are then the defaults); None leaves such a dataset alone.

  Returns:
    The manifest columns added; [] when there was nothing to add, or when
    the folder is not known to be this generator's (it is never changed).
  """
  out_dir = Path(out_dir)
  settings = _settings(out_dir, seed)
  if settings is None or not (out_dir / synthetic.TRUTH).is_file():
    return []
  config = synthetic._config(dict(settings.get('options') or {}))
  manifest = pd.read_csv(out_dir / synthetic.MANIFEST, dtype=str, keep_default_na=False)
  wanted = [schema.reader_column(n) for n in grading.reader_names(config)]
  missing = [c for c in wanted if c not in manifest.columns]
  if not missing:
    return []
  truth = pd.read_csv(out_dir / synthetic.TRUTH, dtype=str, keep_default_na=False)
  if 'severity' not in truth.columns:
    return []  # older than the severities: readers cannot be added
  keys = list(schema.ID_COLUMNS)
  if not manifest[keys].equals(truth[keys]):
    # Not fatal: the readers are extra, the dataset may still train.
    log.warning('%s: %s and %s list different knees, so the simulated '
                'readers cannot be added; generate the dataset again to have '
                'them', out_dir, synthetic.MANIFEST, synthetic.TRUTH)
    return []
  # pandas wrote each severity as the shortest text of its float, which
  # parses back to exactly that float.
  severity = truth['severity'].astype(np.float64).to_numpy()
  grades = synthetic.reader_grades(severity, (manifest['kl'] != '').to_numpy(),
                         int(settings['seed']), config)
  for column in missing:
    manifest[column] = [str(v) if v is not pd.NA else ''
                        for v in grades[column]]
  atomic.write_text(out_dir / synthetic.MANIFEST, manifest.to_csv(index=False))
  return missing


def _settings(out_dir: Path, seed: int | None) -> dict[str, Any] | None:
  """The dataset's synthetic.json; for a folder without one, settings of
  `seed` with default options; None if neither applies."""
  path = out_dir / synthetic.SETTINGS
  if not path.exists():
    return None if seed is None else {'generator': synthetic.PROGRAM, 'seed': seed}
  try:
    settings = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError):
    return None
  if not isinstance(settings, dict) or settings.get('generator') != synthetic.PROGRAM:
    return None
  return settings
