"""Tests for DICOM reading and ROI geometry, on images with known geometry.

The phantom knee is defined in a "knee frame" in millimetres (x along the
tibial plateau from lateral to medial for a right knee, y down, origin at the
joint centre) and rendered into an image at a chosen pixel spacing, position
and rotation. Expectations are computed from the frame directly, not with the
code under test. The render and DICOM helpers are reused by test_build.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
import pydicom.uid
import pytest
from PIL import Image
from scipy import ndimage

from koajax.data import dicom_io
from koajax.data import preprocess
from koajax.data import schema

# Header values that must never leave the DICOM files.
PHI = {
    'PatientName': 'Doe^Jane',
    'PatientID': 'PHI-7731',
    'PatientBirthDate': '19450101',
    'StudyDate': '20040909',
    'AccessionNumber': 'ACC99887',
    'InstitutionName': 'St Elsewhere',
}

# Right knee landmarks in the knee frame (mm): lateral at -x, plateau y=+2.5,
# femoral condyles y=-2.5 (joint space 5 mm).
RIGHT_FRAME_LANDMARKS = np.array([
    (-38, 2.5), (-25, 2.5), (-10, 2.5), (-5, -1), (0, 0), (5, -1), (10, 2.5),
    (25, 2.5), (38, 2.5),
    (-40, -5), (-25, -2.5), (-8, -2.5), (0, -8), (8, -2.5), (25, -2.5),
    (40, -5)], np.float64)
# Markers, found by comparing renders with and without them: a hole in the
# lateral tibia and a bone-bright disc on the joint centre (in the joint space).
LATERAL_MARKER = (-30.0, 15.0)  # mm
LATERAL_MARKER_RADIUS = 4.0
CENTRE_MARKER_RADIUS = 2.0
BACKGROUND, SOFT, BONE = 2000, 9000, 30000
# Landmarks on the lateral and on the medial half of the joint.
LATERAL = [0, 1, 2, 9, 10, 11]
MEDIAL = [6, 7, 8, 13, 14, 15]


def frame_intensity(q: np.ndarray, markers: bool = True) -> np.ndarray:
  """Right-knee phantom intensity at knee-frame points q (..., 2) in mm."""
  x, y = q[..., 0], q[..., 1]
  out = np.full(x.shape, BACKGROUND, np.float64)
  out[np.abs(x) < 60] = SOFT
  out[(np.abs(x) < 40) & (y < -2.5) & (y > -80)] = BONE
  out[(np.abs(x) < 38) & (y > 2.5) & (y < 80)] = BONE
  if markers:
    lateral = np.hypot(x - LATERAL_MARKER[0], y - LATERAL_MARKER[1])
    out[lateral < LATERAL_MARKER_RADIUS] = SOFT
    out[np.hypot(x, y) < CENTRE_MARKER_RADIUS] = BONE
  return out


def rotation(degrees: float) -> np.ndarray:
  t = math.radians(degrees)
  return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def render_film(shape: tuple[int, int], spacing: tuple[float, float],
                knees: list[tuple[tuple[float, float], float, str]],
                markers: bool = True):
  """A radiograph with phantom knees.

  Args:
    shape: (rows, cols).
    spacing: (row, col) mm per pixel.
    knees: (centre (x, y) in mm, rotation in degrees, side) per knee; a left
      knee is the mirror image of a right one.

  Returns:
    (uint16 image, {side: (16, 2) landmarks in image pixels (x, y)}).
  """
  rows, cols = shape
  mm_per_px = np.array([spacing[1], spacing[0]])
  yy, xx = np.mgrid[0:rows, 0:cols]
  points_mm = np.stack([xx, yy], axis=-1) * mm_per_px
  image = np.full(shape, BACKGROUND, np.float64)
  landmarks = {}
  for centre, degrees, side in knees:
    mirror = np.array([-1.0 if side == 'L' else 1.0, 1.0])
    r = rotation(degrees)
    q = (points_mm - centre) @ r  # image mm -> frame mm (R^T (p - c))
    inside = np.abs(q).max(axis=-1) < 85
    image[inside] = frame_intensity(q[inside] * mirror, markers)
    frame = RIGHT_FRAME_LANDMARKS * mirror
    landmarks[side] = (frame @ r.T + centre) / mm_per_px
  return np.round(image).astype(np.uint16), landmarks


def write_dicom(path: str | Path, pixels: np.ndarray, *,
                spacing: tuple[float, float] | None = (0.2, 0.2),
                spacing_tag: str = 'ImagerPixelSpacing',
                photometric: str = 'MONOCHROME2',
                slope: float | None = None,
                intercept: float | None = None) -> Path:
  """A minimal DX-like DICOM file carrying the PHI header values."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = (
      pydicom.uid.DigitalXRayImageStorageForPresentation)
  ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality = 'DX'
  for keyword, value in PHI.items():
    setattr(ds, keyword, value)
  ds.set_pixel_data(np.asarray(pixels, np.uint16),
                    photometric_interpretation=photometric, bits_stored=16)
  if spacing is not None:
    setattr(ds, spacing_tag, [f'{v:g}' for v in spacing])
  if slope is not None:
    ds.RescaleSlope = f'{slope:g}'
    ds.RescaleIntercept = f'{intercept or 0:g}'
  path = Path(path)
  ds.save_as(path, enforce_file_format=True)
  return path


# --- dicom_io ------------------------------------------------------------


def _ramp(rows=40, cols=60) -> np.ndarray:
  return (np.arange(rows * cols).reshape(rows, cols) * 7 + 100).astype(
      np.uint16)


def test_reads_pixels_and_spacing(tmp_path):
  stored = _ramp()
  image, spacing = dicom_io.read_radiograph(
      write_dicom(tmp_path / 'a.dcm', stored, spacing=(0.15, 0.2)))
  assert image.dtype == np.float32
  np.testing.assert_array_equal(image, stored.astype(np.float32))
  assert spacing == (0.15, 0.2)


def test_rescale_slope_intercept(tmp_path):
  stored = _ramp()
  image, _ = dicom_io.read_radiograph(write_dicom(
      tmp_path / 'a.dcm', stored, slope=2.0, intercept=-1000))
  np.testing.assert_allclose(image, 2.0 * stored - 1000)


def test_monochrome1_is_inverted(tmp_path):
  stored = _ramp()
  image, _ = dicom_io.read_radiograph(write_dicom(
      tmp_path / 'a.dcm', stored, photometric='MONOCHROME1', slope=0.5,
      intercept=10))
  values = 0.5 * stored.astype(np.float64) + 10
  np.testing.assert_allclose(image, values.max() + values.min() - values)
  # Inverting twice gives back the MONOCHROME2 reading.
  m2, _ = dicom_io.read_radiograph(write_dicom(
      tmp_path / 'b.dcm', stored, slope=0.5, intercept=10))
  assert np.corrcoef(image.ravel(), m2.ravel())[0, 1] == pytest.approx(-1)


def test_monochrome1_film_gives_the_same_roi(tmp_path):
  film, landmarks = render_film((500, 500), (0.3, 0.3),
                                [((75, 75), 5.0, 'R')])
  m1 = write_dicom(tmp_path / 'm1.dcm', 65535 - film, spacing=(0.3, 0.3),
                   photometric='MONOCHROME1')
  m2 = write_dicom(tmp_path / 'm2.dcm', film, spacing=(0.3, 0.3))
  rois = [preprocess.extract_roi(*dicom_io.read_radiograph(p),
                                 landmarks['R'], 'R', roi_mm=100,
                                 roi_px=64)[0] for p in (m1, m2)]
  np.testing.assert_array_equal(rois[0], rois[1])


def test_spacing_tags(tmp_path):
  pixels = _ramp()
  _, spacing = dicom_io.read_radiograph(write_dicom(
      tmp_path / 'p.dcm', pixels, spacing=(0.1, 0.12),
      spacing_tag='PixelSpacing'))
  assert spacing == (0.1, 0.12)
  # With both, ImagerPixelSpacing (the detector's, as in OAI) wins.
  path = write_dicom(tmp_path / 'both.dcm', pixels, spacing=(0.3, 0.3))
  ds = pydicom.dcmread(path)
  ds.PixelSpacing = ['0.25', '0.25']
  ds.save_as(path)
  assert dicom_io.read_radiograph(path)[1] == (0.3, 0.3)


@pytest.mark.parametrize('spacing,kind', [
    (None, 'no_spacing'), ((0.0, 0.2), 'bad_spacing'),
    ((-0.2, 0.2), 'bad_spacing'), ((200.0, 0.2), 'bad_spacing')])
def test_bad_spacing(tmp_path, spacing, kind):
  path = write_dicom(tmp_path / 'a.dcm', _ramp(), spacing=spacing)
  with pytest.raises(dicom_io.InputError) as e:
    dicom_io.read_radiograph(path)
  assert e.value.kind == kind
  assert 'Spacing' in e.value.reason


def test_unreadable_files(tmp_path):
  good = write_dicom(tmp_path / 'good.dcm', _ramp())
  truncated = tmp_path / 'truncated.dcm'
  truncated.write_bytes(good.read_bytes()[:-1000])
  header_only = tmp_path / 'header_only.dcm'
  header_only.write_bytes(good.read_bytes()[:200])
  text = tmp_path / 'notes.dcm'
  text.write_text('not an image\n')
  expected = {
      truncated: ('truncated', 'truncated'),
      header_only: ('no_pixel_data', 'no pixel data'),
      text: ('not_dicom', 'not a DICOM file'),
      tmp_path / 'absent.dcm': ('missing_file', 'not found'),
  }
  for path, (kind, words) in expected.items():
    with pytest.raises(dicom_io.InputError) as e:
      dicom_io.read_radiograph(path)
    assert (e.value.kind, e.value.path) == (kind, str(path))
    assert words in e.value.reason


def test_bare_dataset_without_preamble(tmp_path):
  ds = pydicom.dcmread(write_dicom(tmp_path / 'a.dcm', _ramp()))
  bare = tmp_path / 'bare.dcm'
  with pydicom.filebase.DicomFile(bare, 'wb') as f:
    f.is_implicit_VR, f.is_little_endian = True, True
    pydicom.filewriter.write_dataset(f, ds)
  assert bare.read_bytes()[128:132] != b'DICM'
  image, spacing = dicom_io.read_radiograph(bare)
  np.testing.assert_array_equal(image, _ramp())
  assert spacing == (0.2, 0.2)


def relabel_compressed(path: Path,
                       syntax=pydicom.uid.JPEG2000Lossless) -> Path:
  """Relabels a file's native pixels as compressed (which they are not)."""
  ds = pydicom.dcmread(path)
  ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
  ds.file_meta.TransferSyntaxUID = syntax
  ds.save_as(path, enforce_file_format=True)
  return path


# JPEG 2000 has a decoder here (Pillow) that fails; JPEG-LS usually has none.
@pytest.mark.parametrize('syntax', [pydicom.uid.JPEG2000Lossless,
                                    pydicom.uid.JPEGLSLossless])
def test_compressed_syntax_says_how_to_fix(tmp_path, syntax):
  path = relabel_compressed(write_dicom(tmp_path / 'a.dcm', _ramp()), syntax)
  with pytest.raises(dicom_io.InputError) as e:
    dicom_io.read_radiograph(path)
  assert e.value.kind == 'unsupported_syntax'
  assert syntax.name in e.value.reason and str(syntax) in e.value.reason
  assert 'gdcmconv --raw' in e.value.reason
  for value in PHI.values():
    assert value not in str(e.value)


# --- ROI geometry --------------------------------------------------------


def _centroid(mask: np.ndarray) -> np.ndarray:
  """(x, y) centroid of a boolean mask."""
  rows, cols = np.nonzero(mask)
  return np.array([cols.mean(), rows.mean()])


def _components(mask: np.ndarray) -> list[np.ndarray]:
  labels, n = ndimage.label(mask)
  return [_centroid(labels == i) for i in range(1, n + 1)]


@pytest.mark.parametrize('side', ['R', 'L'])
@pytest.mark.parametrize('degrees', [0.0, 12.0, -25.0])
def test_roi_geometry(side, degrees):
  # Anisotropic pixels, knee off-centre and rotated, patch 3x coarser than
  # the image (the anti-aliasing path).
  spacing = (0.25, 0.2)
  roi_mm, roi_px = 140.0, 200
  mm_per_roi_px = roi_mm / roi_px
  centre_mm = np.array([95.0, 88.0])
  knees = [(centre_mm, degrees, side)]
  film, landmarks = render_film((720, 960), spacing, knees)
  plain, _ = render_film((720, 960), spacing, knees, markers=False)
  roi, keypoints = preprocess.extract_roi(
      film.astype(np.float32), spacing, landmarks[side], side,
      roi_mm=roi_mm, roi_px=roi_px)
  plain_roi, _ = preprocess.extract_roi(
      plain.astype(np.float32), spacing, landmarks[side], side,
      roi_mm=roi_mm, roi_px=roi_px)
  assert roi.shape == (roi_px, roi_px) and roi.dtype == np.uint8
  assert keypoints.shape == (16, 2) and keypoints.dtype == np.float32

  # Keypoints: the frame offsets scaled to patch pixels (left knees mirrored
  # back, so they match the right knee's), centred on the patch.
  centre = (roi_px - 1) / 2
  expected = RIGHT_FRAME_LANDMARKS / mm_per_roi_px + centre
  np.testing.assert_allclose(keypoints, expected, atol=1e-3)
  np.testing.assert_allclose(keypoints[schema.JOINT_CENTRE], [centre, centre],
                             atol=1e-3)

  # Image content agrees with the keypoints: the joint-centre marker is at
  # the patch centre within 2 mm, and the lateral marker is where the frame
  # says, on the patch's left, for both sides.
  markers = _components(np.abs(roi.astype(int) - plain_roi) > 64)
  assert len(markers) == 2, len(markers)
  joint, lateral = sorted(markers, key=lambda c: np.hypot(*(c - centre)))
  assert np.hypot(*(joint - centre)) * mm_per_roi_px < 2.0
  expected_lateral = np.array(LATERAL_MARKER) / mm_per_roi_px + centre
  assert np.hypot(*(lateral - expected_lateral)) * mm_per_roi_px < 2.0
  assert lateral[0] < centre

  # Plateau levelled: the tibial edge (first bright row below the joint
  # space) is at the same row across the plateau.
  columns = np.round(centre + np.arange(-30, 31, 5) / mm_per_roi_px)
  edges = []
  for c in columns.astype(int):
    profile = roi[int(centre) + 1:, c] > 128
    if c == int(round(centre)) or not profile.any():
      continue
    edges.append(np.argmax(profile) + int(centre) + 1)
  edge_rows = np.array(edges)
  assert np.ptp(edge_rows) <= 1, edge_rows
  plateau_row = centre + 2.5 / mm_per_roi_px
  assert abs(edge_rows.mean() - plateau_row) * mm_per_roi_px < 1.0


def test_spacing_is_honoured():
  # The same knee rendered at two spacings gives the same patch.
  rois = []
  for spacing in [(0.2, 0.2), (0.35, 0.15)]:
    film, landmarks = render_film(
        (int(180 / spacing[0]), int(180 / spacing[1])), spacing,
        [((90, 90), 7.0, 'R')])
    rois.append(preprocess.extract_roi(
        film.astype(np.float32), spacing, landmarks['R'], 'R', roi_mm=100,
        roi_px=100)[0].astype(np.float64))
  mismatch = np.mean(np.abs(rois[0] - rois[1]) > 64)
  assert mismatch < 0.03, mismatch


def test_left_is_the_mirror_of_right():
  spacing = (0.2, 0.2)
  film, landmarks = render_film(
      (800, 1400), spacing, [((70, 80), 10.0, 'R'), ((210, 80), -10.0, 'L')])
  image = film.astype(np.float32)
  right, kp_right = preprocess.extract_roi(image, spacing, landmarks['R'], 'R',
                                           roi_mm=120, roi_px=120)
  left, kp_left = preprocess.extract_roi(image, spacing, landmarks['L'], 'L',
                                         roi_mm=120, roi_px=120)
  np.testing.assert_allclose(kp_left, kp_right, atol=1e-3)
  assert np.mean(np.abs(right.astype(int) - left.astype(int)) > 64) < 0.02
  # Lateral points (0-2, 9-11) left of the medial ones (6-8, 13-15).
  for kp in (kp_left, kp_right):
    assert kp[LATERAL, 0].max() < kp[MEDIAL, 0].min()


def test_downsampling_does_not_alias():
  # Stripes at the image's Nyquist frequency vanish from a 3.5x coarser
  # patch instead of folding into a visible pattern.
  spacing = (0.2, 0.2)
  rows, cols = np.mgrid[0:800, 0:800]
  ramp = (rows + cols).astype(np.float32) * 10
  stripes = ramp + 2000 * (cols % 2)
  landmarks = np.stack([np.linspace(300, 500, 16),
                        np.full(16, 400.0)], axis=1)
  landmarks[schema.JOINT_CENTRE] = (400, 400)
  kwargs = dict(roi_mm=100, roi_px=143)
  plain, _ = preprocess.extract_roi(ramp, spacing, landmarks, 'R', **kwargs)
  striped, _ = preprocess.extract_roi(stripes, spacing, landmarks, 'R',
                                      **kwargs)
  assert np.abs(plain.astype(int) - striped).mean() < 3


def test_outside_the_image_is_background():
  spacing = (0.2, 0.2)
  # Knee 30 mm from the top edge: the top of a 140 mm patch is off the film.
  film, landmarks = render_film((700, 700), spacing, [((70, 30), 0.0, 'R')])
  roi, _ = preprocess.extract_roi(film.astype(np.float32), spacing,
                                  landmarks['R'], 'R', roi_mm=140, roi_px=140)
  off_film = roi[:30]  # rows above -40 mm from the joint centre
  assert (off_film == roi.min()).all()


def test_bad_landmarks_raise():
  image = np.zeros((100, 100), np.float32)
  good = np.tile([[50.0, 50.0]], (16, 1)) + np.arange(16)[:, None] * [1, 0]
  with pytest.raises(ValueError, match='non-numeric'):
    preprocess.extract_roi(image, (1, 1), np.where(np.arange(16)[:, None] == 3,
                                                   np.nan, good), 'R')
  with pytest.raises(ValueError, match='coincide'):
    preprocess.extract_roi(image, (1, 1), np.full((16, 2), 50.0), 'R')
  with pytest.raises(ValueError, match='contrast'):
    preprocess.extract_roi(image, (1, 1), good, 'R', roi_mm=40, roi_px=40)


def _by_hand(image, geometry, background, hidden=None):
  """A patch sampled from the whole film filtered at once (SciPy), the way
  the module's docstring describes, to 8 bits as `to_uint8` does; the
  `hidden` columns count as off the film."""
  step = np.linalg.norm(geometry.matrix, axis=1)[::-1]  # (row, col)
  filtered = ndimage.gaussian_filter(image, np.maximum(0, (step - 1) / 2),
                                     mode='nearest')
  n = geometry.roi_px
  patch = ndimage.affine_transform(
      filtered, geometry.matrix[::-1, ::-1], geometry.offset[::-1],
      output_shape=(n, n), order=1, mode='constant', cval=np.nan)
  if hidden is not None:
    patch[:, hidden] = np.nan
  valid = ~np.isnan(patch)
  low, high = np.percentile(patch[valid], preprocess.CLIP_PERCENTILES)
  patch = np.where(valid, patch, background)
  return np.round((np.clip(patch, low, high) - low) * 255 / (high - low))


def test_looks_and_sides_taken_together_are_each_as_alone():
  # A localiser's two looks at a knee (10 mm apart, one over the film's top
  # edge) and both sides of a film: filtered once for all, each patch is
  # the one it would be alone and the one the whole filtered film gives.
  spacing = (0.2, 0.2)
  film, landmarks = render_film(
      (760, 1500), spacing, [((80, 60), 6.0, 'R'), ((220, 80), -4.0, 'L')])
  image = film.astype(np.float32)
  background = preprocess.background_level(image)
  looks = [landmarks['R'], landmarks['R'] + [50.0, -8.0]]
  together = preprocess.extract_rois(image, spacing, looks, 'R', roi_mm=140,
                                     roi_px=192)
  for points, (roi, keypoints) in zip(looks, together):
    alone, alone_keypoints = preprocess.extract_roi(
        image, spacing, points, 'R', roi_mm=140, roi_px=192)
    np.testing.assert_array_equal(roi, alone)
    np.testing.assert_array_equal(keypoints, alone_keypoints)
    geometry = preprocess.roi_geometry(points, spacing, 'R', roi_mm=140,
                                       roi_px=192)
    hand = _by_hand(image, geometry, background)
    assert np.abs(roi - hand).max() <= 1 and np.mean(roi != hand) < 1e-3
  sides = preprocess.extract_sides(image, spacing, ['R', 'L'],
                                   bilateral=True, view_mm=256, view_px=128)
  for side, (view, geometry) in zip('RL', sides):
    alone, alone_geometry = preprocess.extract_side(
        image, spacing, side, bilateral=True, view_mm=256, view_px=128)
    np.testing.assert_array_equal(view, alone)
    np.testing.assert_array_equal(geometry.offset, alone_geometry.offset)


@pytest.mark.parametrize('view_mm,view_px', [(256, 128), (256, 256),
                                              (100, 400)])
@pytest.mark.parametrize('bilateral', [True, False])
def test_side_views_are_the_whole_filtered_films(view_mm, view_px, bilateral):
  # Axis-aligned views take only the filtered pixels they need: the same
  # values as the whole film filtered by SciPy and sampled, the view larger
  # than the film (NaN, then background, beyond it) or inside it, each
  # side, coarser than the film (filtered) and finer (100 mm at 400 px).
  spacing = (0.2, 0.25)
  shape = (760, 1500) if bilateral else (900, 700)
  knees = ([((80, 60), 6.0, 'R'), ((220, 80), -4.0, 'L')] if bilateral
           else [((90, 110), 3.0, 'L')])
  film, _ = render_film(shape, spacing, knees)
  image = film.astype(np.float32)
  background = preprocess.background_level(image)
  sides = 'RL' if bilateral else 'L'
  for side, (view, geometry) in zip(sides, preprocess.extract_sides(
      image, spacing, list(sides), bilateral=bilateral, view_mm=view_mm,
      view_px=view_px, background=background)):
    hidden = None
    if bilateral:  # the other knee's half of the film
      x = geometry.matrix[0, 0] * np.arange(view_px) + geometry.offset[0]
      middle = image.shape[1] / 2 - 0.5
      hidden = x > middle if side == 'R' else x < middle
    hand = _by_hand(image, geometry, background, hidden)
    assert np.abs(view - hand).max() <= 1 and np.mean(view != hand) < 1e-3


def test_axis_weights_are_scipys_filter_and_interpolation():
  # One axis: the weights applied to a signal give SciPy's Gaussian filter
  # ('nearest' edges) linearly interpolated, at points on whole pixels,
  # between them and on both edges.
  rng = np.random.default_rng(0)
  signal = rng.uniform(0, 1000, 301)
  for sigma in (0.0, 0.4, 1.3, 4.5):
    filtered = ndimage.gaussian_filter1d(signal, sigma, mode='nearest') \
        if sigma else signal
    points = np.concatenate([[0.0, 300.0, 17.0], rng.uniform(0, 300, 50)])
    want = np.interp(points, np.arange(301), filtered)
    weights, start = preprocess._axis_weights(points, 301, sigma)
    got = weights @ signal[start:start + weights.shape[1]]
    np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 weights


def test_bilinear_sampling_is_scipys():
  # Random sizes, rotations, scales and offsets, some axis-aligned on whole
  # pixels (samples exactly on the edges): the values and the NaN outside
  # of scipy.ndimage.affine_transform(order=1, mode='constant'), patches
  # partly off the film and wholly on it.
  rng = np.random.default_rng(3)
  for _ in range(100):
    image = rng.uniform(0, 4000, rng.integers(20, 300, 2)).astype(np.float32)
    angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 3.0)
    matrix = scale * np.array([[np.cos(angle), -np.sin(angle)],
                               [np.sin(angle), np.cos(angle)]])
    offset = rng.uniform(-100, 300, 2)
    if rng.random() < 0.3:
      matrix, offset = np.diag([scale, scale]), np.round(offset)
    n = int(rng.integers(10, 200))
    if rng.random() < 0.3:  # wholly on the film
      n = int(rng.integers(2, 10))
      offset = rng.uniform(3 * scale * n, min(image.shape) - 3 * scale * n,
                           2) if min(image.shape) > 6 * scale * n else offset
    want = ndimage.affine_transform(
        image, matrix[::-1, ::-1], offset[::-1], output_shape=(n, n),
        order=1, mode='constant', cval=np.nan)
    got = preprocess._bilinear(Image.fromarray(image, mode='F'), matrix,
                               offset, n, origin=(0, 0), film=image.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)
