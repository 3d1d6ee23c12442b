"""Soft-argmax against NumPy, and where known maps put their landmark."""

import jax
import jax.numpy as jnp
import numpy as np

from koajax.models import heatmaps


def test_matches_the_softmax_mean_by_hand():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  points, probs = heatmaps.soft_argmax(jnp.asarray(logits), stride=4)
  for b in range(2):
    for k in range(3):
      e = np.exp(logits[b, :, :, k] - logits[b, :, :, k].max())
      p = e / e.sum()
      np.testing.assert_allclose(probs[b, :, :, k], p, rtol=1e-5, atol=1e-7)
      xs = 4 * (np.arange(7) + 0.5) - 0.5  # centres of the 4 px cells
      ys = 4 * (np.arange(5) + 0.5) - 0.5
      np.testing.assert_allclose(points[b, k], [(p.sum(0) * xs).sum(),
                                                (p.sum(1) * ys).sum()],
                                 rtol=1e-5)


def test_a_sharp_peak_gives_its_cell_centre_and_a_flat_map_the_middle():
  logits = np.zeros((1, 8, 16, 2), np.float32)
  logits[0, 2, 11, 0] = 50.0  # landmark 0: cell (row 2, column 11)
  points, _ = heatmaps.soft_argmax(jnp.asarray(logits), stride=4)
  # Cell 11 at stride 4 spans pixels 44-47, centre 45.5; row 2: 9.5.
  np.testing.assert_allclose(points[0, 0], [45.5, 9.5], atol=1e-4)
  # A 16 x 8 map at stride 4 covers 64 x 32 px: centre (31.5, 15.5).
  np.testing.assert_allclose(points[0, 1], [31.5, 15.5], atol=1e-4)


def test_gradient_descent_moves_the_point_to_the_truth():
  target = jnp.array([[[3.0, 17.0]]])

  def distance(l):
    points, _ = heatmaps.soft_argmax(l, stride=4)
    return jnp.abs(points - target).sum()

  logits = jnp.zeros((1, 6, 6, 1))  # starts at the middle, (11.5, 11.5)
  before = float(distance(logits))
  for _ in range(200):
    logits = logits - 2.0 * jax.grad(distance)(logits)
  assert abs(before - 14.0) < 1e-4 and float(distance(logits)) < 0.5
