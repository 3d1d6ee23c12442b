"""Tests for koajax.data.augment against independent NumPy/SciPy results."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy import stats

from koajax.data import augment

SEMIXUP_OFF = dict(noise_p=0.0, max_rotation_deg=0.0, pad_fraction=0.0,
                   gamma_p=0.0)


@pytest.fixture(scope='module')
def image() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)


def _scipy_similarity(image, angle_deg, translation, scale):
  """Inverse map of p -> c + t + s R p, built by hand for scipy."""
  t = np.deg2rad(angle_deg)
  rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  inv = rot.T / scale
  c = (np.array(image.shape) - 1) / 2
  offset = c - inv @ (c + np.asarray(translation))
  # JAX's 'constant' mode blends with the zero fill at the border, which is
  # SciPy's 'grid-constant'.
  return ndimage.affine_transform(image.astype(np.float64), inv, offset,
                                  order=1, mode='grid-constant', cval=0.0)


def _jit(fn, *args, **kwargs):
  """fn with fixed arguments, jitted: one compile instead of one per op."""
  return jax.jit(functools.partial(fn, *args, **kwargs))


semixup = _jit(augment.semixup_augment)
semixup_batch = _jit(augment.augment_batch, augment.semixup_augment)


@pytest.fixture(scope='module')
def pairs() -> jax.Array:
  return jax.random.randint(jax.random.key(0), (4, 2, 32, 32), 0, 256
                            ).astype(jnp.uint8)


def test_identity_parameters_reproduce_the_input(image):
  out = _jit(augment.semixup_augment, **SEMIXUP_OFF)(jax.random.key(0), image)
  # XLA may fuse the normalisation differently from eager mode: ulp-level.
  np.testing.assert_allclose(out, augment.normalise(image), rtol=0, atol=1e-6)
  out = _jit(augment.jitter_augment, max_translation=0.0, max_rotation_deg=0.0,
             scale_range=(1.0, 1.0))(jax.random.key(0), image)
  np.testing.assert_array_equal(out, image.astype(np.float32))


@pytest.mark.parametrize('angle,translation,scale', [
    (7.0, (2.5, -3.0), 1.0), (-10.0, (3.0, 1.0), 1.04), (90.0, (0, 0), 0.95)])
def test_warp_matches_scipy_affine_transform(image, angle, translation, scale):
  _, (matrix, offset) = augment.similarity(
      jnp.float32(angle), jnp.asarray(translation, jnp.float32),
      jnp.float32(scale), image.shape, image.shape)
  ours = augment.affine_warp(image, matrix, offset)
  want = _scipy_similarity(image, angle, translation, scale)
  np.testing.assert_allclose(ours, want, atol=2e-3 * 255)


def test_jitter_moves_keypoints_with_the_image():
  image = np.zeros((64, 64), np.float32)
  image[20:23, 40:43] = 255.0  # a dot centred at (x=41, y=21)
  jitter = jax.jit(augment.jitter_augment)
  rows, cols = np.indices(image.shape)
  for key in jax.random.split(jax.random.key(1), 8):
    out, kp = jitter(key, image, jnp.array([[41.0, 21.0]]))
    w = np.asarray(out) / np.sum(out)
    np.testing.assert_allclose(kp[0], [np.sum(w * cols), np.sum(w * rows)],
                               atol=0.1)


def test_gamma_and_noise_match_their_formulas():
  x = jnp.linspace(0.0, 255.0, 256)
  np.testing.assert_allclose(augment.gamma_correction(x, 2.0),
                             255 * np.sqrt(np.linspace(0, 1, 256)), rtol=1e-5)
  noise = jax.jit(augment.additive_gaussian_noise)(
      jax.random.key(0), jnp.zeros((256, 256)), 1.0)
  np.testing.assert_allclose([noise.min(), noise.max()], [0.0, 255.0],
                             atol=1e-3)
  # Min-max scaled N(0, 1) samples: still normal in shape, and the full
  # range spans about 8-10 standard deviations at this sample size.
  values = np.asarray(noise).ravel()
  assert abs(stats.skew(values)) < 0.05 and abs(stats.kurtosis(values)) < 0.1
  assert 7.5 < 255 / values.std() < 10.5


def test_noise_and_gamma_each_fire_with_probability_one_half():
  images = jnp.full((400, 16, 16), 100, jnp.uint8)
  out = _jit(augment.augment_batch, augment.semixup_augment,
             max_rotation_deg=0.0, pad_fraction=0.0)(jax.random.key(0), images)
  out = np.asarray(out) * 127.5 + 127.5
  # Noise makes a flat image uneven; gamma alone moves its level.
  noised = np.ptp(out, axis=(1, 2)) > 1e-3
  gamma_only = ~noised & (np.abs(out[:, 0, 0] - 100.0) > 1e-3)
  assert 0.42 < noised.mean() < 0.58
  assert 0.38 < gamma_only.sum() / (~noised).sum() < 0.62
  # Gains are uniform in [0, 0.3]: with gamma off, a grey image moves towards
  # the noise by at most 30% of the 8-bit range.
  noise_only = noised & (np.abs(np.median(out, axis=(1, 2)) - 100.0) < 15.0)
  assert noise_only.sum() > 50
  assert np.abs(out[noise_only] - 100.0).max() <= 0.3 * 255 + 1e-3


def test_output_range_and_shape(pairs):
  out = semixup_batch(jax.random.key(1), pairs)
  assert out.shape == pairs.shape and out.dtype == jnp.float32
  assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0


def test_same_key_same_output_and_channels_differ(pairs):
  pair = jnp.stack([pairs[0, 0], pairs[0, 0]])
  a = semixup(jax.random.key(3), pair)
  b = semixup(jax.random.key(3), pair)
  c = semixup(jax.random.key(4), pair)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])  # each patch gets its own draw


def test_vmap_equals_a_per_sample_loop(pairs):
  key = jax.random.key(7)
  keys = jax.random.split(key, len(pairs))
  batched = semixup_batch(key, pairs)
  looped = [semixup(k, x) for k, x in zip(keys, pairs)]
  np.testing.assert_allclose(batched, np.stack(looped), atol=1e-5)
  images, kp = pairs[:, 0], jnp.zeros((len(pairs), 16, 2))
  batched, _ = _jit(augment.augment_batch, augment.jitter_augment)(
      key, images, kp)
  jitter = jax.jit(augment.jitter_augment)
  looped = [jitter(k, x) for k, x in zip(keys, images)]
  np.testing.assert_allclose(batched, np.stack(looped), atol=1e-4)


def test_jit_does_not_retrace(pairs):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def two_views(key, images):
    k1, k2 = jax.random.split(key)
    return (augment.augment_batch(augment.semixup_augment, k1, images),
            augment.augment_batch(augment.semixup_augment, k2, images))

  for seed in range(3):
    v1, v2 = two_views(jax.random.key(seed), pairs + seed)
    assert not np.array_equal(v1, v2)


def test_augment_parts_draw_what_the_concatenated_batch_would():
  rng = np.random.default_rng(0)
  parts = [rng.integers(0, 256, (n, 2, 16, 16), dtype=np.uint8)
           for n in (2, 3)]
  key = jax.random.key(7)
  whole = jax.jit(functools.partial(augment.augment_batch,
                                    augment.semixup_augment))(
                                        key, np.concatenate(parts))
  got = jax.jit(functools.partial(augment.augment_parts,
                                  augment.semixup_augment))(key, parts)
  assert [g.shape[0] for g in got] == [2, 3]
  np.testing.assert_array_equal(np.concatenate(got), whole)
