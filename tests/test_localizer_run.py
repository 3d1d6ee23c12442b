"""configs/localizer.py end to end on the smoke preset: the report against
NumPy from its own predictions.csv, the true points against the view the
pipeline cuts, the selection checkpoints, and `koajax.evaluate` of the run
giving the same report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from koajax import evaluate
from koajax import train
from koajax.data import pipeline
from koajax.data import sources
from config_loader import smoke_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def run(data_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  result = subprocess.run(
      [sys.executable, '-m', 'koajax.main',
       '--config=configs/localizer.py:smoke', f'--workdir={workdir}',
       f'--config.data.root={data_root}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'landmarks test: {"centre_mean_mm"' in result.stdout
  return workdir


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
  # The CSV holds the float32 points to 7 digits.
  np.testing.assert_allclose(frame[[f'mm{k}' for k in range(16)]], d,
                             rtol=1e-5)
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
  assert len(val) == 2  # an evaluation after each epoch
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
