"""A grid of cached knees, one row per KL grade.

  python -m koajax.data.gallery --cache=DIR --out=knees_by_kl.png [--per_grade=6]

The PNG is written to a temporary name and renamed into place, so a failed
run leaves an earlier one as it was. Exit status as in `koajax.cli`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from koajax import cli
from koajax.data import atomic
from koajax.data import cache as cache_lib
from koajax.data import schema

PROGRAM = 'koajax.data.gallery'


def pick_by_grade(index, per_grade: int, seed: int = 0) -> dict[int, np.ndarray]:
  """Record indices of up to `per_grade` random knees of each KL grade."""
  rng = np.random.default_rng(seed)
  picks = {}
  for grade in range(schema.GRADE_MAX['kl'] + 1):
    rows = np.flatnonzero(index['kl'].to_numpy() == grade)
    picks[grade] = np.sort(rng.choice(rows, min(per_grade, len(rows)),
                                      replace=False))
  return picks


def save_grid(cache: cache_lib.Cache, out: str | Path, *, per_grade: int = 6,
              seed: int = 0, show_keypoints: bool = True) -> Path:
  """Writes the grid as a PNG and returns its path."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  picks = pick_by_grade(cache.index, per_grade, seed)
  rows = len(picks)
  fig, axes = plt.subplots(rows, per_grade, figsize=(1.6 * per_grade, 1.7 * rows),
                           squeeze=False)
  for grade, ax_row in zip(picks, axes):
    for col, ax in enumerate(ax_row):
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      if col == 0:
        ax.set_ylabel(f'KL {grade}', fontsize=11)
      if col >= len(picks[grade]):
        continue
      rec = cache[picks[grade][col]]
      ax.imshow(rec['image'], cmap='gray', vmin=0, vmax=255)
      if show_keypoints and np.isfinite(rec['keypoints']).all():
        kp = rec['keypoints']
        ax.scatter(kp[:, 0], kp[:, 1], s=2, c='tab:orange', linewidths=0)
      row = cache.index.iloc[picks[grade][col]]
      ax.set_title(f'{row.knee_id}\nsite {row.site}', fontsize=5)
  fig.suptitle('Knees by KL grade (ROI %.0f mm, landmarks in orange)'
               % cache.meta['roi_mm'], fontsize=9)
  fig.tight_layout()
  try:
    return atomic.write_with(
        out, lambda tmp: fig.savefig(tmp, dpi=130, format='png'))
  finally:
    plt.close(fig)


def main(argv=None) -> int:
  """The command: writes the grid; returns the exit status."""
  import argparse
  p = argparse.ArgumentParser(
      prog=f'python -m {PROGRAM}', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--cache', required=True, help='cache directory')
  p.add_argument('--out', required=True, help='PNG file to write')
  p.add_argument('--per_grade', type=int, default=6)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no_keypoints', action='store_true')
  args = p.parse_args(argv)
  if args.per_grade < 1:
    raise cli.BadInput(f'--per_grade={args.per_grade}: give 1 or more')
  if Path(args.out).suffix.lower() != '.png':
    raise cli.BadInput(f'--out={args.out}: give a .png file')
  path = save_grid(cache_lib.open_cache(args.cache), args.out,
                   per_grade=args.per_grade, seed=args.seed,
                   show_keypoints=not args.no_keypoints)
  print(f'wrote {path}')
  return cli.OK


if __name__ == '__main__':
  cli.run(PROGRAM, main)
