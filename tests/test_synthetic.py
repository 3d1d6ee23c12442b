"""Tests of the synthetic radiograph generator and its grade model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from sklearn.metrics import cohen_kappa_score

from koajax import cli
from koajax import config_lib
from koajax.data import anatomy
from koajax.data import grading
from koajax.data import radiograph
from koajax.data import schema
from koajax.data import sites
from koajax.data import sources
from koajax.data import synthetic

# A small cohort: 4 subjects, 2 visits each, every site of interest.
SMALL = dict(num_subjects=4, seed=5, visits=(0, 12), attendance=(1.0, 1.0),
             sites=('A', 'B', 'C', 'D'))


def _read_csv(path: Path) -> pd.DataFrame:
  return pd.read_csv(path, dtype={'subject_id': str, 'site': str})


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp('synth')
  summary = synthetic.generate(out, workers=1, **SMALL)
  assert summary['knees'] == 16 and summary['images'] == 8
  return out


@pytest.fixture(scope='module')
def cohort() -> dict[str, np.ndarray]:
  return grading.sample_cohort(np.random.default_rng(0), 6000)


def test_manifest_and_landmarks_follow_schema(dataset):
  manifest = _read_csv(dataset / synthetic.MANIFEST)
  landmarks = _read_csv(dataset / synthetic.LANDMARKS)
  readers = tuple(schema.reader_column(name) for name in
                  grading.reader_names(grading.CohortConfig()))
  assert tuple(manifest.columns) == schema.MANIFEST_COLUMNS + readers
  assert tuple(landmarks.columns) == schema.LANDMARK_COLUMNS
  keys = list(schema.ID_COLUMNS)
  assert not manifest.duplicated(keys).any()
  # Exactly one landmark row per knee, same keys.
  merged = manifest[keys].merge(landmarks[keys], how='outer', indicator=True)
  assert (merged['_merge'] == 'both').all() and len(landmarks) == len(manifest)
  # Research ids look like OAI ids; both knees of an image share its path.
  assert manifest.subject_id.str.fullmatch(r'9\d{6}').all()
  assert set(manifest.side) == set(schema.SIDES)
  per_path = manifest.groupby('path').side.apply(lambda s: ''.join(sorted(s)))
  assert (per_path == 'LR').all()
  assert all((dataset / p).is_file() for p in manifest.path)
  for name in schema.GRADES:
    assert manifest[name].between(0, schema.GRADE_MAX[name]).all()


def test_dicoms_are_valid_radiographs(dataset):
  manifest = _read_csv(dataset / synthetic.MANIFEST)
  photometric = set()
  for path, rows in manifest.groupby('path'):
    ds = pydicom.dcmread(dataset / path)
    site = sites.SITES[rows.site.iloc[0]]
    pixels = ds.pixel_array
    assert pixels.dtype == np.uint16
    assert pixels.shape == (ds.Rows, ds.Columns)
    assert 0.9e6 < ds.Rows * ds.Columns < 2.6e6
    assert pixels.max() < 2**ds.BitsStored
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality in ('CR', 'DX') and ds.ViewPosition == 'PA'
    spacings = [ds.get(tag) for tag in ('ImagerPixelSpacing', 'PixelSpacing')]
    present = [list(map(float, s)) for s in spacings if s is not None]
    assert present
    for s in present:
      assert len(s) == 2 and all(0.14 <= x <= 0.2 for x in s)
    assert 'RescaleSlope' in ds and 'RescaleIntercept' in ds
    assert float(ds.RescaleSlope) == site.rescale[0]
    # Fake but distinctive identity, never the research id.
    assert str(ds.PatientName).startswith('SYNTH^')
    assert ds.PatientID != rows.subject_id.iloc[0]
    assert rows.subject_id.iloc[0] not in str(ds.PatientName)
    assert len(ds.PatientBirthDate) == 8 and len(ds.StudyDate) == 8
    photometric.add(ds.PhotometricInterpretation)
  assert photometric == {'MONOCHROME1', 'MONOCHROME2'}


def _display(ds: pydicom.Dataset) -> np.ndarray:
  """Modality values oriented bone-bright, as a viewer would show them."""
  values = ds.pixel_array * float(ds.RescaleSlope) + float(
      ds.RescaleIntercept)
  return -values if ds.PhotometricInterpretation == 'MONOCHROME1' else values


def _spacing(ds: pydicom.Dataset) -> float:
  spacing = ds.get('PixelSpacing') or ds.get('ImagerPixelSpacing')
  return float(spacing[0])


def test_knees_on_the_correct_sides_and_bone_bright(dataset):
  manifest = _read_csv(dataset / synthetic.MANIFEST)
  landmarks = _read_csv(dataset / synthetic.LANDMARKS)
  for path, rows in manifest.groupby('path'):
    ds = pydicom.dcmread(dataset / path)
    image = _display(ds)
    pts = landmarks.merge(rows[list(schema.ID_COLUMNS)])
    for _, row in pts.iterrows():
      xy = row.iloc[3:].to_numpy(float).reshape(schema.NUM_LANDMARKS, 2)
      left_half = xy[:, 0] < ds.Columns / 2
      # PA view: the patient's right knee lies on the image left.
      assert left_half.all() if row.side == 'R' else not left_half.any()
      # Lateral -> medial runs left -> right for a right knee.
      lateral_first = xy[0, 0] < xy[8, 0] and xy[9, 0] < xy[15, 0]
      assert lateral_first == (row.side == 'R')
      # Tibial bone (15 mm below the joint centre) is brighter than air in
      # the display orientation, whatever the photometric interpretation.
      spacing = _spacing(ds)
      x, y = xy[schema.JOINT_CENTRE]
      bone = image[int(y + 15 / spacing), int(x)]
      air = np.median(image[:, ds.Columns // 2 - 3:ds.Columns // 2 + 3])
      assert bone > air


def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path):
  synthetic.generate(tmp_path, workers=2, **SMALL)
  manifest = _read_csv(dataset / synthetic.MANIFEST)
  for path in manifest.path.unique():
    a = pydicom.dcmread(dataset / path)
    b = pydicom.dcmread(tmp_path / path)
    assert a.PixelData == b.PixelData
    assert (dataset / path).read_bytes() == (tmp_path / path).read_bytes()
  for name in (synthetic.MANIFEST, synthetic.LANDMARKS, synthetic.TRUTH):
    assert (dataset / name).read_bytes() == (tmp_path / name).read_bytes()


def test_different_seed_differs():
  options = {k: v for k, v in SMALL.items() if k not in ('seed',)}
  _, tasks_a = synthetic.plan(seed=5, **options)
  _, tasks_b = synthetic.plan(seed=6, **options)
  pixels_a = synthetic.render_task(tasks_a[0])[0]
  pixels_b = synthetic.render_task(tasks_b[0])[0]
  assert pixels_a.shape != pixels_b.shape or not np.array_equal(
      pixels_a, pixels_b)
  # And the same task renders identically twice.
  np.testing.assert_array_equal(pixels_a, synthetic.render_task(tasks_a[0])[0])


def test_cli_writes_dataset(tmp_path):
  summary = synthetic.main([f'--out={tmp_path}', '--num_subjects=1',
                            '--seed=3', '--workers=1'])
  manifest = _read_csv(tmp_path / synthetic.MANIFEST)
  assert len(manifest) == summary['knees'] == 2 * summary['images']


def test_ungraded_subjects_have_empty_grades():
  knees, _ = synthetic.plan(num_subjects=20, seed=1, ungraded_fraction=1.0)
  assert knees[list(schema.GRADES)].isna().all().all()
  with pytest.raises(TypeError):
    synthetic.plan(num_subjects=2, no_such_option=1)


def test_true_oarsi_grades_are_coherent_with_kl(cohort):
  true = cohort['true']
  kl, ost, jsn = true[:, 0], true[:, 1:5], true[:, 5:7]
  assert true.min() >= 0 and (kl <= 4).all() and (true[:, 1:] <= 3).all()
  assert (ost[kl == 0] == 0).all() and (jsn[kl == 0] == 0).all()
  assert (ost[kl == 1] <= 1).all() and (jsn[kl == 1] <= 1).all()
  # KL2: a definite osteophyte. KL3+: definite narrowing, several osteophytes.
  assert (ost[kl == 2].max(1) >= 1).all()
  assert (jsn[kl >= 3].max(1) >= 1).all()
  assert ((ost[kl >= 3] >= 1).sum(1) >= 2).all()
  assert (jsn[kl == 4].max(1) >= 2).all()
  # Medial disease is the common pattern.
  assert (jsn[:, 1] > 0).mean() > 1.5 * (jsn[:, 0] > 0).mean()
  # Higher KL, more narrowing on average: not a constant label.
  means = [jsn[kl == k].max(1).mean() for k in range(5)]
  assert np.all(np.diff(means) > 0)


def test_kl_distribution_and_progression(cohort):
  target = grading.CohortConfig().kl_distribution
  # Both the true grades and the reader's recorded grades (what users train
  # on) follow the OAI-like mix: reader noise must not shift it.
  for grades in (cohort['true'], cohort['recorded']):
    freq = np.bincount(grades[:, 0], minlength=5) / len(grades)
    np.testing.assert_allclose(freq, target, atol=0.03)
  # Per knee, true grades never regress over visits, and some progress.
  frame = pd.DataFrame({'knee': cohort['knee'], 'visit': cohort['visit']})
  frame[list(schema.GRADES)] = cohort['true']
  frame = frame.sort_values(['knee', 'visit'])
  steps = frame.groupby('knee')[list(schema.GRADES)].diff().dropna()
  assert (steps >= 0).all().all()
  assert 0.02 < (steps.kl > 0).mean() < 0.3
  # Both knees of a subject are correlated but differ.
  base = frame[frame.visit == 0].sort_values('knee').kl.to_numpy()
  right, left = base[0::2], base[1::2]
  assert 0.2 < np.corrcoef(right, left)[0, 1] < 0.9
  assert (right != left).mean() > 0.2


def test_reader_noise_gives_kappa_near_0_8(cohort):
  true, recorded = cohort['true'][:, 0], cohort['recorded'][:, 0]
  kappa = cohen_kappa_score(true, recorded, weights='quadratic')
  assert 0.7 <= kappa <= 0.9, kappa
  diff = np.abs(true - recorded)
  assert 0.2 < (diff > 0).mean() < 0.6
  assert (diff >= 2).mean() < 0.25 * (diff > 0).mean()  # mostly +-1 flips
  # Without reader noise the recorded grades are the true ones.
  config = grading.CohortConfig(reader_noise=0.0, oarsi_flip=0.0)
  clean = grading.sample_cohort(np.random.default_rng(0), 300, config)
  np.testing.assert_array_equal(clean['recorded'], clean['true'])


def _render_single(levels: tuple[float, ...], severity: float):
  detector = anatomy.Detector(spacing=0.15, width_mm=160.0, height_mm=150.0,
                              noise=0.0, texture=0.0)
  shape = anatomy.KneeShape()
  pose = anatomy.Pose(x=80.0, y=75.0)
  knee = anatomy.Knee('R', shape, anatomy.Disease(severity, levels), pose)
  pixels, points = radiograph.render([knee], detector, np.random.default_rng(0))
  return pixels.astype(float), points[0], detector.spacing


def _dark_run(profile: np.ndarray, threshold: float) -> int:
  """Length of the longest run of values below `threshold`."""
  best = run = 0
  for below in profile < threshold:
    run = run + 1 if below else 0
    best = max(best, run)
  return best


def test_rendered_narrowing_closes_the_medial_gap():
  healthy, pts0, spacing = _render_single((0.0,) * 6, 0.0)
  narrowed, pts3, _ = _render_single((0, 0, 0, 0, 0.0, 3.3), 3.2)
  gaps = []
  for image, pts in ((healthy, pts0), (narrowed, pts3)):
    x = int(round(pts[14, 0]))  # lowest point of the medial condyle
    top = int(pts[14, 1] - 4 / spacing)
    bottom = int(pts[7, 1] + 4 / spacing)
    profile = image[top:bottom, x]
    bone = np.median(image[bottom:bottom + int(5 / spacing), x])
    gaps.append((profile, bone, pts[7, 1] - pts[14, 1]))
  # One threshold for both images: halfway between the healthy gap and bone.
  threshold = 0.5 * (gaps[0][0].min() + gaps[0][1])
  runs = [_dark_run(profile, threshold) for profile, _, _ in gaps]
  assert runs[0] * spacing > 3.5  # a normal joint space of ~5 mm
  assert runs[1] < 0.4 * runs[0]
  assert gaps[1][2] < 0.4 * gaps[0][2]  # landmarks follow the bones
  # The lateral compartment is untouched (within the tilt of the femur).
  lateral = [pts[1, 1] - pts[10, 1] for pts in (pts0, pts3)]
  assert lateral[1] > 0.6 * lateral[0]


def test_osteophytes_and_sclerosis_add_bone():
  healthy, pts, spacing = _render_single((0.0,) * 6, 0.0)
  diseased, _, _ = _render_single((0, 3.5, 0, 3.5, 0, 3.5), 4.5)
  # Just outside the medial tibial margin: soft tissue becomes bone.
  x = int(pts[8, 0] + 3 / spacing)
  y = int(pts[8, 1] - 1 / spacing)
  patch = np.s_[y - 10:y + 10, x - 5:x + 5]
  assert diseased[patch].mean() > healthy[patch].mean() + 50


def test_landmark_order_and_joint_centre():
  shape = anatomy.KneeShape()
  knee = anatomy.Knee('R', shape, anatomy.Disease(), anatomy.Pose(80, 75))
  p = anatomy.landmarks(knee, 0.15)
  tibia_x = p[list(schema.TIBIA), 0]
  femur_x = p[list(schema.FEMUR), 0]
  assert np.all(np.diff(tibia_x) > 0) and np.all(np.diff(femur_x) > 0)
  centre = p[schema.JOINT_CENTRE]
  assert p[3, 0] < centre[0] < p[5, 0]
  assert p[11, 0] < centre[0] < p[13, 0]
  femur_low = p[[10, 14], 1].mean()
  plateau = p[[1, 7], 1].mean()
  assert femur_low < centre[1] < plateau
  assert p[12, 1] < femur_low  # the notch roof is above the condyles
  # Mirrored for a left knee.
  left = anatomy.landmarks(dataclasses.replace(knee, side='L'), 0.15)
  np.testing.assert_allclose(left[:, 0] - 80 / 0.15, -(p[:, 0] - 80 / 0.15))
  np.testing.assert_allclose(left[:, 1], p[:, 1])


def test_cohort_options_must_agree_in_length():
  with pytest.raises(ValueError, match='attendance has 4 entries but visits has 2'):
    grading.CohortConfig(visits=(0, 12))
  assert grading.CohortConfig(visits=(0, 12), attendance=(1.0, 0.8)).visits == (0, 12)


def test_variety_widens_pose_exposure_and_collimation():
  detector = anatomy.Detector(spacing=0.2, width_mm=305.0, height_mm=152.0)

  def poses(variety):
    rng = np.random.default_rng(11)
    return [anatomy.sample_pose(rng, 'R', detector, variety)
            for _ in range(3000)]

  standard, wide = poses(1.0), poses(2.0)
  for name, limit in (('angle', np.deg2rad(10)), ('y', 20.0),
                      ('scale', 0.12)):
    a = np.array([getattr(p, name) for p in standard])
    b = np.array([getattr(p, name) for p in wide])
    ratio = b.std() / a.std()
    assert 1.8 < ratio < 2.2, (name, ratio)
    centre = 1.0 if name == 'scale' else (76.0 if name == 'y' else 0.0)
    assert np.abs(b - centre).max() <= limit + 1e-9, name

  site = sites.SITES['B']  # a site whose films never show blades

  def detectors(variety):
    rng = np.random.default_rng(3)
    return [sites.detector(site, rng, variety) for _ in range(600)]

  assert not any(any(d.collimation) for d in detectors(1.0))
  wide = detectors(3.0)
  shown = np.mean([any(d.collimation) for d in wide])
  assert 0.55 < shown < 0.78, shown  # 1 - 1/3 of films
  assert max(max(d.collimation[:2]) for d in wide) > 9.0
  for field in ('contrast', 'gamma', 'noise', 'signal_range', 'black'):
    values = np.array([getattr(d, field) for d in wide])
    assert (values > 0).all(), field


def test_variety_changes_the_films_not_the_knees(tmp_path):
  options = {k: v for k, v in SMALL.items() if k != 'num_subjects'}
  knees, tasks = synthetic.plan(num_subjects=2, **options)
  wide_knees, wide_tasks = synthetic.plan(num_subjects=2, variety=2.0,
                                          **options)
  pd.testing.assert_frame_equal(knees, wide_knees)
  assert synthetic.render_task(tasks[0])[1].tolist() != (
      synthetic.render_task(wide_tasks[0])[1].tolist())
  synthetic.main([f'--out={tmp_path}', '--num_subjects=1', '--seed=3',
                  '--workers=1', '--variety=2'])
  settings = json.loads((tmp_path / synthetic.SETTINGS).read_text())
  assert settings['variety'] == 2.0
  with pytest.raises(cli.BadInput, match=r'^--variety=4.0: give a value '):
    synthetic.main([f'--out={tmp_path / "new"}', '--num_subjects=1',
                    '--variety=4'])
  assert not (tmp_path / 'new').exists()


def test_variety_has_its_own_dataset_folder():
  config = config_lib.data_config()
  assert sources.synthetic_dir(config).name == 'synthetic-n560-s0'
  config.synthetic.variety = 2.0
  assert sources.synthetic_dir(config).name == 'synthetic-n560-s0-v2'
