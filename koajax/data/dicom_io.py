"""Reads radiograph pixels and pixel spacing from DICOM files, safely.

`read_radiograph` returns what preprocessing needs and nothing else:

  image    float32 (rows, cols), modality LUT (RescaleSlope/RescaleIntercept or
           a Modality LUT Sequence) applied, MONOCHROME1 inverted, so bone is
           always brighter than soft tissue
  spacing  (row, col) millimetres per pixel

`read_film` also gives the film's laterality (which knee a single-knee film
shows). Only the image-pixel, spacing and laterality elements are ever
parsed (`specific_tags`),
so names, ids and dates in the header are never loaded, and no error message
can quote them. Every failure raises `InputError` whose `reason` says what is
wrong in words a user can act on, and whose `kind` is a short category for
counting.

Modality: projection radiographs (CR, DX, RG, and DR as some vendors write
it) are read; OT (digitised film, secondary capture) and files without a
Modality are read too, since older archives label scanned films that way.
Any other modality (MR, CT, US, NM, MG, ...) is refused with its name.

Compressed pixel data (JPEG baseline, extended and lossless, JPEG-LS, JPEG
2000, RLE) is decoded by pydicom's pixel-data plugins: GDCM (python-gdcm)
for the JPEG family and JPEG 2000, pydicom itself for RLE. GDCM is one
BSD-licensed wheel that covers every syntax hospitals use; pylibjpeg would
need pylibjpeg-libjpeg (GPL-3.0) for lossless JPEG and JPEG-LS. What GDCM
cannot decode through pydicom (12-bit JPEG Extended) is refused with a hint
to install pylibjpeg's plugins, which pydicom then uses by itself.

Spacing: ImagerPixelSpacing (spacing at the detector) is preferred, and
PixelSpacing is the fallback. OAI and MOST carry ImagerPixelSpacing, and the
published 140 mm ROI was measured in it; PixelSpacing, when a site calibrates
it to the patient plane, differs from it by the geometric magnification
(~10% for a knee), which would change the ROI scale between sites.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom import errors as pydicom_errors
import pydicom.uid
from pydicom import pixels as pydicom_pixels

# Everything needed to decode one monochrome image and measure it. Reading
# only these keeps patient-identifying elements out of memory altogether.
_TAGS = (
    'Rows', 'Columns', 'BitsAllocated', 'BitsStored', 'HighBit',
    'PixelRepresentation', 'SamplesPerPixel', 'PhotometricInterpretation',
    'PlanarConfiguration', 'NumberOfFrames', 'RescaleSlope',
    'RescaleIntercept', 'RescaleType', 'ModalityLUTSequence',
    'ImagerPixelSpacing', 'PixelSpacing', 'ExtendedOffsetTable',
    'ExtendedOffsetTableLengths', 'Modality', 'PixelData',
    # Which knee a single-knee film shows (`read_film`); not identifying.
    'ImageLaterality', 'Laterality',
)
# Projection radiography (DICOM CID 29, and DR as some vendors write it),
# plus OT for digitised films; a file without Modality is read too.
RADIOGRAPH_MODALITIES = ('CR', 'DX', 'RG', 'DR', 'OT')
# Spacing elements in order of preference (see the module docstring).
SPACING_TAGS = ('ImagerPixelSpacing', 'PixelSpacing')
# Anything outside this is a unit or encoding error, not a radiograph.
_SPACING_RANGE_MM = (1e-3, 10.0)

_DECOMPRESS_HINT = (
    'decompress it first (e.g. `gdcmconv --raw IN OUT` or '
    '`dcmdjpeg`/`dcmdjp2k` from DCMTK), or install pylibjpeg\'s plugins '
    '(`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`), which '
    'also decode what GDCM does not (12-bit JPEG Extended)')


class InputError(Exception):
  """An input file that cannot be used, and why.

  Attributes:
    path: the file.
    reason: what is wrong, for people.
    kind: a short category ('missing_file', 'not_dicom', ...) for counting.
  """

  def __init__(self, path: str | os.PathLike, reason: str,
               kind: str = 'unreadable'):
    super().__init__(f'{path}: {reason}')
    self.path = str(path)
    self.reason = reason
    self.kind = kind

  def __reduce__(self):
    # Keeps the exception picklable across worker processes.
    return type(self), (self.path, self.reason, self.kind)


def read_radiograph(
    path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float]]:
  """Reads a monochrome radiograph: `read_film` without the laterality."""
  image, spacing, _ = read_film(path)
  return image, spacing


def read_film(path: str | os.PathLike
              ) -> tuple[np.ndarray, tuple[float, float], str]:
  """Reads a monochrome radiograph and the side it shows.

  Args:
    path: a DICOM file (Part 10, or a bare dataset without the preamble).

  Returns:
    (image, spacing, laterality): float32 (rows, cols) image with bone
    bright, the (row, col) pixel spacing in millimetres, and the film's
    ImageLaterality (else Laterality): 'R', 'L', 'B' (both) or '' (not
    given, or 'U').

  Raises:
    InputError: the file is missing, not DICOM, truncated, has no or
      undecodable pixel data, or lacks a valid pixel spacing.
  """
  path = Path(path)
  with _quiet():
    ds = _read_header(path)
    if 'PixelData' not in ds:
      raise InputError(
          path, 'no pixel data (the file is truncated or is not an image)',
          'no_pixel_data')
    _check_modality(ds, path)
    spacing = _spacing(ds, path)
    image = _pixels(ds, path)
  return image, spacing, _laterality(ds)


def _laterality(ds: pydicom.Dataset) -> str:
  for keyword in ('ImageLaterality', 'Laterality'):
    value = str(ds.get(keyword) or '').strip().upper()
    if value in ('R', 'L', 'B'):
      return value
  return ''


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Silences pydicom's warnings and log messages about the file.

  They can quote element values, and files from the field trigger many; our
  own reasons say what matters.
  """
  logger = logging.getLogger('pydicom')
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      yield
  finally:
    logger.setLevel(level)


def _read_header(path: Path) -> pydicom.Dataset:
  if not path.is_file():
    raise InputError(path, 'file not found' if not path.exists()
                     else 'not a regular file', 'missing_file')
  try:
    ds = _dcmread(path, force=False)
  except pydicom_errors.InvalidDicomError:
    ds = _read_bare(path)
  if 'PixelData' in ds and 'TransferSyntaxUID' not in ds.file_meta:
    # No file meta: the pixels are native, in the encoding the header used.
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit else
        pydicom.uid.ExplicitVRLittleEndian if little else
        pydicom.uid.ExplicitVRBigEndian)
  return ds


def _read_bare(path: Path) -> pydicom.Dataset:
  # Older archives hold bare datasets without the Part 10 preamble; they are
  # accepted if they read as an image, anything else is not DICOM.
  try:
    ds = _dcmread(path, force=True)
  except Exception:  # pylint: disable=broad-except
    ds = None
  if ds is None or 'Rows' not in ds or 'PixelData' not in ds:
    raise InputError(path, 'not a DICOM file (no DICM preamble, and not '
                     'readable as a bare DICOM image)', 'not_dicom')
  return ds


def _dcmread(path: Path, force: bool) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path, specific_tags=list(_TAGS), force=force)
  except pydicom_errors.InvalidDicomError:
    raise
  except (EOFError, OSError, ValueError, KeyError, TypeError,
          NotImplementedError) as e:
    raise InputError(
        path, f'corrupt or truncated DICOM header ({type(e).__name__})',
        'truncated') from None


def _check_modality(ds: pydicom.Dataset, path: Path) -> None:
  modality = str(ds.get('Modality') or '').strip().upper()
  if modality and modality not in RADIOGRAPH_MODALITIES:
    raise InputError(
        path, f'modality {modality[:16]} is not a projection radiograph '
        f'(expected one of {", ".join(RADIOGRAPH_MODALITIES)})',
        'not_radiograph')


def _spacing(ds: pydicom.Dataset, path: Path) -> tuple[float, float]:
  """(row, col) spacing in mm from the first spacing element present."""
  present = [t for t in SPACING_TAGS if t in ds]
  if not present:
    raise InputError(
        path, 'no pixel spacing: neither ImagerPixelSpacing nor PixelSpacing '
        'is set, so the ROI size in mm cannot be measured', 'no_spacing')
  tag = present[0]
  try:
    values = [float(v) for v in ds[tag].value]
  except (TypeError, ValueError):
    values = []
  lo, hi = _SPACING_RANGE_MM
  if len(values) != 2 or not all(
      math.isfinite(v) and lo <= v <= hi for v in values):
    shown = ', '.join(f'{v:g}' for v in values) if values else 'unparsable'
    raise InputError(
        path, f'invalid {tag} ({shown}): expected two values in '
        f'{lo:g}..{hi:g} mm', 'bad_spacing')
  return values[0], values[1]


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
  """Decoded, modality-LUT-applied, bone-bright float32 pixels."""
  photometric = str(ds.get('PhotometricInterpretation', '')).strip()
  if photometric not in ('MONOCHROME1', 'MONOCHROME2'):
    raise InputError(
        path, f'photometric interpretation {photometric or "(missing)"} is '
        'not a greyscale radiograph (MONOCHROME1 or MONOCHROME2)',
        'unsupported_image')
  frames = _header_int(ds, 'NumberOfFrames', path)
  if frames != 1:
    raise InputError(path, f'{frames} frames; expected a single image',
                     'unsupported_image')
  syntax = ds.file_meta.get('TransferSyntaxUID')
  if syntax is not None and syntax.is_compressed:
    if not pydicom_pixels.get_decoder(syntax).is_available:
      raise InputError(
          path, f'compressed transfer syntax {syntax.name} ({syntax}) has no '
          f'decoder installed: {_DECOMPRESS_HINT}', 'unsupported_syntax')
  elif _native_bytes_short(ds):
    raise InputError(path, 'truncated file: pixel data is shorter than '
                     'Rows x Columns says', 'truncated')
  try:
    raw = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except
    # Decoder plugins raise assorted types; for a compressed syntax the fix is
    # the same whatever they raised.
    if syntax is not None and syntax.is_compressed:
      raise InputError(
          path, f'cannot decode {syntax.name} ({syntax}) pixel data with the '
          f'installed decoders ({type(e).__name__}); the file may be '
          f'corrupt, otherwise {_DECOMPRESS_HINT}',
          'unsupported_syntax') from None
    # Only pixel-module elements were read, so the message holds no
    # identifying values.
    message = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
    raise InputError(path, f'cannot decode pixel data ({message})',
                     'bad_pixel_data') from None
  if raw.ndim != 2:
    raise InputError(path, f'pixel array has shape {raw.shape}; expected a '
                     'single greyscale image', 'unsupported_image')
  image = np.asarray(pydicom_pixels.apply_modality_lut(raw, ds), np.float32)
  if photometric == 'MONOCHROME1':
    # Reflect within the image's own range so the values stay comparable to
    # the file's; the preprocessing that follows is invariant to the offset.
    image = (image.max() + image.min()) - image
  return image


def _header_int(ds: pydicom.Dataset, keyword: str, path: Path,
                default: int = 1) -> int:
  """An integer element, `default` when absent or empty."""
  try:
    value = ds.get(keyword)
    return default if value in (None, '') else int(value)
  except (TypeError, ValueError):
    raise InputError(path, f'{keyword} is not a whole number',
                     'unsupported_image') from None


def _native_bytes_short(ds: pydicom.Dataset) -> bool:
  """Whether uncompressed pixel data holds fewer bytes than its size says."""
  try:
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) *
                int(ds.get('NumberOfFrames') or 1) * int(ds.BitsAllocated))
  except (AttributeError, TypeError, ValueError):
    return False  # let the decoder say what is missing
  return len(ds.PixelData) * 8 < expected
