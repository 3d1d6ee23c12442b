"""Synthetic knee anatomy: shapes, disease geometry, poses and landmarks.

Each knee is drawn in its own frame (millimetres): u runs from the lateral to
the medial side, v downwards, the origin is the middle of the tibial plateau
between the tibial spines. Bones are signed-distance fields (negative inside):
the tibia with its plateau and spines, the femur with two condyles and the
intercondylar notch, the fibula below the lateral plateau, the patella over the
distal femur. The femur sits on the tibia so that each compartment's gap
equals its joint-space width, which tilts it when one side narrows.

The pixels are drawn by `koajax.data.radiograph`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from koajax.data import schema

Array = np.ndarray

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


def sample_pose(rng: np.random.Generator, side: str, detector: Detector,
                variety: float = 1.0) -> Pose:
  """Pose jitter of one knee: a few degrees, a few percent, a few mm.

  `variety` scales every spread and limit (2: up to 20 mm off centre, 10
  degrees, 12 % magnification); 1 draws exactly the standard poses.
  """
  v = variety
  # The right knee lies on the image left in a posterior-anterior view.
  x = detector.width_mm * (0.26 if side == 'R' else 0.74)
  return Pose(
      x=float(x + rng.normal(0, 5.0 * v)),
      y=float(detector.height_mm / 2 +
              np.clip(rng.normal(0, 5.0 * v), -10 * v, 10 * v)),
      angle=float(np.deg2rad(np.clip(rng.normal(0, 2.0 * v), -5 * v,
                                     5 * v))),
      scale=float(1 + np.clip(rng.normal(0, 0.025 * v), -0.06 * v,
                              0.06 * v)),
      axial=float(rng.normal(0, 3.0 * v)),
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


def ellipse_sdf(u: Array, v: Array, centre: tuple[float, float], a: float,
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


def sigmoid(x: Array) -> Array:
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
  surface = lateral + (medial - lateral) * sigmoid(u)
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
  return ellipse_sdf(u, v, centre, 0.65 * length + 0.5, 0.35 * length + 0.6,
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
  lateral = ellipse_sdf(u, v, (c_l, -b_l), a_l, b_l)
  medial = ellipse_sdf(u, v, (c_m, shape.medial_drop - b_m), a_m, b_m)
  d = _smin(_smin(body, lateral, 5.0), medial, 5.0)
  # The intercondylar notch: a U-shaped arch cut between the condyles.
  half_width, height = shape.notch
  notch = ellipse_sdf(u, v, (_notch_centre(shape), _NOTCH_DEPTH), half_width,
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
  head = ellipse_sdf(u, v, (-34.0 + du, 23.0 + dv), 12.0, 12.5)
  apex = ellipse_sdf(u, v, (-39.0 + du, 13.0 + dv), 3.5, 5.5, 0.35)
  shaft = _capsule(u, v, (-36.0 + du, 30.0 + dv), (-43.0 + du, 200.0), 6.5)
  return _smin(_smin(head, apex, 3.0), shaft, 6.0)


@dataclasses.dataclass(frozen=True)
class Frames:
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


def knee_frames(knee: Knee) -> Frames:
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
  return Frames(knee, angle, shift)


def landmarks_knee_frame(knee: Knee, frames: Frames | None = None) -> Array:
  """The 16 schema landmarks (16, 2) in the knee frame (u, v)."""
  frames = frames or knee_frames(knee)
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
  frames = knee_frames(knee)
  uv = landmarks_knee_frame(knee, frames)
  x, y = frames.from_knee(uv[:, 0], uv[:, 1])
  return np.stack([x, y], 1) / spacing
