"""The localiser's pieces: validation scores against NumPy by hand, the
evaluation shift of a view and its points, and the checks that keep the
landmark task, method and prediction settings together."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from koajax import cli
from koajax import methods
from koajax import tasks
from koajax.evaluation import landmarks
from koajax.train import checkpoints
from koajax.train import predictor


def test_scores_by_hand():
  true = np.zeros((2, 16, 2))
  pred = np.zeros((2, 16, 2))
  pred[0, 4] = (3.0, 4.0)   # 5 px: 2.5 mm at 0.5 mm/px
  pred[1, 0] = (30.0, 0.0)  # 15 mm: an outlier
  true[1, 15] = np.nan      # unknown: left out
  pred[1, 3] = np.nan       # lost: an outlier, infinitely far
  s = landmarks.scores(pred, true, (0.5, 0.5))
  d = np.zeros((2, 16))
  d[0, 4], d[1, 0], d[1, 3] = 2.5, 15.0, np.inf
  known = np.delete(d.ravel(), 31)  # knee 1, landmark 15
  assert s['landmarks/mean_mm'] == np.inf
  assert s['landmarks/centre_mm'] == pytest.approx(2.5 / 2)
  assert s['landmarks/within_2mm'] == pytest.approx((known < 2).mean())
  assert s['landmarks/outliers'] == pytest.approx(2 / 31)
  assert set(s) == set(landmarks.SCORE_NAMES)
  # The selection keeps the smallest errors and the largest recall.
  assert checkpoints.lower_is_better('landmarks/centre_mm')
  assert checkpoints.lower_is_better('landmarks/outliers')
  assert not checkpoints.lower_is_better('landmarks/within_2mm')


def test_shift_moves_content_and_points_by_the_shift():
  image = np.zeros((1, 9, 11), np.float32)
  image[0, 3, 4] = 255.0  # row 3, column 4: (x, y) = (4, 3)
  moved = np.asarray(predictor.shift_images(jnp.asarray(image),
                                            jnp.array([[2.0, -1.0]])))
  expected = np.zeros_like(image)
  expected[0, 2, 6] = 255.0  # (x, y) = (6, 2)
  np.testing.assert_allclose(moved, expected, atol=1e-4)


def test_knee_shifts_are_fixed_per_row_and_bounded():
  a = predictor.knee_shifts(np.array([5, 9, 11]), 8.0)
  b = predictor.knee_shifts(np.array([11, 5]), 8.0)
  np.testing.assert_array_equal(a[[2, 0]], b)  # the row's, in any batch
  assert a.shape == (3, 2) and np.all(np.abs(a) <= 8.0)
  assert len({tuple(r) for r in predictor.knee_shifts(np.arange(50), 8.0)}
             ) == 50


def test_the_landmark_task_and_method_go_together():
  task = tasks.get('landmarks')
  assert task.outputs == ('landmarks',) and task.view == 'keypoints'
  assert tasks.get('kl').outputs == ('kl',)
  with pytest.raises(cli.BadInput, match="task 'landmarks'"):
    methods.spec('landmarks').create(tasks.get('kl'))
  with pytest.raises(cli.BadInput, match="view='keypoints'"):
    methods.spec('landmarks').create(tasks.get('landmarks', view='whole'))
  with pytest.raises(ValueError, match='predict.shift'):
    predictor.check_settings(tasks.get('kl'), tta='none', tta_crop=0,
                             ensemble='probs', shift=4.0)
  with pytest.raises(ValueError, match='predict.crop=0'):
    predictor.check_settings(task, tta='five_crop', tta_crop=32,
                             ensemble='probs')


def test_a_lost_prediction_is_an_outlier_and_the_report_stays_json(tmp_path):
  true = np.zeros((2, 16, 2))
  pred = np.zeros((2, 16, 2))
  pred[1, 4] = np.nan  # knee 1 lost its joint centre
  result = landmarks.write_report(
      tmp_path, knee_ids=['a', 'b'], sides=['R', 'L'], pred=pred, true=true,
      spacing=(0.5, 0.5), pixels='test')
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  assert saved['outliers'] == pytest.approx(1 / 32)
  assert saved['centre']['mean_mm'] is None  # infinite: no JSON number
  assert saved['centre']['within_2mm'] == 0.5
  assert result['centre']['mean_mm'] == np.inf
