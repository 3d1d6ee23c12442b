"""Compressed DICOMs as hospitals store them, and the files koajax refuses.

Two independent sources of compressed files: GDCM's own encoder applied to
a phantom radiograph (every transfer syntax koajax decodes), and the real
CR, MR, NM, US and colour files of pydicom-data, whose lossless files have
uncompressed twins. A lossless file must decode to exactly its twin's
pixels; a lossy one to nearly them.
"""

from __future__ import annotations

from pathlib import Path
import shutil

import gdcm
import numpy as np
import pydicom
import pydicom.uid
import pytest

from koajax.data import build
from koajax.data import cache as cache_lib
from koajax.data import dicom_io

import test_build as build_helpers
import test_preprocess as phantom

pydicom_data = pytest.importorskip('data_store')  # the pydicom-data package
DATA = Path(pydicom_data.__file__).parent / 'data'

LOSSLESS = {
    'JPEGLosslessProcess14_1': pydicom.uid.JPEGLosslessSV1,
    'JPEGLosslessProcess14': pydicom.uid.JPEGLossless,
    'JPEGLSLossless': pydicom.uid.JPEGLSLossless,
    'JPEG2000Lossless': pydicom.uid.JPEG2000Lossless,
    'RLELossless': pydicom.uid.RLELossless,
}


def transcode(src: Path, dst: Path, syntax: str) -> Path:
  """`src` re-encoded by GDCM in the named gdcm.TransferSyntax."""
  reader = gdcm.ImageReader()
  reader.SetFileName(str(src))
  assert reader.Read(), src
  change = gdcm.ImageChangeTransferSyntax()
  change.SetTransferSyntax(gdcm.TransferSyntax(
      getattr(gdcm.TransferSyntax, syntax)))
  change.SetInput(reader.GetImage())
  assert change.Change(), syntax
  writer = gdcm.ImageWriter()
  writer.SetFileName(str(dst))
  writer.SetFile(reader.GetFile())
  writer.SetImage(change.GetOutput())
  assert writer.Write(), dst
  return dst


def film(path: Path, bits: int = 16) -> Path:
  """A bilateral phantom radiograph stored with `bits` bits per pixel."""
  image, _ = phantom.render_film((160, 280), (1.0, 1.0),
                                 [((70, 80), 4.0, 'R'), ((210, 80), -3.0, 'L')])
  if bits < 16:  # JPEG baseline and extended hold 8 and 12 bits
    image = (image.astype(np.float64) * (2**bits - 1) / image.max()).round()
  path = phantom.write_dicom(path, image.astype(np.uint16))
  if bits < 16:
    ds = pydicom.dcmread(path)
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = (image.astype(np.uint8) if bits == 8
                    else image.astype(np.uint16)).tobytes()
    ds.save_as(path, enforce_file_format=True)
  return path


def syntax_of(path: Path) -> pydicom.uid.UID:
  return pydicom.dcmread(path, stop_before_pixels=True
                         ).file_meta.TransferSyntaxUID


@pytest.mark.parametrize('syntax', sorted(LOSSLESS))
def test_lossless_syntaxes_decode_to_the_native_pixels(tmp_path, syntax):
  native = film(tmp_path / 'native.dcm')
  packed = transcode(native, tmp_path / 'packed.dcm', syntax)
  assert syntax_of(packed) == LOSSLESS[syntax]
  assert packed.stat().st_size < native.stat().st_size or syntax == 'RLELossless'
  want, want_spacing = dicom_io.read_radiograph(native)
  got, spacing = dicom_io.read_radiograph(packed)
  np.testing.assert_array_equal(got, want)
  assert spacing == want_spacing


@pytest.mark.parametrize('syntax,bits,uid', [
    ('JPEGBaselineProcess1', 8, pydicom.uid.JPEGBaseline8Bit),
    ('JPEGExtendedProcess2_4', 8, pydicom.uid.JPEGExtended12Bit),
    ('JPEGLSNearLossless', 16, pydicom.uid.JPEGLSNearLossless),
])
def test_lossy_syntaxes_decode_close_to_the_native_pixels(tmp_path, syntax,
                                                          bits, uid):
  native = film(tmp_path / 'native.dcm', bits)
  packed = transcode(native, tmp_path / 'packed.dcm', syntax)
  assert syntax_of(packed) == uid
  want, _ = dicom_io.read_radiograph(native)
  got, _ = dicom_io.read_radiograph(packed)
  assert got.shape == want.shape
  # Within 2 % of the range on average, and the knees where they were.
  assert np.abs(got - want).mean() < 0.02 * (want.max() - want.min())
  assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_twelve_bit_jpeg_extended_says_what_to_install(tmp_path):
  # GDCM decodes 8-bit JPEG Extended but, through pydicom, not 12-bit.
  packed = transcode(film(tmp_path / 'native.dcm', 12), tmp_path / 'p.dcm',
                     'JPEGExtendedProcess2_4')
  with pytest.raises(dicom_io.InputError) as e:
    dicom_io.read_radiograph(packed)
  assert e.value.kind == 'unsupported_syntax'
  assert 'JPEG Extended' in e.value.reason
  assert 'pip install pylibjpeg pylibjpeg-libjpeg' in e.value.reason


def with_spacing(src: Path, dst: Path, mm: float = 0.15) -> Path:
  """A copy of `src` with ImagerPixelSpacing set (pixel data untouched)."""
  ds = pydicom.dcmread(src)
  ds.ImagerPixelSpacing = [mm, mm]
  ds.save_as(dst)
  return dst


@pytest.mark.parametrize('name', ['RG1', 'RG3'])  # chest and extremity CR
def test_real_jpeg2000_radiographs_equal_their_uncompressed_twins(tmp_path,
                                                                  name):
  lossless = with_spacing(DATA / f'{name}_J2KR.dcm', tmp_path / 'j2kr.dcm')
  lossy = with_spacing(DATA / f'{name}_J2KI.dcm', tmp_path / 'j2ki.dcm')
  twin = with_spacing(DATA / f'{name}_UNCR.dcm', tmp_path / 'uncr.dcm')
  assert syntax_of(lossless) == pydicom.uid.JPEG2000Lossless
  want, _ = dicom_io.read_radiograph(twin)
  got, spacing = dicom_io.read_radiograph(lossless)
  np.testing.assert_array_equal(got, want)
  assert spacing == (0.15, 0.15)
  near, _ = dicom_io.read_radiograph(lossy)
  assert np.abs(near - want).mean() < 0.01 * (want.max() - want.min())


# Real files koajax must refuse, each with its reason.
REFUSED = {
    'RG1_UNCR.dcm': ('bad_spacing', 'invalid PixelSpacing (0, 0)'),  # chest CR
    'RG3_J2KR.dcm': ('no_spacing', 'no pixel spacing'),  # extremity CR
    'MR2_J2KR.dcm': ('not_radiograph', 'modality MR'),
    'emri_small_RLE.dcm': ('not_radiograph', 'modality MR'),
    'JPEG-LL.dcm': ('not_radiograph', 'modality NM'),
    'OBXXXX1A_rle.dcm': ('not_radiograph', 'modality US'),
    'US1_J2KR.dcm': ('not_radiograph', 'modality US'),
    'SC_rgb.dcm': ('unsupported_image', 'photometric interpretation RGB'),
    'SC_rgb_16bit_2frame.dcm': ('unsupported_image', 'RGB'),
}


@pytest.mark.parametrize('name', sorted(REFUSED))
def test_real_files_that_are_not_usable_radiographs_are_refused(name):
  path = DATA / name
  kind, words = REFUSED[name]
  with pytest.raises(dicom_io.InputError) as e:
    dicom_io.read_radiograph(path)
  assert (e.value.kind, e.value.path) == (kind, str(path))
  assert words in e.value.reason
  header = pydicom.dcmread(path, stop_before_pixels=True)
  for keyword in ('PatientName', 'PatientID', 'PatientBirthDate',
                  'StudyDate', 'InstitutionName'):
    value = str(header.get(keyword) or '')
    if len(value) > 2:
      assert value not in str(e.value), keyword


def test_colour_multiframe_and_palette_radiographs_are_refused(tmp_path):
  ds = pydicom.dcmread(phantom.write_dicom(tmp_path / 'a.dcm', phantom._ramp()))
  two = np.stack([phantom._ramp()] * 2)
  ds.set_pixel_data(two, photometric_interpretation='MONOCHROME2',
                    bits_stored=16)
  ds.save_as(tmp_path / 'frames.dcm', enforce_file_format=True)
  palette = pydicom.dcmread(DATA / 'OBXXXX1A.dcm')
  palette.Modality = 'CR'
  palette.ImagerPixelSpacing = [0.2, 0.2]
  palette.save_as(tmp_path / 'palette.dcm')
  for name, words in [('frames.dcm', '2 frames'),
                      ('palette.dcm', 'PALETTE COLOR')]:
    with pytest.raises(dicom_io.InputError) as e:
      dicom_io.read_radiograph(tmp_path / name)
    assert e.value.kind == 'unsupported_image'
    assert words in e.value.reason


def test_a_compressed_archive_builds_the_same_cache(tmp_path):
  """The same film, native and in three compressed syntaxes, gives the same
  knees; real chest and extremity CRs beside them are skipped with their
  reasons."""
  native = film(tmp_path / 'native.dcm')
  files = {'S0': 'native.dcm'}
  for i, syntax in enumerate(['JPEGLSLossless', 'JPEG2000Lossless',
                              'JPEGLosslessProcess14_1'], start=1):
    files[f'S{i}'] = transcode(native, tmp_path / f'{syntax}.dcm', syntax).name
  for subject, name in [('S8', 'RG1_J2KR.dcm'), ('S9', 'RG3_J2KR.dcm')]:
    shutil.copy(DATA / name, tmp_path / name)  # chest and extremity CR
    files[subject] = name
  _, points = phantom.render_film(
      (160, 280), (1.0, 1.0), [((70, 80), 4.0, 'R'), ((210, 80), -3.0, 'L')])
  manifest = build_helpers._write(
      tmp_path,
      [build_helpers._row(s, side, f) for s, f in files.items()
       for side in 'RL'],
      [build_helpers._landmark_row(s, side, points[side])
       for s in files for side in 'RL'])
  summary = build.build_cache(manifest, tmp_path / 'cache', workers=1,
                              roi_mm=100.0, roi_px=48)
  cache = cache_lib.open_cache(tmp_path / 'cache')
  images = {knee_id: cache[i]['image']
            for i, knee_id in enumerate(cache.index.knee_id)}
  assert sorted(images) == [f'S{i}_v00_{side}' for i in range(4)
                            for side in 'LR']
  for i in (1, 2, 3):
    for side in 'RL':
      np.testing.assert_array_equal(images[f'S{i}_v00_{side}'],
                                    images[f'S0_v00_{side}'])
  # As they are, both lack a usable spacing (zero, none); skipped once per
  # file with the reason, each of their knees counted.
  assert {s['where'].split('/')[-1]: s['kind'] for s in summary['skipped']
          } == {'RG1_J2KR.dcm': 'bad_spacing', 'RG3_J2KR.dcm': 'no_spacing'}
  assert summary['knees_skipped'] == 4
