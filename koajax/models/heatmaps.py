"""Landmark coordinates from heatmaps: a spatial softmax and its mean.

A landmark network predicts one map of logits per landmark; the softmax
over the map's cells is a distribution over where the landmark is, and its
mean (soft-argmax) is a sub-pixel position that is differentiable, so the
network trains on the coordinate error directly (KNEEL's choice) rather
than on a rendered target heatmap.

Coordinates are input pixels, (x, y), with pixel centres at integers (the
cache's keypoint convention). A map at stride s covers input pixels
[s j, s (j + 1)) in cell j, whose centre is s (j + 0.5) - 0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cell_centres(cells: int, stride: int) -> jax.Array:
  """Input-pixel coordinate of the centre of each of `cells` map cells."""
  return stride * (jnp.arange(cells, dtype=jnp.float32) + 0.5) - 0.5


def soft_argmax(logits: jax.Array, *, stride: int) -> tuple[jax.Array,
                                                             jax.Array]:
  """(points, probabilities) of (B, h, w, K) heatmap logits.

  Returns:
    points: (B, K, 2) float32 (x, y) in input pixels.
    probabilities: (B, h, w, K) float32, each map summing to 1.
  """
  b, h, w, k = logits.shape
  flat = logits.astype(jnp.float32).reshape(b, h * w, k)
  probs = jax.nn.softmax(flat, axis=1).reshape(b, h, w, k)
  x = jnp.einsum('bhwk,w->bk', probs, cell_centres(w, stride))
  y = jnp.einsum('bhwk,h->bk', probs, cell_centres(h, stride))
  return jnp.stack([x, y], axis=-1), probs
