"""configs/localizer.py end to end on the smoke presets of both stages: the
fine stage's report against NumPy from its own predictions.csv, the true
points against the view the pipeline cuts, the selection checkpoints,
`koajax.evaluate` of the run giving the same report; then the two stages as
a localiser: a build without landmarks finds the synthetic knees and refuses
real chest and extremity radiographs."""

import csv
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from koajax import evaluate
from koajax import localize
from koajax import train
from koajax.data import build
from koajax.data import cache as cache_lib
from koajax.data import dicom_io
from koajax.data import manifest as manifest_lib
from koajax.data import pipeline
from koajax.data import sources
from config_loader import smoke_config
import test_preprocess as phantom

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_root(smoke_root):
  return smoke_root


@pytest.fixture(scope='module')
def localizer(smoke_localizer):
  return smoke_localizer


@pytest.fixture(scope='module')
def run(localizer):
  return localizer / 'fine'


def _points(frame, prefix):
  return np.stack([frame[[f'{prefix}x{k}', f'{prefix}y{k}']].to_numpy()
                   for k in range(16)], axis=1)


def test_the_report_agrees_with_numpy_on_its_predictions(run):
  result = json.loads((run / 'metrics.json').read_text())
  frame = pd.read_csv(run / 'predictions.csv', dtype={'knee_id': str})
  pred, true = _points(frame, ''), _points(frame, 'true_')
  mm = result['spacing_mm'][0]
  assert mm == pytest.approx(140 / 64)  # the 140 mm ROI at 64 px
  d = np.hypot(*(pred - true).transpose(2, 0, 1)) * mm
  # The CSV holds the float32 points to 7 digits (1e-5 px at 64 px).
  np.testing.assert_allclose(frame[[f'mm{k}' for k in range(16)]], d,
                             rtol=1e-5, atol=1e-4)
  assert result['knees'] == len(frame)
  for bone, rows in (('tibia', slice(0, 9)), ('femur', slice(9, 16))):
    for r in (1, 1.5, 2, 2.5):
      assert result['recall'][bone][f'{r:g}mm'] == pytest.approx(
          (d[:, rows] < r).mean())
  assert result['outliers'] == pytest.approx((d >= 10).mean())
  assert result['knees_with_outlier'] == pytest.approx(
      (d >= 10).any(1).mean())
  assert result['centre']['mean_mm'] == pytest.approx(d[:, 4].mean())
  assert result['centre']['p95_mm'] == pytest.approx(
      np.percentile(d[:, 4], 95))
  assert result['centre']['within_2mm'] == pytest.approx((d[:, 4] < 2).mean())


def test_true_points_are_those_of_the_view(run, data_root):
  config = smoke_config('localizer', data_root)
  cache = sources.resolve_cache(config.data)
  splits = train.saved_splits(run)
  frame = pd.read_csv(run / 'predictions.csv', dtype={'knee_id': str})
  batches = list(pipeline.eval_batches(
      cache, splits.test, view='keypoints', view_size=config.view_size,
      batch_size=16, sharding=pipeline.Sharding(0, 1)))
  keypoints = np.concatenate([b['keypoints'] for b in batches])
  np.testing.assert_allclose(_points(frame, 'true_'), keypoints, rtol=1e-6)
  # The test knees are the held-out site's, all with their landmarks.
  assert set(cache.index['site'].iloc[splits.test]) == {'E'}
  assert np.isfinite(keypoints).all()


def test_training_lowers_the_distance_and_keeps_the_best(run):
  rows = [json.loads(line) for line in
          (run / 'metrics.jsonl').read_text().splitlines()]
  train_loss = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert train_loss[-1] < 0.8 * train_loss[0]
  val = [r for r in rows if 'val/landmarks/centre_mm' in r]
  assert len(val) == 2  # an evaluation every 6 of the 12 epochs
  assert (run / 'best_landmarks-centre_mm').is_dir()
  assert (run / 'best_landmarks-mean_mm').is_dir()


def test_evaluate_writes_the_same_report(run, tmp_path):
  again = evaluate.evaluate([run], out=tmp_path / 'eval')
  saved = json.loads((run / 'metrics.json').read_text())
  assert again['centre'] == pytest.approx(saved['centre'])
  assert again['recall'] == saved['recall']
  pd.testing.assert_frame_equal(
      pd.read_csv(tmp_path / 'eval' / 'predictions.csv'),
      pd.read_csv(run / 'predictions.csv'))


def test_the_coarse_stage_learns_on_side_views(localizer, data_root):
  result = json.loads((localizer / 'coarse' / 'metrics.json').read_text())
  assert result['spacing_mm'][0] == pytest.approx(4.0)  # 256 mm at 64 px
  cache = sources.resolve_cache(
      smoke_config('localizer', data_root, **{'data.crop': 'side',
                                              'data.roi_mm': 256.0,
                                              'data.roi_px': 128}).data)
  assert cache.meta['crop'] == 'side'
  rows = [json.loads(line) for line in
          (localizer / 'coarse' / 'metrics.jsonl').read_text().splitlines()]
  loss = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(loss) == 12 and loss[-1] < 0.6 * loss[0]  # an epoch's mean each


def _test_site(data_root) -> tuple[Path, pd.DataFrame]:
  raw = Path(data_root) / 'synthetic-n40-s0' / 'raw'
  frame = pd.read_csv(raw / 'manifest.csv', dtype={'subject_id': str})
  return raw, frame[frame['site'] == 'E']


def test_the_localiser_finds_the_held_out_sites_knees(localizer, data_root):
  """Both stages on site E's whole films (no training knee among them):
  most knees found, within a few mm of the truth."""
  raw, frame = _test_site(data_root)
  truth = manifest_lib.read_landmarks(raw / 'landmarks.csv')
  loc = localize.load(str(localizer))
  errors, refused = [], 0
  for path, knees in frame.groupby('path', sort=False):
    image, spacing = dicom_io.read_radiograph(raw / path)
    mm = np.array([spacing[1], spacing[0]])
    for r, knee in zip(loc.locate(image, spacing, list(knees['side']),
                                  bilateral=True),
                       knees.itertuples(index=False)):
      if isinstance(r, localize.Refused):
        refused += 1
        continue
      true = truth[(knee.subject_id, knee.visit, knee.side)]
      errors.append(np.linalg.norm((r.landmarks - true) * mm, axis=1))
  errors = np.array(errors)
  assert len(errors) >= 0.8 * len(frame), f'{refused} of {len(frame)} refused'
  # Half a minute of training at 2.2 mm per view pixel: millimetres, not
  # the quick preset's fractions of one (README).
  assert np.median(errors[:, 4]) < 8.0
  assert np.median(errors) < 10.0


def test_a_build_without_landmarks_localises_knees_and_refuses_chests(
    localizer, data_root, tmp_path):
  """Site E's films with no landmarks file, beside a real chest and a real
  extremity CR (JPEG 2000) and a single-knee film: the knees are built with
  their landmarks from the localiser, the other radiographs skipped as no
  knee."""
  import test_dicom_codecs as real  # pydicom-data's files
  raw, frame = _test_site(data_root)
  frame = frame.assign(path=[str(raw / p) for p in frame['path']])
  rows = [frame]
  for subject, name in (('CHEST', 'RG1_J2KR.dcm'), ('HAND', 'RG3_J2KR.dcm')):
    path = real.with_spacing(real.DATA / name, tmp_path / name)
    rows.append(pd.DataFrame([{**frame.iloc[0].to_dict(), 'subject_id':
                               subject, 'side': 'R', 'path': str(path)}]))
  # One knee alone on its film: the right half of a bilateral one.
  first = frame.iloc[0]
  image, spacing = dicom_io.read_radiograph(first['path'])
  half = image[:, :image.shape[1] // 2]
  stored = np.round((half - half.min()) / np.ptp(half) * 4095)
  phantom.write_dicom(tmp_path / 'single.dcm', stored, spacing=spacing)
  rows.append(pd.DataFrame([{**first.to_dict(), 'subject_id': 'SINGLE',
                             'side': 'R', 'path': str(tmp_path / 'single.dcm')}]))
  manifest = tmp_path / 'manifest.csv'
  pd.concat(rows).to_csv(manifest, index=False)
  assert not (tmp_path / 'landmarks.csv').exists()

  summary = build.build_cache(manifest, tmp_path / 'cache', workers=1,
                              localizer=localizer, roi_px=64)
  reasons = {s['where']: s for s in summary['skipped']}
  for name in ('RG1_J2KR.dcm', 'RG3_J2KR.dcm'):
    [skip] = [s for w, s in reasons.items() if name in s['reason']]
    assert skip['kind'] == 'not_found'
    assert "finds no knee on the right knee's side" in skip['reason']
    assert 'check that it is a knee radiograph' in skip['reason']
  cache = cache_lib.open_cache(tmp_path / 'cache')
  assert (cache.index['landmarks_from'] == 'localizer').all()
  assert summary['knees_localised'] == len(cache) >= 0.8 * len(frame)
  assert 'SINGLE_v' in ' '.join(cache.index['knee_id'])
  assert summary['localizer'] == str(localizer)


def test_the_gpu_localizer_script_dry_runs_and_reports(localizer, tmp_path):
  """benchmarks/gpu_localizer.sh --dry with this localiser (so it does not
  train): films of another seed, both stages on them, the two builds; its
  report recomputed from what the stages wrote."""
  out, work = tmp_path / 'out', tmp_path / 'work'
  env = {**os.environ, 'PYTHON': sys.executable, 'LOCALIZER': str(localizer),
         'WORK_DIR': str(work)}
  result = subprocess.run(
      ['bash', str(REPO / 'benchmarks' / 'gpu_localizer.sh'), '--dry',
       str(out)], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  with open(out / 'stages.tsv', newline='') as f:
    assert [(r['stage'], r['outcome']) for r in
            csv.DictReader(f, delimiter='\t')] == [
                (name, 'ok') for name in ('films', 'localize',
                                          'build_landmarks', 'build_localizer')]
  report = json.loads((out / 'localizer.json').read_text())
  for name in ('coarse', 'fine'):
    metrics = json.loads((localizer / name / 'metrics.json').read_text())
    stage = report['stages'][name]
    assert stage['centre'] == metrics['centre']
    assert stage['centre_target_met'] == (
        metrics['centre']['within_2mm'] >= 0.95 and metrics['outliers'] == 0)
  films = json.loads((out / 'localize_films.json').read_text())['results'][0]
  assert report['films']['films_per_second'] == films['films_per_second'] > 0
  assert films['knees'] == 2 * films['films']  # bilateral synthetic films
  seconds = [json.loads((work / c / 'summary.json').read_text())['seconds']
             for c in ('cache-landmarks', 'cache-localizer')]
  assert report['build']['ratio'] == pytest.approx(seconds[1] / seconds[0])
  assert report['build']['localised']['knees_localised'] > 0
  assert report['build']['with_landmarks']['knees_localised'] == 0
  assert '| through the localiser |' in (out / 'localizer.md').read_text()
