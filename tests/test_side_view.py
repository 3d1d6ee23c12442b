"""The coarse localiser's side view of a film (`preprocess.extract_side`),
checked against positions worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from koajax.data import preprocess


def test_bilateral_is_landscape_in_millimetres():
  assert preprocess.is_bilateral((150, 300), (1.0, 1.0))
  assert not preprocess.is_bilateral((300, 240), (1.0, 1.0))  # portrait
  assert not preprocess.is_bilateral((200, 200), (1.0, 1.0))
  # 200 x 300 pixels, but 0.5 x 1.0 mm rows: 100 mm tall, 300 mm wide.
  assert preprocess.is_bilateral((200, 300), (0.5, 1.0))
  assert not preprocess.is_bilateral((150, 300), (2.5, 1.0))


@pytest.mark.parametrize('side, bilateral, centre_x', [
    ('R', True, 74.5),  # middle of columns 0..149 of a 300 column film
    ('L', True, 224.5),  # middle of columns 150..299
    ('R', False, 149.5), ('L', False, 149.5)])
def test_the_view_centre_lies_on_the_sides_half(side, bilateral, centre_x):
  # 0.5 mm pixels, a 64 mm view at 64 px: two film pixels per view pixel.
  g = preprocess.side_geometry((100, 300), (0.5, 0.5), side,
                               bilateral=bilateral, view_mm=64.0, view_px=64)
  np.testing.assert_allclose(g.to_image([[31.5, 31.5]]),
                             [[centre_x, 49.5]], atol=1e-9)
  # One view pixel right is two film pixels right, or left for a left side.
  step = g.to_image([[32.5, 31.5]]) - g.to_image([[31.5, 31.5]])
  np.testing.assert_allclose(step, [[2.0 if side == 'R' else -2.0, 0.0]],
                             atol=1e-9)
  np.testing.assert_allclose(g.to_roi(g.to_image([[3.0, 7.0]])), [[3.0, 7.0]],
                             atol=1e-9)


def test_a_point_of_the_film_lands_where_its_keypoint_says():
  rows, cols = np.mgrid[0:120, 0:240]
  spots = {'R': (31.0, 41.0), 'L': (201.0, 71.0)}  # (x, y) on each half
  film = np.float32(10.0) + sum(
      1000.0 * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * 6.0 ** 2))
      for x, y in spots.values()).astype(np.float32)
  for side, (x, y) in spots.items():
    view, g = preprocess.extract_side(film, (1.0, 1.0), side, bilateral=True,
                                      view_mm=128.0, view_px=128)
    # By hand: the view's centre (63.5, 63.5) is the half's centre (59.5 or
    # 179.5, 59.5), one film pixel per view pixel, mirrored for L.
    cx = 59.5 if side == 'R' else 179.5
    want = (63.5 + (x - cx) * (1 if side == 'R' else -1), 63.5 + y - 59.5)
    np.testing.assert_allclose(g.to_roi([[x, y]])[0], want, atol=1e-9)
    # The spot's clipped top is round about its centre.
    r, c = np.nonzero(view == 255)
    np.testing.assert_allclose([c.mean(), r.mean()], want, atol=0.5)


def test_the_other_half_is_filled_with_the_background():
  film = np.zeros((100, 200), np.float32)
  film[:, :100] = np.linspace(0, 50, 100)[None, :]  # right knee's half
  film[:, 100:] = 900.0  # the left knee's half: bright
  view, g = preprocess.extract_side(film, (1.0, 1.0), 'R', bilateral=True,
                                    view_mm=200.0, view_px=200,
                                    background=0.0)
  x = g.to_image(np.stack([np.arange(200), np.zeros(200)], 1))[:, 0]
  beyond = x > 99.5
  assert beyond.any() and (~beyond).any()
  # The bright half never shows; beyond the film's middle is the fill.
  assert view[:, beyond].max() == 0
  assert view[:, ~beyond].max() == 255


def test_a_single_knee_film_is_shown_whole():
  film = np.zeros((200, 160), np.float32)
  film[:, 120:] = 900.0  # content right of the middle stays in view
  view, _ = preprocess.extract_side(film, (1.0, 1.0), 'R', bilateral=False,
                                    view_mm=200.0, view_px=100,
                                    background=0.0)
  assert (view == 255).any()
