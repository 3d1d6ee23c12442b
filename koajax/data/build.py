"""Builds the knee cache from a manifest of DICOM radiographs.

  python -m koajax.data.build --manifest=PATH --out=DIR \\
      [--landmarks=PATH] [--localizer=DIR] [--crop=knee|side] \\
      [--roi_mm=140] [--roi_px=400] [--workers=N] [--strict] [--redact_paths]

Each radiograph is read once for all its knees (a bilateral film has two),
files are processed in parallel, and the cache lists knees in a fixed order:
files by their first row in the manifest, then knees in manifest order.
The manifest's kl_reader_<name> columns (further readers' KL grades) go into
the cache index as they are, -1 where empty.

Nothing unusable stops the build: every manifest row or file that cannot be
used is logged on one line, named with its reason, and listed in
DIR/summary.json with per-reason counts. Files are named as the manifest
writes them (not resolved against its folder), or, with --redact_paths, not
at all: knees are then named by id only, in logs and summary.json alike.

Exit status (`koajax.cli`): 0 built; 1 no knee could be built, or, with
--strict, something was skipped (`BuildError`; no cache is written: a cache
in DIR stays as it was, else DIR holds only summary.json); 2 bad input: an
unreadable manifest or landmarks file, or a DIR holding anything but a
koajax cache, refused before anything is written; 130 interrupted. The
cache is made beside DIR and replaces it in one step (`cache.CacheWriter`),
so a build that fails or is killed, even with kill -9, leaves DIR as it was;
the next build removes its partial folder.

A knee without a row in the landmarks file is skipped, unless --localizer
names a trained localiser (`koajax.localize`: a folder with its coarse and
fine runs): its landmarks are then found on the film, the cache index
records where each knee's landmarks came from (`landmarks_from`: 'file' or
'localizer'), and a knee the localiser cannot find, or finds on the other
side than the manifest says, is skipped with the reason.

A film is bilateral when the manifest names both its knees or it is
landscape (`preprocess.is_bilateral`); otherwise it holds the one knee its
row names.

--crop=side builds the localiser's coarse training data instead of knee
ROIs: each knee's side of its film (`preprocess.extract_side`), roi_mm
square at roi_px, with the knee's landmarks in its pixels.

`iter_knees` is the build without the writing, for other dataset writers.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tqdm
from tqdm.contrib import logging as tqdm_logging

from koajax import cli
from koajax.data import atomic
from koajax.data import cache
from koajax.data import dicom_io
from koajax.data import manifest as manifest_lib
from koajax.data import preprocess
from koajax.data import schema

log = logging.getLogger(__name__)

PROGRAM = 'koajax.data.build'
LANDMARKS_NAME = 'landmarks.csv'  # default, beside the manifest
CROPS = ('knee', 'side')


@dataclasses.dataclass(frozen=True)
class Skipped:
  """An input that was not built, and why.

  Attributes:
    where: the file path as the manifest writes it (the knee ids when paths
      are redacted), or 'manifest row N (subject, visit, side)'.
    reason: what is wrong, in words a user can act on.
    kind: short category for counting ('missing_file', 'no_landmarks', ...).
    knees: ids of the knees lost (two for an unusable bilateral film).
  """
  where: str
  reason: str
  kind: str = 'other'
  knees: tuple[str, ...] = ()

  @property
  def num_knees(self) -> int:
    return max(1, len(self.knees))

  def __str__(self) -> str:
    return f'skipped {self.where}: {self.reason}'


class BuildError(RuntimeError):
  """The build produced no usable cache; `summary` says why."""

  def __init__(self, message: str, summary: dict[str, Any]):
    super().__init__(message)
    self.summary = summary


@dataclasses.dataclass(frozen=True)
class _KneeTask:
  row: int
  subject_id: str
  visit: int
  side: str
  site: str
  grades: tuple[int, ...]
  landmarks: np.ndarray | None  # None: for the localiser to find
  readers: tuple[tuple[str, int], ...] = ()  # (kl_reader_<name>, grade)

  @property
  def knee_id(self) -> str:
    return schema.knee_id(self.subject_id, self.visit, self.side)

  @property
  def where(self) -> str:
    return _row_label(self.row, self.subject_id, self.visit, self.side)


@dataclasses.dataclass(frozen=True)
class _FileTask:
  path: str  # where to read it
  knees: tuple[_KneeTask, ...]
  shown: str = ''  # how messages name it: as written, or by its knees
  redacted: bool = False  # `shown` names the knees, not the file

  @property
  def label(self) -> str:
    return self.shown or self.path


def _row_label(row: int, subject_id: str, visit: int, side: str) -> str:
  visit_text = str(visit) if visit >= 0 else '?'
  return f'manifest row {row} ({subject_id}, {visit_text}, {side})'


def _one_line(text: str, limit: int = 300) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _landmark_problem(landmarks: np.ndarray, shape: tuple[int, int]) -> str:
  """Why these landmarks cannot belong to an image of `shape`, or ''."""
  if not np.isfinite(landmarks).all():
    return 'landmarks contain empty or non-numeric values'
  rows, cols = shape
  outside = ((landmarks[:, 0] < -0.5) | (landmarks[:, 0] > cols - 0.5) |
             (landmarks[:, 1] < -0.5) | (landmarks[:, 1] > rows - 0.5))
  if outside.any():
    i = int(np.argmax(outside))
    x, y = landmarks[i]
    return (f'landmark {i} at ({x:.1f}, {y:.1f}) is outside the {cols}x{rows}'
            ' image; landmarks must be in pixels of the image file')
  return ''


def _process_file(task: _FileTask, *, roi_mm: float, roi_px: int,
                  crop: str = 'knee', localizer: str = ''
                  ) -> list[cache.Knee | Skipped]:
  """Reads one radiograph and extracts each of its knees (worker side)."""
  ids = tuple(k.knee_id for k in task.knees)
  try:
    image, spacing = dicom_io.read_radiograph(task.path)
  except dicom_io.InputError as e:
    return [Skipped(task.label, e.reason, e.kind, ids)]
  except Exception as e:  # pylint: disable=broad-except
    # One odd file must not end a build of thousands; it is reported instead.
    # The message may quote the path as it was read.
    text = f'{type(e).__name__}: {e}'.replace(
        task.path, 'the file' if task.redacted else task.label)
    return [Skipped(task.label, _one_line(
        f'unexpected error reading the file: {text}'), 'unexpected', ids)]
  background = preprocess.background_level(image)
  # The knee's messages name its file unless the file is named by its knees.
  named = '' if task.redacted else task.label
  bilateral = (len({k.side for k in task.knees}) > 1 or
               preprocess.is_bilateral(image.shape, spacing))
  found = _localise(task, localizer, image, spacing, background, bilateral)
  return [
      found[i] if isinstance(found.get(i), Skipped) else _extract(
          knee, named, image, spacing, background, roi_mm=roi_mm,
          roi_px=roi_px, crop=crop, bilateral=bilateral,
          landmarks=found.get(i), localised=localizer != '')
      for i, knee in enumerate(task.knees)]


def _localise(task: _FileTask, localizer: str, image: np.ndarray,
              spacing: tuple[float, float], background: float,
              bilateral: bool) -> dict[int, np.ndarray | Skipped]:
  """Landmarks (or why not) of the file's knees that have none, by their
  position in `task.knees`."""
  wanted = [i for i, k in enumerate(task.knees) if k.landmarks is None]
  if not wanted:
    return {}
  from koajax import localize  # JAX: only in builds that localise
  sides = [task.knees[i].side for i in wanted]
  suffix = '' if task.redacted else f' ({task.label})'
  try:
    results = localize.load(localizer).locate(
        image, spacing, sides, bilateral=bilateral, background=background)
  except Exception as e:  # pylint: disable=broad-except
    # As for reading: one odd film costs its knees, not the build.
    results = [localize.Refused(
        f'unexpected error localising: {type(e).__name__}: {e}',
        'unexpected')] * len(wanted)
  out: dict[int, np.ndarray | Skipped] = {}
  for i, result in zip(wanted, results):
    knee = task.knees[i]
    if isinstance(result, localize.Found):
      out[i] = result.landmarks
    else:
      out[i] = Skipped(knee.where, _one_line(f'{result.reason}{suffix}'),
                       result.kind, (knee.knee_id,))
  return out


def _extract(knee: _KneeTask, path: str, image: np.ndarray,
             spacing: tuple[float, float], background: float, *,
             roi_mm: float, roi_px: int, crop: str = 'knee',
             bilateral: bool = True, landmarks: np.ndarray | None = None,
             localised: bool = False) -> cache.Knee | Skipped:
  """`path`: how messages name the file, '' for not at all; `landmarks`:
  found by the localiser for a knee without them in the file; `localised`:
  the build localises, so the cache says where landmarks came from."""
  suffix = f' ({path})' if path else ''
  from_file = landmarks is None
  if from_file:
    landmarks = knee.landmarks
  problem = _landmark_problem(landmarks, image.shape)
  if problem:
    return Skipped(knee.where, f'{problem}{suffix}', 'bad_landmarks',
                   (knee.knee_id,))
  try:
    if crop == 'side':
      roi, geometry = preprocess.extract_side(
          image, spacing, knee.side, bilateral=bilateral, view_mm=roi_mm,
          view_px=roi_px, background=background)
      keypoints = geometry.to_roi(landmarks).astype(np.float32)
    else:
      roi, keypoints = preprocess.extract_roi(
          image, spacing, landmarks, knee.side, roi_mm=roi_mm,
          roi_px=roi_px, background=background)
  except Exception as e:  # pylint: disable=broad-except
    # ValueError is the documented "unusable knee"; anything else is
    # unexpected but still costs one knee, not the build.
    known = isinstance(e, ValueError)
    reason = str(e) if known else f'unexpected error: {type(e).__name__}: {e}'
    return Skipped(knee.where, _one_line(f'{reason}{suffix}'),
                   'preprocessing' if known else 'unexpected', (knee.knee_id,))
  return cache.Knee(
      subject_id=knee.subject_id, visit=knee.visit, side=knee.side,
      site=knee.site, image=roi, keypoints=keypoints,
      grades=np.asarray(knee.grades, np.int8), readers=dict(knee.readers),
      landmarks_from=('' if not localised else
                      'file' if from_file else 'localizer'))


def _knees_label(ids: Sequence[str]) -> str:
  return ('knee ' if len(ids) == 1 else 'knees ') + ', '.join(ids)


def _plan(df: pd.DataFrame, landmarks: Mapping[manifest_lib.KneeKey,
                                                np.ndarray],
          landmarks_name: str, redact_paths: bool = False,
          localise: bool = False) -> tuple[list[Skipped], list[_FileTask]]:
  """Row-level skips, and the files to read with their knees."""
  skipped: list[Skipped] = []
  by_path: dict[str, list[_KneeTask]] = {}
  written: dict[str, str] = {}
  reader_columns = schema.reader_columns(df.columns)
  readers = df[reader_columns].to_numpy(int) if reader_columns else None
  for i, r in enumerate(df.itertuples(index=False)):
    label = _row_label(r.row, r.subject_id, r.visit, r.side)
    knee_ids = ((schema.knee_id(r.subject_id, r.visit, r.side),)
                if r.visit >= 0 else ())
    if getattr(r, manifest_lib.PROBLEM):
      skipped.append(Skipped(label, getattr(r, manifest_lib.PROBLEM),
                             getattr(r, manifest_lib.PROBLEM_KIND), knee_ids))
      continue
    points = landmarks.get((r.subject_id, r.visit, r.side))
    if points is None and not localise:
      skipped.append(Skipped(
          label, f'no landmarks for this knee; add it to {landmarks_name}',
          'no_landmarks', knee_ids))
      continue
    path = os.path.normpath(r.path)
    written.setdefault(path, getattr(r, manifest_lib.PATH_AS_WRITTEN))
    by_path.setdefault(path, []).append(_KneeTask(
        row=r.row, subject_id=r.subject_id, visit=r.visit, side=r.side,
        site=r.site, grades=tuple(getattr(r, g) for g in schema.GRADES),
        landmarks=None if points is None else np.asarray(points,
                                                          np.float64),
        readers=() if readers is None else tuple(
            zip(reader_columns, map(int, readers[i])))))
  tasks = []
  for path, knees in by_path.items():
    shown = (_knees_label([k.knee_id for k in knees]) if redact_paths
             else written[path])
    tasks.append(_FileTask(path, tuple(knees), shown, redact_paths))
  return skipped, tasks


def default_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


_Result = list[cache.Knee | Skipped]


def _run(tasks: Sequence[_FileTask], work: Callable[[_FileTask], _Result],
         workers: int) -> Iterator[_Result]:
  """Results of `work` per task, in task order."""
  workers = min(workers, len(tasks))
  if workers <= 1:
    yield from map(work, tasks)
    return
  # 'spawn' gives clean workers whatever the parent holds (threads, JAX);
  # their start-up cost is small next to a real build.
  context = multiprocessing.get_context('spawn')
  with context.Pool(workers) as pool:
    yield from pool.imap(work, tasks, chunksize=1)


def iter_knees(
    manifest_df: pd.DataFrame,
    landmarks: Mapping[manifest_lib.KneeKey, np.ndarray],
    *,
    roi_mm: float = 140.0,
    roi_px: int = 400,
    workers: int | None = None,
    landmarks_name: str = LANDMARKS_NAME,
    redact_paths: bool = False,
    crop: str = 'knee',
    localizer: str = '',
) -> Iterator[cache.Knee | Skipped]:
  """Preprocesses every knee of a manifest.

  Args:
    manifest_df: `manifest.read_manifest` output, or any frame with the
      manifest columns and usable paths (validated here when it has no
      `problem` column yet).
    landmarks: `manifest.read_landmarks` output.
    roi_mm: ROI side in millimetres.
    roi_px: ROI side in pixels.
    workers: processes; None = all cores, 1 = in this process.
    landmarks_name: how to name the landmarks file in messages.
    redact_paths: name files by their knees' ids, never by path.
    crop: 'knee' (ROIs) or 'side' (the coarse localiser's views).
    localizer: a localiser folder (`koajax.localize`) for the knees without
      landmarks; '' skips them.

  Yields:
    First a `Skipped` for every unusable manifest row, then per file (in
    order of first appearance) its `cache.Knee`s in manifest order, or a
    `Skipped` for the file or knee that failed. The order depends only on
    the inputs.
  """
  df = manifest_df
  if manifest_lib.PROBLEM not in df.columns:
    df = manifest_lib.validate_manifest(df)
  skipped, tasks = _plan(df, landmarks, landmarks_name, redact_paths,
                         localise=bool(localizer))
  yield from skipped
  work = functools.partial(_process_file, roi_mm=roi_mm, roi_px=roi_px,
                           crop=crop, localizer=str(localizer or ''))
  for results in _run(tasks, work, workers or default_workers()):
    yield from results


def _summary(skipped: list[Skipped], built: int, total: int,
             seconds: float, **extra) -> dict[str, Any]:
  by_kind = collections.Counter()
  for s in skipped:
    by_kind[s.kind] += s.num_knees
  return {
      **extra,
      'knees_in_manifest': total,
      'knees_built': built,
      'knees_skipped': sum(s.num_knees for s in skipped),
      'skipped_by_reason': dict(sorted(by_kind.items())),
      'seconds': round(seconds, 2),
      'knees_per_second': round(built / seconds, 2) if seconds > 0 else None,
      'skipped': [dataclasses.asdict(s) for s in skipped],
  }


def build_cache(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    landmarks: str | os.PathLike | None = None,
    roi_mm: float = 140.0,
    roi_px: int = 400,
    workers: int | None = None,
    strict: bool = False,
    redact_paths: bool = False,
    crop: str = 'knee',
    localizer: str | os.PathLike | None = None,
) -> dict[str, Any]:
  """Builds a cache from a manifest; see the module docstring.

  Args:
    manifest: the manifest CSV (`schema`).
    out_dir: the cache directory: new, empty, or a koajax cache, which is
      replaced in one step when the new one is complete.
    landmarks: the landmarks CSV; default landmarks.csv beside the manifest.
    roi_mm: ROI side in millimetres.
    roi_px: ROI side in pixels.
    workers: processes; None = all cores.
    strict: fail if anything at all is skipped.
    redact_paths: name knees by id only: no file path in logs or the
      summary.
    crop: 'knee' (ROIs for grading) or 'side' (the coarse localiser's
      training views).
    localizer: a trained localiser's folder (`koajax.localize`) that finds
      the landmarks of knees the landmarks file lacks; None skips them.

  Returns:
    The summary also written to out_dir/summary.json.

  Raises:
    cli.BadInput: the manifest or landmarks file is unreadable
      (`manifest.ManifestError`), out_dir holds anything but a koajax cache,
      or an option is out of range; nothing has been written.
    BuildError: nothing was built, or `strict` and something was skipped;
      no cache was written, and a cache that was in out_dir is as it was.
  """
  start = time.perf_counter()
  manifest = Path(manifest)
  landmarks = Path(landmarks) if landmarks else manifest.with_name(
      LANDMARKS_NAME)
  out_dir = Path(out_dir)
  _check_options(roi_mm=roi_mm, roi_px=roi_px, workers=workers, crop=crop)
  cache.check_output_dir(out_dir, 'the cache')
  df = manifest_lib.read_manifest(manifest)
  if localizer and not landmarks.exists():
    points = {}  # every knee is localised
  else:
    points = manifest_lib.read_landmarks(
        landmarks, shown='the landmarks file' if redact_paths else None)
  if localizer:
    # Every worker process loads the localiser too: on a GPU, JAX's default
    # of taking 75 % of its memory at start would leave the others none, and
    # their every knee would be refused.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    from koajax import localize  # JAX: only in builds that localise
    # Refused here, before anything is written, if it is not a localiser;
    # an in-process build uses this one.
    localize.load(str(localizer))
  where = 'the cache folder' if redact_paths else str(out_dir)
  skipped: list[Skipped] = []
  writer = None
  localised = 0
  try:
    writer = cache.CacheWriter(out_dir, roi_mm=roi_mm, roi_px=roi_px,
                               extra_meta={'crop': crop})
    items = iter_knees(df, points, roi_mm=roi_mm, roi_px=roi_px,
                       workers=workers, landmarks_name=landmarks.name,
                       redact_paths=redact_paths, crop=crop,
                       localizer=str(localizer or ''))
    with tqdm_logging.logging_redirect_tqdm(), tqdm.tqdm(
        total=len(df), unit='knee', desc='building', disable=None) as bar:
      for item in items:
        if isinstance(item, Skipped):
          log.warning('%s', item)
          skipped.append(item)
          bar.update(item.num_knees)
        else:
          writer.add(item)
          localised += item.landmarks_from == 'localizer'
          bar.update(1)
  except BaseException as e:
    if writer is not None:
      writer.abort()
    atomic.discard_own(out_dir)  # made by a CacheWriter stopped half-way
    if isinstance(e, KeyboardInterrupt):
      log.error('interrupted: no cache was written, %s is as it was', where)
    raise
  files = ({'paths_redacted': True} if redact_paths else
           {'manifest': str(manifest), 'landmarks': str(landmarks)})
  if localizer:
    files.update({'localizer': '' if redact_paths else str(localizer),
                  'knees_localised': localised})
  summary = _summary(skipped, len(writer), len(df),
                     time.perf_counter() - start, **files,
                     roi_mm=float(roi_mm), roi_px=int(roi_px), crop=crop)
  failure = ('no knee could be built' if not len(writer) else
             'knees were skipped and --strict is set' if strict and skipped
             else '')
  if failure:
    written = writer.fail(summary)
    if written.parent == out_dir:
      shown = f'summary.json in {where}'
    else:
      shown = f'{written}; the cache in {where} is as it was'
    raise BuildError(f'{failure} ({_counts_text(summary)}); no cache was '
                     f'written, the skipped inputs are listed in {shown}',
                     summary)
  writer.close(summary=summary)
  return summary


def _check_options(*, roi_mm: float, roi_px: int, workers: int | None,
                   crop: str = 'knee') -> None:
  if crop not in CROPS:
    raise cli.BadInput(f'--crop={crop}: choose {" or ".join(CROPS)}')
  if not (np.isfinite(roi_mm) and roi_mm > 0):
    raise cli.BadInput(f'--roi_mm={roi_mm:g}: give the ROI side in mm, > 0')
  if roi_px < 8:
    raise cli.BadInput(f'--roi_px={roi_px}: give the ROI side in pixels, '
                       '>= 8')
  if workers is not None and workers < 1:
    raise cli.BadInput(f'--workers={workers}: give 1 or more processes')


def _counts_text(summary: dict[str, Any]) -> str:
  counts = ', '.join(f'{k} {v}' for k, v in
                     summary['skipped_by_reason'].items())
  return (f'{summary["knees_built"]} built, {summary["knees_skipped"]} '
          f'skipped' + (f': {counts}' if counts else ''))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=f'python -m {PROGRAM}',
      description='Preprocess the knees of a DICOM manifest into a cache.')
  parser.add_argument('--manifest', required=True, help='manifest CSV')
  parser.add_argument('--out', required=True,
                      help='cache directory: new, empty, or a koajax cache '
                      'to replace')
  parser.add_argument('--landmarks', default=None,
                      help='landmarks CSV (default: landmarks.csv beside the '
                      'manifest)')
  parser.add_argument('--localizer', default=None,
                      help='trained localiser folder (its coarse/ and fine/ '
                      'runs): finds the landmarks of knees that have none')
  parser.add_argument('--crop', default='knee', choices=CROPS,
                      help="knee: ROIs for grading; side: each knee's side "
                      "of its film, the localiser's coarse training views")
  parser.add_argument('--roi_mm', type=float, default=140.0)
  parser.add_argument('--roi_px', type=int, default=400)
  parser.add_argument('--workers', type=int, default=None,
                      help='processes (default: all cores)')
  parser.add_argument('--strict', action='store_true',
                      help='fail (no cache, exit 1) if anything is skipped')
  parser.add_argument('--redact_paths', action='store_true',
                      help='name knees by id only: no file paths in logs or '
                      'summary.json')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command; returns its exit status (0 built, 1 `BuildError`).

  Bad input raises `cli.BadInput` (status 2 through `cli.run`).
  """
  args = _parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  try:
    summary = build_cache(
        args.manifest, args.out, landmarks=args.landmarks,
        roi_mm=args.roi_mm, roi_px=args.roi_px, workers=args.workers,
        strict=args.strict, redact_paths=args.redact_paths, crop=args.crop,
        localizer=args.localizer)
  except BuildError as e:
    # An outcome of the data rather than a fault: one line, no traceback.
    print(f'{PROGRAM}: failed: {cli.message(e)}', file=sys.stderr)
    return cli.FAILED
  log.info('built %s in %.1f s (%s knees/s): %s',
           'the cache' if args.redact_paths else args.out,
           summary['seconds'], summary['knees_per_second'],
           _counts_text(summary))
  return cli.OK


if __name__ == '__main__':
  cli.run(PROGRAM, main)
