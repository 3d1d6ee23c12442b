r"""The trained localiser on whole films: accuracy against the truth, speed.

Every knee of a manifest's films is localised by `koajax.localize` (both
stages, the two-look check included) in this one process, film by film as a
build worker does, and compared with the landmarks file: KNEEL's figures
(`koajax.evaluation.landmarks.report`) over the knees found, and what was
refused, by reason. Time per film is split into reading the DICOM, cutting
the views and the two networks; the first `--warmup` films (compilation)
are not timed.

With --single, each bilateral film is cut at its middle into two single-knee
films (each half as a film of its own: portrait, so single by
`preprocess.is_bilateral`), and every knee is localised on its half twice:
with its own side, scored as above, and with the other side, where a
localiser whose coarse stage learnt sides should refuse it ('laterality').

Run (the synthetic set of another seed than the localiser's training data):
  python -m koajax.data.synthetic --out=/tmp/knees-s1 --num_subjects=560 --seed=1
  python benchmarks/localize_films.py --localizer=/tmp/koajax-localizer \
      --manifest=/tmp/knees-s1/manifest.csv [--sites=E] [--films=200]

Results print as a Markdown table and go to --out as JSON.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

from absl import app
from absl import flags
import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import summary, write_json  # noqa: E402  (benchmarks/machine.py)

_LOCALIZER = flags.DEFINE_string('localizer', None, 'Localiser folder '
                                 '(coarse/ and fine/ runs).')
_MANIFEST = flags.DEFINE_string('manifest', None, 'Manifest CSV.')
_LANDMARKS = flags.DEFINE_string('landmarks', None, 'True landmarks CSV '
                                 '(default: landmarks.csv beside the '
                                 'manifest).')
_SITES = flags.DEFINE_list('sites', [], 'Only these sites (default all).')
_FILMS = flags.DEFINE_integer('films', 0, 'At most this many films (0: all).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed films first.')
_SINGLE = flags.DEFINE_bool('single', False, 'Localise each knee on its half '
                            'of the film, as a single-knee film, with its side '
                            'and with the other side.')
_OUT = flags.DEFINE_string('out', None, 'JSON results file.')


class _Timed:
  """Wraps a callable, adding its seconds to `totals[name]`."""

  def __init__(self, fn, name, totals):
    self.fn, self.name, self.totals = fn, name, totals

  def __call__(self, *args, **kwargs):
    import jax
    start = time.perf_counter()
    try:
      # Dispatch returns at once: the wait is the network's time.
      return jax.block_until_ready(self.fn(*args, **kwargs))
    finally:
      self.totals[self.name] += time.perf_counter() - start


def main(argv):
  del argv
  from koajax import localize
  from koajax.data import dicom_io
  from koajax.data import manifest as manifest_lib
  from koajax.data import preprocess
  from koajax.evaluation import landmarks as landmarks_lib

  manifest = Path(_MANIFEST.value)
  truth = manifest_lib.read_landmarks(
      _LANDMARKS.value or manifest.with_name('landmarks.csv'))
  frame = pd.read_csv(manifest, dtype={'subject_id': str})
  if _SITES.value:
    frame = frame[frame['site'].isin(_SITES.value)]
  films = list(frame.groupby('path', sort=False))
  if _FILMS.value:
    films = films[:_FILMS.value]
  loc = localize.Localizer.load(_LOCALIZER.value)
  totals = collections.Counter()
  loc.coarse.fn = _Timed(loc.coarse.fn, 'coarse network', totals)
  loc.fine.fn = _Timed(loc.fine.fn, 'fine network', totals)
  pred, true, spacings, refused = [], [], [], collections.Counter()
  other_side = collections.Counter()  # --single: told the other side
  timed = 0
  for n, (path, knees) in enumerate(films):
    if n == _WARMUP.value:
      totals.clear()
      start = time.perf_counter()
    begin = time.perf_counter()
    image, spacing = dicom_io.read_radiograph(manifest.parent / path)
    totals['read'] += time.perf_counter() - begin
    timed += n >= _WARMUP.value
    if _SINGLE.value:
      # The right knee on the image's left half, the left on its right.
      half = image.shape[1] // 2
      cuts = {'R': (image[:, :half], 0), 'L': (image[:, half:], half)}
      for knee in knees.itertuples(index=False):
        film, x0 = cuts[knee.side]
        [result] = loc.locate(film, spacing, [knee.side], bilateral=False)
        other = {'R': 'L', 'L': 'R'}[knee.side]
        [wrong] = loc.locate(film, spacing, [other], bilateral=False)
        other_side[getattr(wrong, 'kind', 'found')] += 1
        if isinstance(result, localize.Refused):
          refused[result.kind] += 1
          continue
        pred.append(result.landmarks + [x0, 0])
        true.append(truth[(knee.subject_id, int(knee.visit), knee.side)])
        spacings.append(spacing)
      continue
    sides = list(knees['side'])
    bilateral = len(set(sides)) > 1 or preprocess.is_bilateral(image.shape,
                                                               spacing)
    results = loc.locate(image, spacing, sides, bilateral=bilateral)
    for result, knee in zip(results, knees.itertuples(index=False)):
      if isinstance(result, localize.Refused):
        refused[result.kind] += 1
        continue
      pred.append(result.landmarks)
      true.append(truth[(knee.subject_id, int(knee.visit), knee.side)])
      spacings.append(spacing)
  seconds = time.perf_counter() - start
  report = landmarks_lib.report(np.array(pred), np.array(true),
                                np.array(spacings))
  per_film = {k: v / timed for k, v in totals.items()}
  per_film['views and the rest'] = seconds / timed - sum(per_film.values())
  result = {
      'machine': summary(), 'localizer': _LOCALIZER.value,
      'manifest': str(manifest), 'sites': _SITES.value or 'all',
      'films': len(films), 'knees': int(len(frame) if not _FILMS.value else
                                         sum(len(k) for _, k in films)),
      'single_knee_films': _SINGLE.value,
      'found': len(pred), 'refused': dict(refused),
      'told_the_other_side': dict(other_side),
      'films_per_second': timed / seconds,
      'seconds_per_film': per_film, 'accuracy': report}
  print(f'{summary()}\n')
  print(f'{len(films)} films, {result["knees"]} knees: {len(pred)} found, '
        f'refused {dict(refused) or "none"}; {result["films_per_second"]:.2f} '
        'films/s in one process' + (
            '; each knee on its half-film, and told the other side: '
            f'{dict(other_side)}' if _SINGLE.value else ''))
  print('\n| per film | ms |\n|---|---|')
  for name, value in per_film.items():
    print(f'| {name} | {1000 * value:.1f} |')
  c = report['centre']
  print(f'\njoint centre: mean {c["mean_mm"]:.2f} mm, median '
        f'{c["median_mm"]:.2f}, 95th percentile {c["p95_mm"]:.2f}, within 2 mm '
        f'{c["within_2mm"]:.3f}; outliers (>= 10 mm) {report["outliers"]:.4f}')
  print('\n| | 1 mm | 1.5 mm | 2 mm | 2.5 mm | mean |\n|---|---|---|---|---|---|')
  for bone in ('tibia', 'femur'):
    r = report['recall'][bone]
    print(f'| {bone} | ' + ' | '.join(f'{r[k]:.3f}' for k in r) +
          f' | {report["mean_mm"][bone]:.2f} mm |')
  if _OUT.value:
    write_json(_OUT.value, [result])


if __name__ == '__main__':
  flags.mark_flags_as_required(['localizer', 'manifest'])
  app.run(main)
