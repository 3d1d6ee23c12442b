"""Rendering of synthetic bilateral posterior-anterior knee radiographs.

Each knee is drawn in its own frame (millimetres): u runs from the lateral to
the medial side, v downwards, the origin is the middle of the tibial plateau
between the tibial spines. Bones are signed-distance fields (negative inside):
the tibia with its plateau and spines, the femur with two condyles and the
intercondylar notch, the fibula below the lateral plateau, the patella over the
distal femur. The femur sits on the tibia so that each compartment's gap
equals its joint-space width, which tilts it when one side narrows.

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
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy import special

from koajax.data import schema

Array = np.ndarray

# Attenuation per mm in excess of water, arbitrary log units.
_MU_CORTEX = 0.05
_MU_TRABECULAR = 0.012
_MU_MUSCLE = 0.020
_MU_FAT = 0.015
_COARSE_MM = 0.6  # coarse grid spacing of the distance fields
_NOTCH_DEPTH = 10.0  # the notch ellipse's centre lies this far below the joint


@dataclasses.dataclass(frozen=True)
class KneeShape:
  """One knee's anatomy (template millimetres), fixed across visits."""
  size: float = 1.0  # overall scale
  tibia_half_width: tuple[float, float] = (38.0, 39.0)  # lateral, medial
  spine_height: tuple[float, float] = (5.5, 7.0)
  condyle: tuple[tuple[float, float], tuple[float, float]] = (
      (16.5, 15.0), (17.0, 15.5))  # semi-axes (a, b), lateral and medial
  condyle_centre: tuple[float, float] = (-25.0, 24.0)  # u of lowest points
  medial_drop: float = 1.5  # the medial condyle reaches lower
  notch: tuple[float, float] = (10.5, 21.0)  # half width, height
  epicondyle: tuple[float, float] = (40.5, 41.0)
  jsw: tuple[float, float] = (6.0, 5.3)  # healthy joint-space widths
  fibula_offset: tuple[float, float] = (0.0, 0.0)  # du, dv of the head
  patella: tuple[float, float, float, float] = (-3.0, -30.0, 21.0, 23.0)
  leg_half_width: float = 62.0
  fat: float = 12.0  # subcutaneous fat thickness
  density: float = 1.0  # bone mineral density factor


@dataclasses.dataclass(frozen=True)
class Disease:
  """What the grades put into the pixels of one knee at one visit."""
  severity: float = 0.0  # continuous KL in [0, 5)
  # Continuous OARSI levels in schema.OARSI_GRADES order (integer part =
  # grade): ost_fl, ost_fm, ost_tl, ost_tm, jsn_l, jsn_m.
  levels: tuple[float, ...] = (0.0,) * 6


@dataclasses.dataclass(frozen=True)
class Pose:
  """Placement of one knee on the detector."""
  x: float  # image position (mm) of the knee frame's origin
  y: float
  angle: float = 0.0  # in-plane rotation, radians
  scale: float = 1.0  # magnification
  axial: float = 0.0  # rotation about the leg axis, as fibula shift in mm


@dataclasses.dataclass(frozen=True)
class Knee:
  """One knee to draw: anatomy, disease and placement."""
  side: str  # 'R' or 'L'
  shape: KneeShape
  disease: Disease
  pose: Pose


@dataclasses.dataclass(frozen=True)
class Detector:
  """Acquisition: geometry, exposure, noise and tone curve."""
  spacing: float  # mm per pixel
  width_mm: float = 320.0
  height_mm: float = 160.0
  bits: int = 12  # stored values span [0, 2**bits - 1]
  contrast: float = 1.0  # scales attenuation (beam energy)
  gamma: float = 1.0  # tone curve exponent
  black: float = 0.04  # stored value of an unattenuated beam, fraction of max
  white: float = 0.92  # stored value at `signal_range`, fraction of max
  signal_range: float = 3.6  # attenuation mapped to `white`
  noise: float = 0.012  # quantum noise SD in attenuation units at A = 0
  heel: float = 0.0  # exposure gradient top to bottom, attenuation units
  texture: float = 0.35  # trabecular texture amplitude
  collimation: tuple[float, float, float, float] = (0.0,) * 4  # t, b, l, r mm

  @property
  def shape(self) -> tuple[int, int]:
    return (int(round(self.height_mm / self.spacing)),
            int(round(self.width_mm / self.spacing)))


# --------------------------------------------------------------------------
# Sampling.


def sample_shape(rng: np.random.Generator) -> KneeShape:
  """A random adult knee."""
  j = lambda sd, n=None: rng.normal(0.0, sd, n)  # noqa: E731
  a_l, b_l, a_m, b_m = np.array([16.5, 15.0, 17.0, 15.5]) * (1 + j(0.05, 4))
  return KneeShape(
      size=float(np.clip(1 + j(0.06), 0.85, 1.15)),
      tibia_half_width=tuple(np.array([38.0, 39.0]) + j(1.5, 2)),
      spine_height=tuple(np.array([5.5, 7.0]) * (1 + j(0.15, 2))),
      condyle=((a_l, b_l), (a_m, b_m)),
      condyle_centre=(-25.0 + j(1.0), 24.0 + j(1.0)),
      medial_drop=float(1.5 + j(0.8)),
      notch=(float(10.5 + j(0.8)), float(21.0 + j(1.5))),
      epicondyle=tuple(np.array([40.5, 41.0]) + j(1.0, 2)),
      jsw=tuple(np.clip(np.array([6.0, 5.3]) + j(0.45, 2), 4.3, 7.2)),
      fibula_offset=(float(j(2.5)), float(j(2.5))),
      patella=tuple(np.array([-3.0, -30.0, 21.0, 23.0]) + j(2.0, 4)),
      leg_half_width=float(np.clip(62 + j(5.0), 50, 72)),
      fat=float(np.clip(12 + j(4.0), 5, 24)),
      density=float(np.clip(1 + j(0.12), 0.7, 1.3)),
  )


def sample_pose(rng: np.random.Generator, side: str,
                detector: Detector) -> Pose:
  """Pose jitter of one knee: a few degrees, a few percent, a few mm."""
  # The right knee lies on the image left in a posterior-anterior view.
  x = detector.width_mm * (0.26 if side == 'R' else 0.74)
  return Pose(
      x=float(x + rng.normal(0, 5.0)),
      y=float(detector.height_mm / 2 + np.clip(rng.normal(0, 5.0), -10, 10)),
      angle=float(np.deg2rad(np.clip(rng.normal(0, 2.0), -5, 5))),
      scale=float(1 + np.clip(rng.normal(0, 0.025), -0.06, 0.06)),
      axial=float(rng.normal(0, 3.0)),
  )


# --------------------------------------------------------------------------
# Signed-distance helpers (negative inside, millimetres).


def _smin(a: Array, b: Array, k: float) -> Array:
  """Smooth union: min with a fillet of size k."""
  h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
  return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a: Array, b: Array, k: float) -> Array:
  """Smooth intersection."""
  return -_smin(-a, -b, k)


def _ellipse(u: Array, v: Array, centre: tuple[float, float], a: float,
             b: float, angle: float = 0.0) -> Array:
  """Approximate distance to an ellipse, exact enough near its boundary."""
  du, dv = u - centre[0], v - centre[1]
  if angle:
    c, s = math.cos(angle), math.sin(angle)
    du, dv = c * du + s * dv, -s * du + c * dv
  k0 = np.sqrt((du / a) ** 2 + (dv / b) ** 2)
  k1 = np.sqrt((du / a**2) ** 2 + (dv / b**2) ** 2) + 1e-6
  return k0 * (k0 - 1.0) / k1


def _capsule(u: Array, v: Array, p0: tuple[float, float],
             p1: tuple[float, float], r: float) -> Array:
  pu, pv = u - p0[0], v - p0[1]
  du, dv = p1[0] - p0[0], p1[1] - p0[1]
  t = np.clip((pu * du + pv * dv) / (du * du + dv * dv), 0.0, 1.0)
  return np.hypot(pu - t * du, pv - t * dv) - r


def _sigmoid(x: Array) -> Array:
  return 0.5 + 0.5 * np.tanh(0.5 * x)


# --------------------------------------------------------------------------
# The knee's geometry.


def osteophyte_size(level: float) -> float:
  """Spur length (mm) for a continuous osteophyte level (grade + fraction)."""
  return float(np.interp(level, [0.0, 0.6, 1.0, 2.0, 3.0, 4.0],
                         [0.0, 0.0, 1.5, 3.5, 6.0, 9.0]))


def joint_space(shape: KneeShape, disease: Disease) -> tuple[float, float]:
  """Lateral and medial joint-space widths (mm) after narrowing."""
  fraction = lambda level: float(np.interp(  # noqa: E731
      level, [0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 0.75, 0.5, 0.18, 0.0]))
  return (shape.jsw[0] * fraction(disease.levels[4]),
          shape.jsw[1] * fraction(disease.levels[5]))


def sclerosis(disease: Disease) -> tuple[float, float]:
  """Subchondral sclerosis 0..1 per compartment: severe narrowing, KL >= 3."""
  late = float(np.clip(disease.severity - 2.5, 0.0, 1.0))
  return tuple(float(np.clip((level - 1.0) / 2.5, 0.0, 1.0)) * late
               for level in disease.levels[4:])


def _plateau(u: Array, shape: KneeShape, disease: Disease) -> Array:
  """Height v (mm, down positive) of the tibial surface above u."""
  lateral = 0.6 * ((u + 23.0) / 15.0) ** 2  # slightly convex
  medial = 1.2 * (1.0 - ((u - 23.0) / 16.0) ** 2)  # slightly concave
  surface = lateral + (medial - lateral) * _sigmoid(u)
  # Intercondylar eminence with its two spines, sharper with disease.
  sharpen = 1.0 + 0.06 * disease.severity
  h_l, h_m = (h * sharpen for h in shape.spine_height)
  surface = surface - 1.5 * np.exp(-(u / 9.0) ** 2)
  surface = surface - h_l * np.exp(-((u + 5.5) / 3.2) ** 2)
  return surface - h_m * np.exp(-((u - 4.5) / 3.4) ** 2)


def _profile(v: Array, narrow: float, wide: float, start: float,
             length: float) -> Array:
  """Half width of a bone that flares from `narrow` to `wide` near the joint."""
  return narrow + (wide - narrow) * np.exp(
      -(np.maximum(v - start, 0.0) / length) ** 2)


def _side_distance(u: Array, v: Array, left: Callable[[Array], Array],
                   right: Callable[[Array], Array]) -> Array:
  """Distance to the two side walls u = left(v), u = right(v)."""
  eps = 0.05
  out = []
  for wall, sign in ((left, -1.0), (right, 1.0)):
    w = wall(v)
    slope = (wall(v + eps) - w) / eps
    out.append(sign * (u - w) / np.sqrt(1.0 + slope**2))
  return np.maximum(*out)


def _spur(u: Array, v: Array, base: tuple[float, float], angle: float,
          length: float) -> Array:
  """A marginal osteophyte: a beak of `length` mm growing from `base`."""
  c, s = math.cos(angle), math.sin(angle)
  centre = (base[0] + 0.35 * length * c, base[1] + 0.35 * length * s)
  return _ellipse(u, v, centre, 0.65 * length + 0.5, 0.35 * length + 0.6,
                  angle)


def tibia_sdf(u: Array, v: Array, shape: KneeShape, disease: Disease) -> Array:
  """Tibia in the knee frame."""
  f = lambda x: _plateau(x, shape, disease)  # noqa: E731
  eps = 0.05
  top_v = f(u)
  slope = (f(u + eps) - top_v) / eps
  top = (top_v - v) / np.sqrt(1.0 + slope**2)
  w_l, w_m = shape.tibia_half_width
  # Condyles drop almost vertically, then the metaphysis tapers to the shaft.
  left = lambda y: 3.0 - _profile(y, 18.0, w_l + 3.0, 8.0, 30.0)  # noqa: E731
  right = lambda y: 3.0 + _profile(y, 15.0, w_m - 3.0, 8.0, 30.0)  # noqa: E731
  d = _smax(top, _side_distance(u, v, left, right), 4.0)
  for j, margin, sign in ((2, -w_l, -1.0), (3, w_m, 1.0)):
    length = osteophyte_size(disease.levels[j])
    if length > 0:
      # Tibial spurs grow outwards and up, towards the femur.
      base = (margin - sign * 1.5, float(f(np.float64(margin))) + 1.0)
      d = _smin(d, _spur(u, v, base, math.atan2(-0.45, sign), length), 1.5)
  return d


def _condyle_point(shape: KneeShape, medial: bool,
                   phi_deg: float) -> tuple[float, float]:
  """Point of a condyle at `phi_deg` from its lowest point (femur frame)."""
  a, b = shape.condyle[medial]
  cu = shape.condyle_centre[medial]
  bottom = shape.medial_drop if medial else 0.0
  phi = math.radians(phi_deg)
  return (cu + a * math.sin(phi), bottom - b + b * math.cos(phi))


def _notch_centre(shape: KneeShape) -> float:
  return 0.5 * (shape.condyle_centre[0] + shape.condyle_centre[1])


def femur_sdf(u: Array, v: Array, shape: KneeShape,
              disease: Disease) -> Array:
  """Femur in its own frame: v = 0 at the lateral condyle's lowest point."""
  (a_l, b_l), (a_m, b_m) = shape.condyle
  c_l, c_m = shape.condyle_centre
  e_l, e_m = shape.epicondyle
  # The shaft flares into the epicondyles about 15 mm above the joint.
  left = lambda y: -_profile(-y, 15.0, e_l, 14.0, 32.0)  # noqa: E731
  right = lambda y: 2 + _profile(-y, 15.0, e_m - 2, 14.0, 32.0)  # noqa: E731
  body = _smax(v + b_l, _side_distance(u, v, left, right), 3.0)
  lateral = _ellipse(u, v, (c_l, -b_l), a_l, b_l)
  medial = _ellipse(u, v, (c_m, shape.medial_drop - b_m), a_m, b_m)
  d = _smin(_smin(body, lateral, 5.0), medial, 5.0)
  # The intercondylar notch: a U-shaped arch cut between the condyles.
  half_width, height = shape.notch
  notch = _ellipse(u, v, (_notch_centre(shape), _NOTCH_DEPTH), half_width,
                   height + _NOTCH_DEPTH)
  d = _smax(d, -notch, 2.0)
  for j, medial_side in ((0, False), (1, True)):
    length = osteophyte_size(disease.levels[j])
    if length > 0:
      # Femoral spurs grow outwards and down, towards the tibia.
      sign = 1.0 if medial_side else -1.0
      base = _condyle_point(shape, medial_side, sign * 62.0)
      base = (base[0] - sign * 1.5, base[1])
      d = _smin(d, _spur(u, v, base, math.atan2(0.6, sign), length), 1.5)
  return d


def fibula_sdf(u: Array, v: Array, shape: KneeShape, pose: Pose) -> Array:
  """Fibula in the knee frame: head below the lateral plateau, then shaft."""
  du = shape.fibula_offset[0] + pose.axial
  dv = shape.fibula_offset[1]
  head = _ellipse(u, v, (-34.0 + du, 23.0 + dv), 12.0, 12.5)
  apex = _ellipse(u, v, (-39.0 + du, 13.0 + dv), 3.5, 5.5, 0.35)
  shaft = _capsule(u, v, (-36.0 + du, 30.0 + dv), (-43.0 + du, 200.0), 6.5)
  return _smin(_smin(head, apex, 3.0), shaft, 6.0)


@dataclasses.dataclass(frozen=True)
class _Frames:
  """Maps between image mm, the knee frame and the femur frame."""
  knee: Knee
  femur_rot: float  # femur frame -> knee frame rotation
  femur_shift: tuple[float, float]

  @property
  def scale(self) -> float:
    return self.knee.pose.scale * self.knee.shape.size

  def to_knee(self, x: Array, y: Array) -> tuple[Array, Array]:
    p = self.knee.pose
    c, si = math.cos(p.angle), math.sin(p.angle)
    dx, dy = x - p.x, y - p.y
    u = (c * dx + si * dy) / self.scale
    v = (-si * dx + c * dy) / self.scale
    return (u if self.knee.side == 'R' else -u), v

  def from_knee(self, u: Array, v: Array) -> tuple[Array, Array]:
    p = self.knee.pose
    c, si = math.cos(p.angle), math.sin(p.angle)
    u = u if self.knee.side == 'R' else -u
    return (p.x + self.scale * (c * u - si * v),
            p.y + self.scale * (si * u + c * v))

  def knee_to_femur(self, u: Array, v: Array) -> tuple[Array, Array]:
    c, s = math.cos(self.femur_rot), math.sin(self.femur_rot)
    du, dv = u - self.femur_shift[0], v - self.femur_shift[1]
    return c * du + s * dv, -s * du + c * dv

  def femur_to_knee(self, u: Array, v: Array) -> tuple[Array, Array]:
    c, s = math.cos(self.femur_rot), math.sin(self.femur_rot)
    return (c * u - s * v + self.femur_shift[0],
            s * u + c * v + self.femur_shift[1])


def _frames(knee: Knee) -> _Frames:
  """Seats the femur on the tibia at the compartments' joint-space widths."""
  shape = knee.shape
  gaps = joint_space(shape, knee.disease)
  bottoms = [_condyle_point(shape, m, 0.0) for m in (False, True)]
  targets = []
  for (u, _), gap in zip(bottoms, gaps):
    top = float(_plateau(np.float64(u), shape, knee.disease))
    targets.append((u, top - gap))
  angle = (math.atan2(targets[1][1] - targets[0][1],
                      targets[1][0] - targets[0][0])
           - math.atan2(bottoms[1][1] - bottoms[0][1],
                        bottoms[1][0] - bottoms[0][0]))
  c, s = math.cos(angle), math.sin(angle)
  mid_b = np.mean(bottoms, 0)
  mid_t = np.mean(targets, 0)
  shift = (float(mid_t[0] - (c * mid_b[0] - s * mid_b[1])),
           float(mid_t[1] - (s * mid_b[0] + c * mid_b[1])))
  return _Frames(knee, angle, shift)


def landmarks_knee_frame(knee: Knee, frames: _Frames | None = None) -> Array:
  """The 16 schema landmarks (16, 2) in the knee frame (u, v)."""
  frames = frames or _frames(knee)
  shape, disease = knee.shape, knee.disease
  w_l, w_m = shape.tibia_half_width
  f = lambda x: float(_plateau(np.float64(x), shape, disease))  # noqa: E731
  inner_l, inner_m = -10.5, 9.5  # where the plateaus rise into the spines
  tibia_u = [-w_l + 1.5, (-w_l + inner_l) / 2, inner_l, -5.5, 0.0, 4.5,
             inner_m, (w_m + inner_m) / 2, w_m - 1.5]
  tibia = [(x, f(x)) for x in tibia_u]
  half_width, height = shape.notch
  centre = _notch_centre(shape)
  # Notch edges where the arch meets the joint, 3 mm above the lowest point.
  edge = half_width * math.sqrt(
      1.0 - ((-3.0 - _NOTCH_DEPTH) / (height + _NOTCH_DEPTH)) ** 2)
  femur_local = [
      _condyle_point(shape, False, -65.0),
      _condyle_point(shape, False, 0.0),
      (centre - edge, -3.0),
      (centre, -height),
      (centre + edge, -3.0),
      _condyle_point(shape, True, 0.0),
      _condyle_point(shape, True, 65.0),
  ]
  femur = [frames.femur_to_knee(*p) for p in femur_local]
  # Joint centre: between the spines, halfway across the joint space.
  lowest = 0.5 * (femur[1][1] + femur[5][1])
  plateau = 0.5 * (tibia[1][1] + tibia[7][1])
  tibia[schema.JOINT_CENTRE] = (0.0, 0.5 * (lowest + plateau))
  return np.array(tibia + femur, np.float64)


def landmarks(knee: Knee, spacing: float) -> Array:
  """The 16 landmarks (16, 2) as (x, y) image pixel coordinates."""
  frames = _frames(knee)
  uv = landmarks_knee_frame(knee, frames)
  x, y = frames.from_knee(uv[:, 0], uv[:, 1])
  return np.stack([x, y], 1) / spacing


# --------------------------------------------------------------------------
# Rendering.


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
  detector: Detector
  k: int  # coarse step in pixels
  x: Array  # coarse grid x (mm), (1, Wc)
  y: Array  # coarse grid y (mm), (Hc, 1)
  smooth: Array  # coarse attenuation (Hc, Wc)
  full: Array  # full-resolution attenuation (H, W)

  @classmethod
  def create(cls, detector: Detector) -> _Canvas:
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


def _soft_tissue(u: Array, v: Array, shape: KneeShape) -> Array:
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
  return _sigmoid((u - lo) / 1.5) * _sigmoid((hi - u) / 1.5)


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
    return scale * (0.8 + 3.0 * _sigmoid((dist - 50.0) / 8.0))
  return cortex


def _window(canvas: _Canvas, frames: _Frames, u: tuple[float, float],
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


def _draw_knee(canvas: _Canvas, knee: Knee, rng: np.random.Generator) -> None:
  frames = _frames(knee)
  shape, disease, pose = knee.shape, knee.disease, knee.pose
  s = frames.scale
  w_l, w_m = shape.tibia_half_width
  c_l, c_m = shape.condyle_centre
  scl = sclerosis(disease)

  def grid(window):
    return frames.to_knee(canvas.x[:, window[1]], canvas.y[window[0]])

  def add_smooth(window, values):
    canvas.smooth[window] += values.astype(np.float32)

  # Each field is evaluated only in a box around its bone.
  win = _window(canvas, frames, (-62.0, 62.0), (-16.0, 250.0))
  u, v = grid(win)
  tibia = tibia_sdf(u, v, shape, disease)
  canvas.paste_bone((tibia * s).astype(np.float32), win, 22.0 * s,
                    _shaft_cortex(pose.y, s, 1.0), shape.density, rng)
  for (lo, hi), level in zip(((-w_l - 3, -7.0), (7.0, w_m + 3)), scl):
    if level > 0:
      add_smooth(win, (0.9 * level * s) * _compartment_window(u, lo, hi)
                 * _band(-tibia, 3.5))

  win = _window(canvas, frames, (-64.0, 64.0), (-250.0, 16.0))
  uf, vf = frames.knee_to_femur(*grid(win))
  femur = femur_sdf(uf, vf, shape, disease)
  canvas.paste_bone((femur * s).astype(np.float32), win, 22.0 * s,
                    _shaft_cortex(pose.y, s, -1.0), shape.density, rng)
  for (lo, hi), level in zip(((c_l - 18, c_l + 12), (c_m - 12, c_m + 18)),
                             scl):
    if level > 0:
      add_smooth(win, (0.9 * level * s) * _compartment_window(uf, lo, hi)
                 * _band(-femur, 3.0))
  # The patella is faint and blurred: it lies far from the detector.
  pu, pv, pa, pb = shape.patella
  patella = -_ellipse(uf, vf, (pu, pv), pa, pb)
  add_smooth(win, 0.55 * shape.density * s * _bone(patella, 1.0, 12.0, 0.0))

  win = _window(canvas, frames, (-64.0, -16.0), (-2.0, 250.0))
  fibula = fibula_sdf(*grid(win), shape, pose)
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
      edges.append(_sigmoid((dist + margin) / 0.8))
  if not edges:
    return 0.0
  # Scatter keeps collimated areas a little below bone in brightness.
  return 3.2 * functools.reduce(np.maximum, edges)


def _tone_curve(det: Detector, n: int) -> tuple[Array, float]:
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


def render(knees: Sequence[Knee], detector: Detector,
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
  points = np.stack([landmarks(k, detector.spacing) for k in knees])
  return pixels, points
