"""What `koajax.predict` and `koajax.serve` grade: inputs found and named.

    sources, skipped = find_inputs(['films/', 'manifest.csv', 'knee.png'])

A source is a DICOM radiograph, the rows of a manifest that share a file
(their knees' ids and, given a landmarks file, landmarks), or a
pre-cropped knee PNG. A folder gives its DICOM files (`DICOM_SUFFIXES`) and
PNGs, searched recursively in name order. A knee without a manifest row is
named by its file as shown and its side (`knee_name`); nothing from a DICOM
header names it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from koajax.data import manifest as manifest_lib
from koajax.data import png_folders
from koajax.data import schema

log = logging.getLogger(__name__)

DICOM_SUFFIXES = ('.dcm', '.dicom', '')  # what a folder's files may end in
PNG_SUFFIXES = ('.png',)
MIN_PNG_PX = 64  # a knee ROI smaller than this holds no grade

@dataclasses.dataclass(frozen=True)
class Skipped:
  """An input, or one knee of it, that was not graded, and why."""
  input: str
  reason: str
  kind: str = 'unreadable'
  knee: str = ''

  def as_dict(self) -> dict[str, str]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Source:
  """One input file and what is known about it beforehand.

  Attributes:
    path: the file.
    shown: how outputs name it (the path as given, or an upload's name).
    kind: 'dicom' or 'png'.
    knees: {side: knee id} from a manifest; empty to take the film's own
      knees (both of a bilateral film, else its laterality's).
    landmarks: {side: (16, 2) film pixels} from a landmarks file.
  """
  path: Path
  shown: str
  kind: str
  knees: dict[str, str] = dataclasses.field(default_factory=dict)
  landmarks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def knee_name(shown: str, side: str) -> str:
  """A knee's id from its file's name as shown: 'films/a.dcm' -> 'films/a_R'
  (the suffix dropped, so the PNG of a knee keeps its DICOM's id)."""
  path = Path(shown)
  stem = path.name[:-len(path.suffix)] if path.suffix else path.name
  return str(path.with_name(f'{stem}_{side}'))


def find_inputs(paths: Sequence[str | Path], *, landmarks: str | None = None
                ) -> tuple[list[Source], list[Skipped]]:
  """The sources named by `paths` (files, folders, manifests) in order.

  A folder gives its DICOM files (`DICOM_SUFFIXES`) and PNGs, searched
  recursively in name order; a .csv file is a manifest (`koajax.data.
  manifest`), its rows grouped by file. `landmarks` (a landmarks CSV, keyed
  by subject, visit and side) gives the knees of manifest rows their
  landmarks.
  """
  marks = (manifest_lib.read_landmarks(landmarks) if landmarks else {})
  sources: list[Source] = []
  skipped: list[Skipped] = []
  for given in paths:
    path = Path(given).expanduser()
    if path.is_dir():
      found = sorted(p for p in path.rglob('*') if p.is_file() and
                     not p.name.startswith('.') and
                     p.suffix.lower() in DICOM_SUFFIXES + PNG_SUFFIXES)
      if not found:
        skipped.append(Skipped(str(given), 'the folder holds no DICOM (.dcm, '
                               'no suffix) or PNG files', 'empty_folder'))
      sources += [_file_source(p, str(p)) for p in found]
    elif path.suffix.lower() == '.csv':
      more, bad = _manifest_sources(path, marks)
      sources += more
      skipped += bad
    elif not path.exists():
      skipped.append(Skipped(str(given), 'no such file or folder',
                             'missing_file'))
    else:
      sources.append(_file_source(path, str(given)))
  if landmarks and not any(s.landmarks for s in sources):
    log.warning('--landmarks=%s gives no knee of the inputs its landmarks '
                '(they are keyed by manifest subject, visit and side: give '
                'the films as a manifest)', landmarks)
  return sources, skipped


def _file_source(path: Path, shown: str) -> Source:
  kind = 'png' if path.suffix.lower() in PNG_SUFFIXES else 'dicom'
  return Source(path=path, shown=shown, kind=kind)


def _manifest_sources(path: Path, marks: dict
                      ) -> tuple[list[Source], list[Skipped]]:
  frame = manifest_lib.read_manifest(path)
  sources, skipped = [], []
  for file, rows in frame.groupby('path', sort=False):
    knees, landmarks = {}, {}
    for row in rows.itertuples():
      where = f'{path} row {row.row}'
      if row.problem:
        skipped.append(Skipped(where, row.problem, 'bad_row'))
        continue
      knee = schema.knee_id(row.subject_id, row.visit, row.side)
      knees[row.side] = knee
      key = (row.subject_id, row.visit, row.side)
      if key in marks:
        landmarks[row.side] = marks[key]
    if knees:
      shown = rows['path_in_manifest'].iloc[0]
      kind = ('png' if Path(file).suffix.lower() in PNG_SUFFIXES
              else 'dicom')
      sources.append(Source(Path(file), shown, kind, knees, landmarks))
  return sources, skipped


def read_knee_png(path: str | Path, roi_px: int, *, flip: bool) -> np.ndarray:
  """A knee ROI PNG as the cache holds it, or ValueError saying why not:
  it must be square, at least MIN_PNG_PX px, and greyscale of 8 or 16 bits
  (an RGB image whose three channels are equal counts as grey)."""
  try:
    with Image.open(path) as img:
      img.load()
      mode, size = img.mode, img.size
      grey = None
      if mode in ('RGB', 'RGBA'):
        rgb = np.asarray(img.convert('RGB'))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and
                np.array_equal(rgb[..., 0], rgb[..., 2])):
          raise ValueError('a colour PNG; give the greyscale knee ROI')
        grey = rgb[..., 0]
  except OSError as e:
    raise ValueError(f'not a readable PNG ({type(e).__name__})') from None
  if mode not in ('L', 'I', 'I;16', 'I;16B', 'I;16L', 'RGB', 'RGBA', 'LA'):
    raise ValueError(f'a PNG of mode {mode} (1-bit, palette or float); give '
                     'an 8- or 16-bit greyscale knee ROI')
  width, height = size
  if width != height:
    raise ValueError(f'a {width}x{height} PNG; a knee ROI PNG is square '
                     '(the knee centred, as koajax caches cut it)')
  if width < MIN_PNG_PX:
    raise ValueError(f'a {width}x{height} PNG is too small for a knee ROI '
                     f'(at least {MIN_PNG_PX} px)')
  if grey is not None:
    roi = grey if width == roi_px else np.asarray(
        Image.fromarray(grey).resize((roi_px, roi_px),
                                     Image.Resampling.BICUBIC))
    return roi[:, ::-1].copy() if flip else roi
  return png_folders.load_png(path, roi_px, flip=flip)
