"""On-device image augmentation: pure JAX functions of (key, image).

Each augmentation samples its parameters from a PRNG key and applies them with
jnp ops, so it runs inside the jitted train step, one `jax.vmap` covers a
batch, and drawing two independent views of a batch (consistency losses) only
costs two calls with two keys. Geometric parts are composed into one affine
map and resampled once (bilinear, zero fill), which is both cheaper and
sharper than warping twice.

  semixup_augment  Semixup Suppl. Table S1 (the SOLT stream of the reference
                   code), in order: Gaussian noise p 0.5 gain 0.3, rotation
                   p 1 +-10 deg, pad 5% + random crop back to the input size,
                   gamma p 0.5 in [0.5, 1.5], normalise to [-1, 1].
  crop_augment     multi-task OARSI grading (the KneeOARSIGrading stream):
                   Gaussian noise p 0.5 gain 0.3, rotation +-10 deg, a
                   random crop to the network's size (300 of 310 px), gamma
                   p 0.5 in [0.5, 1.5], normalise to [-1, 1].
  jitter_augment   translation / rotation / scale jitter (coherence learning:
                   +-10 px, +-5 deg, 0.95..1.05), keypoints moved along.

Images are (H, W) or (C, H, W) with values in [0, 255] (any dtype); results
are float32. Coordinates are (row, col) pixel indices inside, keypoints (x, y)
outside, as in `koajax.data.views`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def normalise(image: Array) -> Array:
  """(x / 255 - 0.5) / 0.5: [0, 255] -> [-1, 1]."""
  return (jnp.asarray(image, jnp.float32) / 255.0 - 0.5) / 0.5


def affine_warp(image: Array, matrix: Array, offset: Array,
                out_shape: tuple[int, int] | None = None) -> Array:
  """out[o] = image[matrix @ o + offset], bilinear, zero outside the image.

  The convention of scipy.ndimage.affine_transform(order=1,
  mode='grid-constant'): `matrix` and `offset` map output (row, col)
  coordinates to input coordinates, and samples within a pixel of the border
  blend with the zero fill (as cv2.warpAffine does). `image` is (H, W); the
  result is float32 `out_shape`.
  """
  out_shape = image.shape if out_shape is None else out_shape
  grid = jnp.stack(jnp.meshgrid(jnp.arange(out_shape[0], dtype=jnp.float32),
                                jnp.arange(out_shape[1], dtype=jnp.float32),
                                indexing='ij')).reshape(2, -1)
  src = matrix @ grid + offset[:, None]
  out = jax.scipy.ndimage.map_coordinates(
      jnp.asarray(image, jnp.float32), [src[0], src[1]], order=1,
      mode='constant', cval=0.0)
  return out.reshape(out_shape)


def _rotation(angle_deg: Array) -> Array:
  """Rotates (row, col) vectors; positive is counter-clockwise on screen."""
  t = jnp.deg2rad(angle_deg)
  c, s = jnp.cos(t), jnp.sin(t)
  return jnp.array([[c, -s], [s, c]])


def similarity(angle_deg: Array, translation: Array, scale: Array,
               in_shape: tuple[int, int], out_shape: tuple[int, int]
               ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
  """The forward map p -> c_out + t + s R (p - c_in), and its inverse.

  Rotation and scale act about the image centres; `translation` is
  (rows, cols) in output pixels. Returns (forward (A, b), inverse (A', b'))
  with p_out = A p_in + b and p_in = A' p_out + b'; `affine_warp` takes the
  inverse.
  """
  c_in = (jnp.array(in_shape, jnp.float32) - 1) / 2
  c_out = (jnp.array(out_shape, jnp.float32) - 1) / 2
  fwd = scale * _rotation(angle_deg)
  inv = _rotation(angle_deg).T / scale
  fwd_offset = c_out + translation - fwd @ c_in
  inv_offset = c_in - inv @ (c_out + translation)
  return (fwd, fwd_offset), (inv, inv_offset)


def _each_channel(fn: Callable[[Array, Array], Array], key: Array,
                  image: Array) -> Array:
  """fn(key, (H, W)) on an (H, W) image, or on each channel with its own key."""
  if image.ndim == 2:
    return fn(key, image)
  return jax.vmap(fn)(jax.random.split(key, image.shape[0]), image)


def additive_gaussian_noise(key: Array, image: Array, gain: Array) -> Array:
  """(1 - gain) x + gain n, n = N(0, 1) noise min-max scaled to [0, 255].

  This is SOLT's ImageAdditiveGaussianNoise: the noise image is stretched
  to the full 8-bit range before blending, so it also lowers contrast.
  """
  noise = jax.random.normal(key, image.shape, jnp.float32)
  noise = (noise - noise.min()) / (noise.max() - noise.min()) * 255.0
  return (1.0 - gain) * image + gain * noise


def gamma_correction(image: Array, gamma: Array) -> Array:
  """255 (x / 255) ** (1 / gamma): gamma > 1 brightens (SOLT's LUT)."""
  return 255.0 * (jnp.clip(image, 0.0, 255.0) / 255.0) ** (1.0 / gamma)


def _maybe_noise(key: Array, image: Array, u: Array, *, noise_p: Any,
                 noise_gain: float) -> Array:
  """Gaussian noise of gain noise_gain u[0] where u[1] < noise_p; `where`
  keeps the other images bit-exact. A Python noise_p of 0 draws no noise at
  all (a method without noise would pay for a full-size normal draw)."""
  if isinstance(noise_p, (int, float)) and noise_p <= 0:
    return image
  noisy = additive_gaussian_noise(key, image, noise_gain * u[0])
  return jnp.where(u[1] < noise_p, noisy, image)


def _semixup_one(key: Array, image: Array, *, noise_p: float = 0.5,
                 noise_gain: float = 0.3, max_rotation_deg: float = 10.0,
                 pad_fraction: float = 0.05, gamma_p: float = 0.5,
                 gamma_range: tuple[float, float] = (0.5, 1.5)) -> Array:
  k_params, k_noise = jax.random.split(key)
  # One draw for all scalar parameters: each random call site compiles to
  # its own threefry kernel, and those dominate compile time on CPU.
  u = jax.random.uniform(k_params, (7,))
  image = jnp.asarray(image, jnp.float32)
  shape = image.shape

  # 1. Noise with probability noise_p.
  image = _maybe_noise(k_noise, image, u, noise_p=noise_p,
                       noise_gain=noise_gain)

  # 2-4. Rotation about the centre, then zero padding by pad_fraction and a
  # random crop back to `shape`: the crop is an integer shift of up to half
  # the padding each way, so all three are one similarity warp. (SOLT draws
  # crop corners from [0, pad), one short of symmetric; we keep it symmetric.
  # SOLT also rounds to uint8 after every step; we stay in float32.)
  angle = max_rotation_deg * (2.0 * u[2] - 1.0)
  half_pad = jnp.array([(int(n * (1 + pad_fraction)) - n) // 2 for n in shape],
                       jnp.float32)
  shift = jnp.floor(u[3:5] * (2.0 * half_pad + 1.0)) - half_pad
  _, (matrix, offset) = similarity(angle, shift, 1.0, shape, shape)
  image = affine_warp(image, matrix, offset)

  # 5. Gamma with probability gamma_p.
  gamma = gamma_range[0] + (gamma_range[1] - gamma_range[0]) * u[5]
  image = jnp.where(u[6] < gamma_p, gamma_correction(image, gamma), image)
  return normalise(image)


def semixup_augment(key: Array, image: Array, **kwargs: Any) -> Array:
  """Semixup's training augmentation (Suppl. Table S1) -> float32 in [-1, 1].

  For a (C, H, W) input, e.g. the (2, 128, 128) Siamese pair, every channel
  gets its own draw, as the reference code augments the two patches
  separately. Keyword arguments (noise_p, noise_gain, max_rotation_deg,
  pad_fraction, gamma_p, gamma_range) override Table S1's values; with both
  probabilities, the rotation and the padding at 0 it returns
  `normalise(image)` exactly.
  """
  return _each_channel(functools.partial(_semixup_one, **kwargs), key, image)


def crop_augment(key: Array, image: Array, *, crop: int,
                 noise_p: float = 0.5, noise_gain: float = 0.3,
                 max_rotation_deg: float = 10.0, gamma_p: float = 0.5,
                 gamma_range: tuple[float, float] = (0.5, 1.5)) -> Array:
  """Multi-task OARSI training augmentation of an (H, W) knee -> (crop, crop)
  float32 in [-1, 1].

  Noise, then rotation about the centre and a random crop at an integer
  offset (0..H - crop, one warp, as in `_semixup_one`), then gamma. With both
  probabilities and the rotation at 0 it is `normalise` of a plain crop.
  """
  h, w = image.shape
  if not (0 < crop <= h and crop <= w):
    raise ValueError(f'cannot crop {crop} px from a {h}x{w} px view')
  k_params, k_noise = jax.random.split(key)
  u = jax.random.uniform(k_params, (7,))  # one draw: see _semixup_one
  image = jnp.asarray(image, jnp.float32)
  image = _maybe_noise(k_noise, image, u, noise_p=noise_p,
                       noise_gain=noise_gain)
  angle = max_rotation_deg * (2.0 * u[2] - 1.0)
  # The crop's top-left corner, uniform over the whole offsets; as a shift
  # of the output centre from the input centre.
  corner = jnp.floor(u[3:5] * (jnp.array([h, w], jnp.float32) - crop + 1.0))
  shift = (jnp.array([h, w], jnp.float32) - crop) / 2.0 - corner
  _, (matrix, offset) = similarity(angle, shift, 1.0, (h, w), (crop, crop))
  image = affine_warp(image, matrix, offset, out_shape=(crop, crop))
  gamma = gamma_range[0] + (gamma_range[1] - gamma_range[0]) * u[5]
  image = jnp.where(u[6] < gamma_p, gamma_correction(image, gamma), image)
  return normalise(image)


def jitter_augment(key: Array, image: Array, keypoints: Array | None = None,
                   *, max_translation: float = 10.0,
                   max_rotation_deg: float = 5.0,
                   scale_range: tuple[float, float] = (0.95, 1.05),
                   out_shape: tuple[int, int] | None = None
                   ) -> Array | tuple[Array, Array]:
  """Random similarity jitter, one draw shared by all channels of `image`.

  Translation is uniform in +-max_translation px per axis, the rotation in
  +-max_rotation_deg, the scale in scale_range, about the image centre.
  Returns the float32 image (values still in [0, 255]; normalise as the model
  expects), and if `keypoints` ((K, 2) x, y) is given, the moved keypoints.
  """
  in_shape = image.shape[-2:]
  out_shape = in_shape if out_shape is None else out_shape
  u = jax.random.uniform(key, (4,))  # one draw: see _semixup_one
  shift = max_translation * (2.0 * u[:2] - 1.0)
  angle = max_rotation_deg * (2.0 * u[2] - 1.0)
  scale = scale_range[0] + (scale_range[1] - scale_range[0]) * u[3]
  (fwd, fwd_offset), (inv, inv_offset) = similarity(
      angle, shift, scale, in_shape, out_shape)
  warp = functools.partial(affine_warp, matrix=inv, offset=inv_offset,
                           out_shape=out_shape)
  out = warp(image) if image.ndim == 2 else jax.vmap(warp)(image)
  if keypoints is None:
    return out
  rows_cols = keypoints[:, ::-1] @ fwd.T + fwd_offset
  return out, rows_cols[:, ::-1]


def augment_batch(fn: Callable[..., Any], key: Array, images: Array,
                  *batched: Array, **kwargs: Any) -> Any:
  """Applies fn(key_i, images[i], *batched[i], **kwargs) with per-sample keys.

  A thin `jax.vmap` over `jax.random.split(key, len(images))`; call it inside
  the jitted step so sampling and warping fuse with the model.
  """
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(functools.partial(fn, **kwargs))(keys, images, *batched)


def augment_parts(fn: Callable[..., Array], key: Array,
                  parts: Sequence[Array], **kwargs: Any) -> tuple[Array, ...]:
  """`augment_batch(fn, key, concatenate(parts))` returned as its parts:
  the same draw for every sample, without concatenating the parts (which
  would move samples between the devices a batch is sharded over)."""
  keys = jax.random.split(key, sum(p.shape[0] for p in parts))
  fn = jax.vmap(functools.partial(fn, **kwargs))
  starts = np.cumsum([0] + [p.shape[0] for p in parts])
  return tuple(fn(keys[a:b], p) for a, b, p in zip(starts, starts[1:], parts))
