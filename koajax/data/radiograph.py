"""Rendering of synthetic bilateral posterior-anterior knee radiographs.

The bones are the signed-distance fields of `koajax.data.anatomy`.

Speed comes from evaluating the fields on a coarse grid (about 0.6 mm) and
interpolating the distances, not the intensities, to the detector grid: edges
stay sharp and the joint gap keeps sub-pixel accuracy. Only thin, sharp
details (cortical rims, trabecular texture, detector noise) are computed at
full resolution, and only in each bone's bounding box.

The image is an X-ray projection: attenuation (soft tissue, bone, sclerosis)
is summed along the beam, detector noise grows where less signal arrives, and
a site-specific tone curve maps the log signal to stored values, bone bright
(MONOCHROME2 orientation; the DICOM writer inverts for MONOCHROME1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy import special

from koajax.data import anatomy

Array = np.ndarray

# Attenuation per mm in excess of water, arbitrary log units.
_MU_CORTEX = 0.05
_MU_TRABECULAR = 0.012
_MU_MUSCLE = 0.020
_MU_FAT = 0.015
_COARSE_MM = 0.6  # coarse grid spacing of the distance fields


def _upsample_rows(a: Array, k: int) -> Array:
  """Linear interpolation along axis 0 by an integer factor, ends aligned."""
  out = np.empty(((a.shape[0] - 1) * k + 1,) + a.shape[1:], np.float32)
  step = a[1:] - a[:-1]
  for j in range(k):
    # Strided writes of whole contiguous rows are the fast direction.
    np.multiply(step, np.float32(j / k), out=out[j:-1:k])
    out[j:-1:k] += a[:-1]
  out[-1] = a[-1]
  return out


def _upsample(a: Array, k: int) -> Array:
  """Bilinear interpolation by an integer factor, corners aligned."""
  cols = _upsample_rows(np.ascontiguousarray(a.T, np.float32), k)
  return _upsample_rows(np.ascontiguousarray(cols.T), k)


def _gaussian_table(n: int = 65536) -> Array:
  """Standard normal quantiles, so that noise costs one integer draw."""
  return special.ndtri((np.arange(n) + 0.5) / n).astype(np.float32)


_NORMAL = _gaussian_table()


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
  """Standard normal float32 noise (65536-level quantised, 3x faster)."""
  return np.take(_NORMAL, rng.integers(0, len(_NORMAL), shape, np.uint16))


def _chord(e: Array, radius: Array | float) -> Array:
  """Path length through a cylinder of `radius` at depth `e` from its edge."""
  e = np.clip(e, 0.0, radius)
  return np.sqrt(e * (2.0 * radius - e))


def _bone(e: Array, cortex: Array | float, radius: float,
          texture: Array | float) -> Array:
  """Attenuation of a tubular bone: cortical shell around cancellous bone.

  The shell's projection peaks just inside the edge, which is why cortical
  rims look brighter than the bone they surround.
  """
  inner = _chord(e - cortex, radius - cortex)
  outer = _chord(e, radius)
  return _MU_CORTEX * (outer - inner) + _MU_TRABECULAR * inner * (1 + texture)


def _texture(rng: np.random.Generator, shape: tuple[int, int],
             spacing: float) -> Array:
  """Band-passed noise with vertical grain, like trabecular bone (unit SD)."""
  half = (shape[0] // 2 + 2, shape[1] // 2 + 2)
  noise = _normal(rng, half)
  px = 2 * spacing  # the texture is made at half resolution
  fine = ndimage.gaussian_filter(noise, (0.4 / px, 0.2 / px), mode='wrap')
  coarse = ndimage.uniform_filter(fine, int(round(2.0 / px)) | 1, mode='wrap')
  band = fine - coarse
  band /= band.std() + 1e-6
  return _upsample(band, 2)[:shape[0], :shape[1]]


@dataclasses.dataclass
class _Canvas:
  """The coarse grid and the full-resolution attenuation image."""
  detector: anatomy.Detector
  k: int  # coarse step in pixels
  x: Array  # coarse grid x (mm), (1, Wc)
  y: Array  # coarse grid y (mm), (Hc, 1)
  smooth: Array  # coarse attenuation (Hc, Wc)
  full: Array  # full-resolution attenuation (H, W)

  @classmethod
  def create(cls, detector: anatomy.Detector) -> _Canvas:
    h, w = detector.shape
    k = max(1, int(round(_COARSE_MM / detector.spacing)))
    hc, wc = -(-(h - 1) // k) + 1, -(-(w - 1) // k) + 1
    step = k * detector.spacing
    grid = lambda n: (np.arange(n) * step).astype(np.float32)  # noqa: E731
    return cls(detector, k, grid(wc)[None, :], grid(hc)[:, None],
               np.zeros((hc, wc), np.float32),
               np.zeros((h, w), np.float32))

  def columns(self, centre_mm: float, half_mm: float) -> slice:
    """Coarse columns within `half_mm` of `centre_mm`."""
    step = self.k * self.detector.spacing
    lo = max(int((centre_mm - half_mm) / step), 0)
    hi = min(int((centre_mm + half_mm) / step) + 2, self.x.shape[1])
    return slice(lo, hi)

  def paste_bone(self, sdf: Array, window: tuple[slice, slice],
                 radius: float, cortex: Callable[[Array], Array],
                 density: float, rng: np.random.Generator) -> None:
    """Adds one bone, from its coarse distance field, at full resolution.

    Args:
      sdf: coarse signed distance (image mm) on the coarse `window`.
      window: (rows, columns) slices of the coarse grid.
      radius: effective radius (mm) of the bone's cross-section.
      cortex: cortical thickness (mm) as a function of image y (mm).
      density: bone density factor.
      rng: random generator for the trabecular texture.
    """
    inside = np.nonzero(sdf < self.k * self.detector.spacing)
    if not inside[0].size:
      return
    h, w = self.full.shape
    r0, r1 = max(inside[0].min() - 1, 0), inside[0].max() + 2
    c0, c1 = max(inside[1].min() - 1, 0), inside[1].max() + 2
    y0 = (window[0].start + r0) * self.k
    x0 = (window[1].start + c0) * self.k
    e = -_upsample(sdf[r0:r1, c0:c1], self.k)[:h - y0, :w - x0]
    rows_mm = (y0 + np.arange(e.shape[0], dtype=np.float32)[:, None]
               ) * self.detector.spacing
    tex = self.detector.texture * _texture(rng, e.shape, self.detector.spacing)
    self.full[y0:y0 + e.shape[0], x0:x0 + e.shape[1]] += density * _bone(
        e, cortex(rows_mm), radius, tex)


def _soft_tissue(u: Array, v: Array, shape: anatomy.KneeShape) -> Array:
  """Attenuation of the leg as an elliptic cylinder of fat around muscle."""
  width = shape.leg_half_width * (1.0 + 0.1 * np.tanh(-v / 50.0))
  du = u - 2.0
  depth = 0.92  # anterior-posterior / medio-lateral half axes
  outer = 2 * depth * np.sqrt(np.maximum(width**2 - du**2, 0.0))
  core = np.maximum(width - shape.fat, 1.0)
  inner = 2 * depth * np.sqrt(np.maximum(core**2 - du**2, 0.0))
  return _MU_FAT * outer + (_MU_MUSCLE - _MU_FAT) * inner


def _band(e: Array, depth: float) -> Array:
  """A subchondral band: zero at the surface, peak 1 at `depth` inside."""
  x = np.maximum(e, 0.0) / depth
  return x * np.exp(1.0 - x)


def _compartment_window(u: Array, lo: float, hi: float) -> Array:
  return anatomy.sigmoid((u - lo) / 1.5) * anatomy.sigmoid((hi - u) / 1.5)


def _shaft_cortex(y0: float, scale: float,
                  sign: float) -> Callable[[Array], Array]:
  """Cortex thickness: a thin subchondral plate, thick down the shaft.

  Args:
    y0: image y (mm) of the joint.
    scale: knee scale.
    sign: +1 for a bone below the joint, -1 above.
  """
  def cortex(y: Array) -> Array:
    dist = sign * (y - y0) / scale
    return scale * (0.8 + 3.0 * anatomy.sigmoid((dist - 50.0) / 8.0))
  return cortex


def _window(canvas: _Canvas, frames: anatomy.Frames, u: tuple[float, float],
            v: tuple[float, float]) -> tuple[slice, slice]:
  """Coarse rows and columns covering a box of the knee frame."""
  corners = np.array([(a, b) for a in u for b in v], np.float64)
  x, y = frames.from_knee(corners[:, 0], corners[:, 1])
  step = canvas.k * canvas.detector.spacing
  hc, wc = canvas.smooth.shape
  rows = slice(int(np.clip(y.min() // step, 0, hc)),
               int(np.clip(y.max() // step + 2, 0, hc)))
  cols = slice(int(np.clip(x.min() // step, 0, wc)),
               int(np.clip(x.max() // step + 2, 0, wc)))
  return rows, cols


def _draw_knee(canvas: _Canvas, knee: anatomy.Knee, rng: np.random.Generator) -> None:
  frames = anatomy.knee_frames(knee)
  shape, disease, pose = knee.shape, knee.disease, knee.pose
  s = frames.scale
  w_l, w_m = shape.tibia_half_width
  c_l, c_m = shape.condyle_centre
  scl = anatomy.sclerosis(disease)

  def grid(window):
    return frames.to_knee(canvas.x[:, window[1]], canvas.y[window[0]])

  def add_smooth(window, values):
    canvas.smooth[window] += values.astype(np.float32)

  # Each field is evaluated only in a box around its bone.
  win = _window(canvas, frames, (-62.0, 62.0), (-16.0, 250.0))
  u, v = grid(win)
  tibia = anatomy.tibia_sdf(u, v, shape, disease)
  canvas.paste_bone((tibia * s).astype(np.float32), win, 22.0 * s,
                    _shaft_cortex(pose.y, s, 1.0), shape.density, rng)
  for (lo, hi), level in zip(((-w_l - 3, -7.0), (7.0, w_m + 3)), scl):
    if level > 0:
      add_smooth(win, (0.9 * level * s) * _compartment_window(u, lo, hi)
                 * _band(-tibia, 3.5))

  win = _window(canvas, frames, (-64.0, 64.0), (-250.0, 16.0))
  uf, vf = frames.knee_to_femur(*grid(win))
  femur = anatomy.femur_sdf(uf, vf, shape, disease)
  canvas.paste_bone((femur * s).astype(np.float32), win, 22.0 * s,
                    _shaft_cortex(pose.y, s, -1.0), shape.density, rng)
  for (lo, hi), level in zip(((c_l - 18, c_l + 12), (c_m - 12, c_m + 18)),
                             scl):
    if level > 0:
      add_smooth(win, (0.9 * level * s) * _compartment_window(uf, lo, hi)
                 * _band(-femur, 3.0))
  # The patella is faint and blurred: it lies far from the detector.
  pu, pv, pa, pb = shape.patella
  patella = -anatomy.ellipse_sdf(uf, vf, (pu, pv), pa, pb)
  add_smooth(win, 0.55 * shape.density * s * _bone(patella, 1.0, 12.0, 0.0))

  win = _window(canvas, frames, (-64.0, -16.0), (-2.0, 250.0))
  fibula = anatomy.fibula_sdf(*grid(win), shape, pose)
  canvas.paste_bone((fibula * s).astype(np.float32), win, 8.0 * s,
                    lambda y: np.float32(0.9 * s), shape.density, rng)

  # The leg spans the knee's half of the image (plus a margin).
  cols = canvas.columns(pose.x, canvas.detector.width_mm / 4 + 20.0)
  win = (slice(None), cols)
  add_smooth(win, _soft_tissue(*grid(win), shape) * s)


def _collimation(canvas: _Canvas) -> Array | float:
  """Attenuation of collimator blades visible at the image borders."""
  det = canvas.detector
  edges = []
  for margin, dist in zip(det.collimation, (
      -canvas.y, canvas.y - det.height_mm, -canvas.x,
      canvas.x - det.width_mm)):
    if margin > 0:
      edges.append(anatomy.sigmoid((dist + margin) / 0.8))
  if not edges:
    return 0.0
  # Scatter keeps collimated areas a little below bone in brightness.
  return 3.2 * functools.reduce(np.maximum, edges)


def _tone_curve(det: anatomy.Detector, n: int) -> tuple[Array, float]:
  """Lookup table from quantised attenuation to stored values."""
  top = 2**det.bits - 1
  t = (np.arange(n) + 0.5) / n * 1.15
  stored = top * (det.black + (det.white - det.black) * t**det.gamma)
  return np.clip(np.rint(stored), 0, top).astype(np.uint16), n / (
      1.15 * det.signal_range)


def _acquire(canvas: _Canvas, rng: np.random.Generator) -> Array:
  """Detector: heel effect, collimation, noise and the tone curve."""
  det = canvas.detector
  h, w = canvas.full.shape
  coarse = canvas.smooth + det.heel * (canvas.y / det.height_mm - 0.5)
  coarse = (coarse + _collimation(canvas)).astype(np.float32)
  att = _upsample(coarse, canvas.k)[:h, :w]
  att += canvas.full
  att *= det.contrast
  # Quantum noise: fewer photons arrive behind more attenuation.
  noise = _normal(rng, (h, w))
  noise *= np.exp(0.5 * att)
  noise *= det.noise
  att += noise
  lut, per_unit = _tone_curve(det, 8192)
  index = np.multiply(att, per_unit, out=att).astype(np.int32)
  np.clip(index, 0, len(lut) - 1, out=index)
  return np.take(lut, index)


def render(knees: Sequence[anatomy.Knee], detector: anatomy.Detector,
           rng: np.random.Generator) -> tuple[Array, Array]:
  """Renders a radiograph with the given knees.

  Args:
    knees: the knees in the image (usually right and left).
    detector: acquisition parameters.
    rng: randomness of texture and noise.

  Returns:
    (pixels, points): uint16 (H, W) stored values with bone bright, and
    float (len(knees), 16, 2) landmark (x, y) pixel coordinates.
  """
  canvas = _Canvas.create(detector)
  for knee in knees:
    _draw_knee(canvas, knee, rng)
  pixels = _acquire(canvas, rng)
  points = np.stack([anatomy.landmarks(k, detector.spacing) for k in knees])
  return pixels, points
