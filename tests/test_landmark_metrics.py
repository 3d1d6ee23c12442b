"""KNEEL's landmark figures, checked on offsets whose distances are known
by construction."""

import math

import numpy as np
import pytest

from koajax.evaluation import landmarks


def _knees():
  """Two knees; every landmark's true distance in mm is chosen, then turned
  into a pixel offset along x (0.2 mm/px columns) or y (0.5 mm/px rows)."""
  true = np.stack([np.arange(32, dtype=float).reshape(16, 2)] * 2)
  want_mm = np.array([
      [0.5, 1.2, 1.7, 2.2, 0.9, 3.0, 0.1, 0.0, 1.4,  # tibia
       0.8, 2.6, 1.0, 12.0, 0.3, 1.6, 2.4],  # femur
      [0.0, 0.4, 0.9, 1.1, 2.1, 1.9, 2.5, 0.2, 0.7,
       4.0, 0.6, 0.2, 0.1, 1.3, 1.8, 2.1]])
  pred = true.copy()
  pred[0, :, 0] += want_mm[0] / 0.2  # knee 0 moves along x (columns)
  pred[1, :, 1] += want_mm[1] / 0.5  # knee 1 along y (rows)
  return pred, true, want_mm


def test_distances_apply_the_spacing_per_axis():
  pred, true, want_mm = _knees()
  d = landmarks.distances_mm(pred, true, (0.5, 0.2))
  np.testing.assert_allclose(d, want_mm, atol=1e-12)
  # A diagonal offset of (3, 4) px at 1 mm/px is 5 mm.
  assert landmarks.distances_mm([[[3.0, 4.0]]], [[[0.0, 0.0]]],
                                (1.0, 1.0))[0, 0] == pytest.approx(5.0)


def test_report_counts_as_kneel_does():
  pred, true, want_mm = _knees()
  r = landmarks.report(pred, true, np.array([[0.5, 0.2]] * 2))
  tibia, femur = want_mm[:, :9].ravel(), want_mm[:, 9:].ravel()
  for radius in (1.0, 1.5, 2.0, 2.5):
    assert r['recall']['tibia'][f'{radius:g}mm'] == pytest.approx(
        np.mean(tibia < radius))
    assert r['recall']['femur'][f'{radius:g}mm'] == pytest.approx(
        np.mean(femur < radius))
  # By hand: 4 + 5 of the 18 tibial values are below 1 mm.
  assert r['recall']['tibia']['1mm'] == pytest.approx(9 / 18)
  assert r['outliers'] == pytest.approx(1 / 32)  # the 12 mm femoral point
  assert r['knees_with_outlier'] == pytest.approx(0.5)
  assert r['centre']['mean_mm'] == pytest.approx((0.9 + 2.1) / 2)
  assert r['centre']['within_2mm'] == pytest.approx(0.5)
  assert r['per_landmark_mean_mm'][12] == pytest.approx((12.0 + 0.1) / 2)
  assert r['mean_mm']['femur'] == pytest.approx(femur.mean())


def test_missing_truth_is_left_out_and_a_lost_prediction_is_an_outlier():
  pred, true, _ = _knees()
  true[1, 3] = np.nan  # no true landmark 3 on knee 1
  pred[0, 0] = np.nan  # the localiser lost landmark 0 on knee 0
  d = landmarks.distances_mm(pred, true, (0.5, 0.2))
  assert math.isnan(d[1, 3]) and math.isinf(d[0, 0])
  r = landmarks.report(pred, true, (0.5, 0.2))
  assert r['outliers'] == pytest.approx(2 / 31)
  # Knee 0 loses a 0.5 mm point, knee 1 drops its 1.1 mm one: 8 of 17.
  assert r['recall']['tibia']['1mm'] == pytest.approx(8 / 17)


def test_shapes_must_match():
  with pytest.raises(ValueError, match='must both be'):
    landmarks.distances_mm(np.zeros((2, 16, 2)), np.zeros((2, 15, 2)),
                           (1.0, 1.0))
