"""The preprocessed knee cache: one ArrayRecord file plus a CSV index.

A cache directory holds

  knees.array_record  one record per knee (msgpack: ROI image, keypoints, grades)
  index.csv           one row per record, in record order: ids, site, grades
  summary.json        what the build made and every input it skipped, and why
  meta.json           written last; a directory without it is not a cache

Writes go to temporary names that are renamed into place, and meta.json is
renamed last, so a build killed at any point never leaves a directory that
`open_cache` accepts, and never damages a complete cache that was there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pandas as pd

from koajax.data import schema

FORMAT_VERSION = 1
RECORDS = 'knees.array_record'
INDEX = 'index.csv'
SUMMARY = 'summary.json'
META = 'meta.json'


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


def _atomic_write_text(path: Path, text: str) -> None:
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  tmp.write_text(text)
  os.replace(tmp, path)


class CacheWriter:
  """Writes knees to a cache directory; nothing is a cache until `close`.

  Usage:
    with CacheWriter(out_dir, roi_mm=140, roi_px=400) as w:
      w.add(knee)
    # or w.close(summary=...) to record skipped inputs.
  """

  def __init__(self, out_dir: str | os.PathLike, *, roi_mm: float,
               roi_px: int, extra_meta: dict[str, Any] | None = None):
    from array_record.python import array_record_module
    self.dir = Path(out_dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    # An older cache here stops being valid the moment we start replacing it.
    (self.dir / META).unlink(missing_ok=True)
    self._tmp_records = self.dir / f'.{RECORDS}.tmp-{os.getpid()}'
    self._writer = array_record_module.ArrayRecordWriter(
        str(self._tmp_records), 'group_size:1')
    self._rows: list[dict[str, Any]] = []
    self._meta = {'roi_mm': float(roi_mm), 'roi_px': int(roi_px),
                  **(extra_meta or {})}
    self._ids: set[str] = set()
    self._closed = False

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
    self._rows.append(row)

  def __len__(self) -> int:
    return len(self._rows)

  def close(self, summary: dict[str, Any] | None = None) -> None:
    """Finalises the cache; meta.json appears last."""
    if self._closed:
      return
    self._closed = True
    self._writer.close()
    os.replace(self._tmp_records, self.dir / RECORDS)
    columns = ['knee_id', 'subject_id', 'visit', 'side', 'site', *schema.GRADES]
    index = pd.DataFrame(self._rows, columns=columns)
    _atomic_write_text(self.dir / INDEX, index.to_csv(index=False))
    summary = dict(summary or {})
    summary.setdefault('knees_built', len(self._rows))
    _atomic_write_text(self.dir / SUMMARY, json.dumps(summary, indent=2) + '\n')
    meta = {'format_version': FORMAT_VERSION, 'num_knees': len(self._rows),
            'num_landmarks': schema.NUM_LANDMARKS, 'grades': schema.GRADES,
            **self._meta}
    _atomic_write_text(self.dir / META, json.dumps(meta, indent=2) + '\n')

  def abort(self) -> None:
    """Drops what was written; the directory holds no cache afterwards."""
    if not self._closed:
      self._closed = True
      self._writer.close()
      self._tmp_records.unlink(missing_ok=True)

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
