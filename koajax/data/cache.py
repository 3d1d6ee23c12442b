"""The preprocessed knee cache: one ArrayRecord file plus a CSV index.

A cache directory holds

  knees.array_record  one record per knee (msgpack: ROI image, keypoints, grades)
  index.csv           one row per record, in record order: ids, site, grades
                      and kl_reader_<name> per further reader (KL grade, -1
                      when not graded; only in the index, not the records),
                      and, in a cache built with a localiser,
                      landmarks_from: 'file' or 'localizer' per knee
  summary.json        what the build made and every input it skipped, and why
  meta.json           written last; a directory without it is not a cache

A cache is written in a sibling folder `DIR.partial-<pid>` that replaces DIR
in one rename when it is complete (`atomic`), so a build that fails or is
killed at any point leaves whatever was in DIR exactly as it was, and the
next build removes the partial folders of processes that have stopped. DIR
must be new, empty, or hold a koajax cache (or the summary of a failed
build): a folder with anything else in it is refused before anything is
written (`check_output_dir`).

Reader columns are optional: a cache without them, as older koajax wrote,
opens as before, and `set_reader_columns` brings its index up to date with
a manifest that gained them without rebuilding the records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pandas as pd

from koajax import cli
from koajax.data import atomic
from koajax.data import schema

FORMAT_VERSION = 1
RECORDS = 'knees.array_record'
INDEX = 'index.csv'
SUMMARY = 'summary.json'
META = 'meta.json'
LANDMARKS_FROM = 'landmarks_from'  # index column: 'file' or 'localizer'


@dataclasses.dataclass
class Knee:
  """One preprocessed knee, as stored in the cache."""
  subject_id: str
  visit: int
  side: str  # 'R' or 'L'; left knees are stored flipped to look like right
  site: str
  image: np.ndarray  # (roi_px, roi_px) uint8
  keypoints: np.ndarray  # (16, 2) float32 (x, y) in ROI pixels; NaN if unknown
  grades: np.ndarray  # (7,) int8 in schema.GRADES order; -1 = not graded
  # kl_reader_<name> -> KL grade of a further reader, -1 = not graded.
  readers: dict[str, int] = dataclasses.field(default_factory=dict)
  # 'file' or 'localizer' in a build that localises knees, else ''.
  landmarks_from: str = ''

  @property
  def knee_id(self) -> str:
    return schema.knee_id(self.subject_id, self.visit, self.side)


def _pack_array(a: np.ndarray) -> dict[str, Any]:
  return {'dtype': a.dtype.str, 'shape': list(a.shape), 'data': a.tobytes()}


def _unpack_array(d: dict[str, Any]) -> np.ndarray:
  return np.frombuffer(d['data'], dtype=d['dtype']).reshape(d['shape'])


def encode(knee: Knee, index: int) -> bytes:
  """Serialises a knee; `index` is its row in index.csv."""
  return msgpack.packb({
      'index': index,
      'image': _pack_array(np.ascontiguousarray(knee.image, np.uint8)),
      'keypoints': _pack_array(np.asarray(knee.keypoints, np.float32)),
      'grades': _pack_array(np.asarray(knee.grades, np.int8)),
  })


def decode(record: bytes) -> dict[str, Any]:
  """Inverse of `encode`: {'index', 'image', 'keypoints', 'grades'}."""
  d = msgpack.unpackb(record)
  return {
      'index': np.int32(d['index']),
      'image': _unpack_array(d['image']),
      'keypoints': _unpack_array(d['keypoints']),
      'grades': _unpack_array(d['grades']),
  }


def _json_dict(path: Path) -> dict[str, Any] | None:
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None


def is_cache_summary(path: str | os.PathLike) -> bool:
  """Whether `path` is a summary.json that a koajax build wrote."""
  data = _json_dict(Path(path))
  return data is not None and 'knees_built' in data


# Leftovers of older koajax versions, which wrote into the cache folder.
_OLD_TEMPORARY = re.compile(
    rf'^\.({"|".join(map(re.escape, (RECORDS, INDEX, SUMMARY, META)))})'
    r'\.tmp-\d+$')


def check_output_dir(out_dir: str | os.PathLike, what: str = 'a cache'
                     ) -> str:
  """Whether a cache may be written at `out_dir`, and what is there.

  Returns:
    'new' (nothing there, or an empty folder), 'cache' (a koajax cache) or
    'failed' (the summary of a build that made no cache).

  Raises:
    cli.BadInput: `out_dir` is a file, or a folder holding anything else
      (the message names what); nothing has been written.
  """
  d = Path(out_dir)
  if not (d.exists() or d.is_symlink()):
    return 'new'
  if not d.is_dir():
    raise cli.BadInput(f'{d} is a file, not a folder; give a new or empty '
                       f'folder for {what}')
  names = sorted(p.name for p in d.iterdir())
  if not names:
    return 'new'
  known = {RECORDS, INDEX, SUMMARY, META}
  foreign = [n for n in names if n not in known and not
             _OLD_TEMPORARY.match(n)]
  meta = _json_dict(d / META) if META in names else None
  if META in names and (meta is None or 'format_version' not in meta):
    foreign.append(META)
  elif META not in names and not is_cache_summary(d / SUMMARY):
    # Without a koajax meta.json or summary.json, nothing says the cache
    # files are koajax's own.
    foreign = names
  if foreign:
    shown = ', '.join(sorted(set(foreign))[:6]) + (
        f' and {len(set(foreign)) - 6} more' if len(set(foreign)) > 6 else '')
    raise cli.BadInput(
        f'{d} holds files that are not a koajax cache ({shown}); koajax '
        f'replaces only its own caches: give a new or empty folder for '
        f'{what}')
  return 'cache' if meta is not None else 'failed'


def _write_json(path: Path, data: dict[str, Any]) -> None:
  path.write_text(json.dumps(data, indent=2) + '\n', encoding='utf-8')


class CacheWriter:
  """Writes knees to a cache directory; nothing is a cache until `close`.

  The knees go to a partial folder beside `out_dir` that replaces it in one
  step at `close`; until then `out_dir` keeps what it held. A folder holding
  anything but a koajax cache is refused (`check_output_dir`).

  Usage:
    with CacheWriter(out_dir, roi_mm=140, roi_px=400) as w:
      w.add(knee)
    # or w.close(summary=...) to record skipped inputs.
  """

  def __init__(self, out_dir: str | os.PathLike, *, roi_mm: float,
               roi_px: int, extra_meta: dict[str, Any] | None = None):
    from array_record.python import array_record_module
    self.dir = Path(out_dir)
    self._target = atomic.real_target(self.dir)
    atomic.clean_stale(self._target)
    check_output_dir(self.dir)
    self._rows: list[dict[str, Any]] = []
    self._readers: dict[str, None] = {}  # reader columns in order of arrival
    self._meta = {'roi_mm': float(roi_mm), 'roi_px': int(roi_px),
                  **(extra_meta or {})}
    self._ids: set[str] = set()
    self._landmarks_from = False  # a knee said where its landmarks are from
    self._closed = False
    try:
      self._work = atomic.new_partial(self._target)
      # One record per chunk for random access, and uncompressed: zstd (the
      # default) saves a quarter of the disk but its decompression was most
      # of a record's read and made one reading process 1.7x slower
      # (benchmarks/README.md, "Input pipeline").
      self._writer = array_record_module.ArrayRecordWriter(
          str(self._work / RECORDS), 'group_size:1,uncompressed')
    except BaseException:  # Ctrl-C included: no partial folder stays
      atomic.discard_own(self._target)
      raise

  def add(self, knee: Knee) -> None:
    if knee.knee_id in self._ids:
      raise ValueError(f'knee {knee.knee_id} was added twice')
    size = self._meta['roi_px']
    if knee.image.shape != (size, size):
      raise ValueError(f'knee {knee.knee_id}: image shape {knee.image.shape}, '
                       f'expected ({size}, {size})')
    self._ids.add(knee.knee_id)
    self._writer.write(encode(knee, len(self._rows)))
    row = {'knee_id': knee.knee_id, 'subject_id': knee.subject_id,
           'visit': int(knee.visit), 'side': knee.side, 'site': knee.site}
    row.update({g: int(v) for g, v in zip(schema.GRADES, knee.grades)})
    row.update({c: int(v) for c, v in knee.readers.items()})
    if knee.landmarks_from:
      row[LANDMARKS_FROM] = knee.landmarks_from
      self._landmarks_from = True
    self._readers.update(dict.fromkeys(knee.readers))
    self._rows.append(row)

  def __len__(self) -> int:
    return len(self._rows)

  def close(self, summary: dict[str, Any] | None = None) -> None:
    """Finalises the cache and puts it in place of what was at `dir`."""
    if self._closed:
      return
    self._closed = True
    try:
      self._writer.close()
      columns = ['knee_id', 'subject_id', 'visit', 'side', 'site',
                 *schema.GRADES, *self._readers,
                 *([LANDMARKS_FROM] if self._landmarks_from else [])]
      index = pd.DataFrame(self._rows, columns=columns)
      for column in self._readers:
        # A knee without the column was not graded by that reader.
        index[column] = index[column].fillna(schema.UNGRADED).astype(int)
      (self._work / INDEX).write_text(index.to_csv(index=False),
                                      encoding='utf-8')
      summary = dict(summary or {})
      summary.setdefault('knees_built', len(self._rows))
      _write_json(self._work / SUMMARY, summary)
      meta = {'format_version': FORMAT_VERSION, 'num_knees': len(self._rows),
              'num_landmarks': schema.NUM_LANDMARKS, 'grades': schema.GRADES,
              **self._meta}
      _write_json(self._work / META, meta)
      atomic.publish(self._work, self._target)
    except BaseException:
      atomic.discard(self._work)
      raise

  def abort(self) -> None:
    """Drops what was written; `dir` keeps what it held."""
    if not self._closed:
      self._closed = True
      try:
        self._writer.close()
      finally:
        atomic.discard(self._work)
        atomic.discard_own(self._target)

  def fail(self, summary: dict[str, Any]) -> Path:
    """Drops the knees and records `summary` of a build that made no cache.

    The summary goes to `dir`/summary.json when `dir` held no cache;
    a complete cache at `dir` is left as it was, and the summary goes to a
    file in the temporary folder instead.

    Returns:
      Where the summary was written.
    """
    self.abort()
    data = json.dumps(summary, indent=2) + '\n'
    if check_output_dir(self.dir) != 'cache':
      work = atomic.new_partial(self._target)
      try:
        (work / SUMMARY).write_text(data, encoding='utf-8')
        atomic.publish(work, self._target)
      except BaseException:
        atomic.discard(work)
        raise
      return self.dir / SUMMARY
    folder = Path(tempfile.gettempdir()) / 'koajax-errors'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f'build-summary-{time.strftime("%Y%m%d-%H%M%S")}-'
                     f'{os.getpid()}.json')
    path.write_text(data, encoding='utf-8')
    return path

  def __enter__(self) -> CacheWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


class IncompleteCacheError(FileNotFoundError):
  pass


@dataclasses.dataclass
class Cache:
  """A complete cache: random access to knees plus the index table."""
  dir: Path
  meta: dict[str, Any]
  index: pd.DataFrame  # row i describes record i
  _source: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __len__(self) -> int:
    return len(self.index)

  @property
  def records_path(self) -> str:
    return str(self.dir / RECORDS)

  def source(self):
    """A Grain random-access source of raw records (decode with `decode`)."""
    import grain
    return grain.sources.ArrayRecordDataSource(self.records_path)

  def __getitem__(self, i: int) -> dict[str, Any]:
    if self._source is None:
      self._source = self.source()
    return decode(self._source[int(i)])


def summary(cache_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The summary.json of a cache folder, or None if it has none."""
  return _json_dict(Path(cache_dir) / SUMMARY)


def is_complete(cache_dir: str | os.PathLike) -> bool:
  return (Path(cache_dir) / META).is_file()


def open_cache(cache_dir: str | os.PathLike) -> Cache:
  """Opens a complete cache or says why it cannot."""
  d = Path(cache_dir)
  if not is_complete(d):
    raise IncompleteCacheError(
        f'{d} is not a complete koajax cache (no {META}); build it with '
        f'`python -m koajax.data.build --manifest=... --out={d}`')
  meta = json.loads((d / META).read_text())
  if meta.get('format_version') != FORMAT_VERSION:
    raise IncompleteCacheError(
        f'{d} has cache format {meta.get("format_version")}, this koajax '
        f'reads {FORMAT_VERSION}; rebuild it')
  # Ids and sites are text even when they look numeric or are empty.
  text = {'knee_id': str, 'subject_id': str, 'side': str, 'site': str}
  index = pd.read_csv(d / INDEX, dtype=text, keep_default_na=False)
  if len(index) != meta['num_knees']:
    raise IncompleteCacheError(
        f'{d / INDEX} has {len(index)} rows, meta says {meta["num_knees"]}')
  return Cache(dir=d, meta=meta, index=index)


def set_reader_columns(cache_dir: str | os.PathLike,
                       readers: pd.DataFrame) -> bool:
  """Makes the reader columns of a cache's index those of `readers`.

  For a manifest whose reader columns were added or changed after the cache
  was built: only index.csv changes, replaced in one step
  (`atomic.write_text`), and only when it differs.

  Args:
    cache_dir: a complete cache.
    readers: knee_id and the kl_reader_<name> columns (ints, -1 for not
      graded), e.g. `manifest.read_readers`; knees it lacks get -1.

  Returns:
    Whether index.csv was rewritten.
  """
  path = Path(cache_dir) / INDEX
  # All text, so the columns that stay are written back as they were.
  index = pd.read_csv(path, dtype=str, keep_default_na=False)
  old = schema.reader_columns(index.columns)
  new = schema.reader_columns(readers.columns)
  by_knee = readers.set_index('knee_id')
  updated = index.drop(columns=old)
  for column in new:
    updated[column] = by_knee[column].reindex(updated['knee_id']).fillna(
        schema.UNGRADED).astype(int).astype(str).to_numpy()
  if updated.equals(index):
    return False
  atomic.write_text(path, updated.to_csv(index=False))
  return True
