"""The data job: make sure the dataset's cache exists, then describe it.

Writes WORKDIR/data_summary.json and WORKDIR/knees_by_kl.png and prints a
short report: knees, subjects, grade distributions, sites and split sizes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import ml_collections
import pandas as pd

from koajax.data import atomic
from koajax.data import cache as cache_lib
from koajax.data import gallery
from koajax.data import schema
from koajax.data import sources

log = logging.getLogger(__name__)


def _distribution(values: pd.Series, levels: range) -> dict[str, Any]:
  graded = values[values >= 0]
  counts = {int(g): int((graded == g).sum()) for g in levels}
  return {'counts': counts, 'ungraded': int((values < 0).sum()),
          'percent': {g: round(100 * c / max(len(graded), 1), 1)
                      for g, c in counts.items()}}


def describe(cache: cache_lib.Cache) -> dict[str, Any]:
  """Counts that tell whether a dataset looks as expected."""
  index = cache.index
  return {
      'cache_dir': str(cache.dir),
      'knees': len(index),
      'subjects': int(index['subject_id'].nunique()),
      'visits': sorted(int(v) for v in index['visit'].unique()),
      'sites': {str(k): int(v) for k, v in
                index['site'].value_counts().sort_index().items()},
      'roi_mm': cache.meta['roi_mm'],
      'roi_px': cache.meta['roi_px'],
      'grades': {g: _distribution(index[g], range(schema.GRADE_MAX[g] + 1))
                 for g in schema.GRADES},
  }


def format_report(summary: dict[str, Any]) -> str:
  lines = [
      f"cache      {summary['cache_dir']}",
      f"knees      {summary['knees']} from {summary['subjects']} subjects, "
      f"visits {summary['visits']}",
      f"ROI        {summary['roi_mm']:.0f} mm at {summary['roi_px']} px",
      'sites      ' + ', '.join(f'{k}: {v}' for k, v in summary['sites'].items()),
      'grade      ' + ''.join(f'{g:>8d}' for g in range(5)) + '  ungraded',
  ]
  for name, dist in summary['grades'].items():
    cells = ''.join(f"{dist['percent'].get(g, 0):7.1f}%" if g in dist['percent']
                    else ' ' * 8 for g in range(5))
    lines.append(f'{name:<11}{cells}  {dist["ungraded"]:>8d}')
  for name, sizes in summary.get('splits', {}).items():
    lines.append(f'split      {name}: ' +
                 ', '.join(f'{k} {v}' for k, v in sizes.items()))
  return '\n'.join(lines)


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  cache = sources.resolve_cache(config.data)
  summary = describe(cache)
  summary['seconds_to_prepare'] = round(time.perf_counter() - start, 1)
  atomic.write_text(workdir / 'data_summary.json',
                    json.dumps(summary, indent=2) + '\n')
  grid = gallery.save_grid(cache, workdir / 'knees_by_kl.png', per_grade=6,
                           seed=config.seed)
  print(format_report(summary))
  print(f'wrote {workdir / "data_summary.json"} and {grid}')
  return summary
