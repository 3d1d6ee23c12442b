"""Knee ROI extraction: one levelled, scale-normalised 8-bit patch per knee.

Given a radiograph (bone bright), its pixel spacing and a knee's 16 landmarks
(`schema`), `extract_roi` returns a square patch of `roi_mm` millimetres
centred on the joint centre (landmark 4) with the tibial plateau horizontal,
resampled to `roi_px` pixels, and the landmarks in that patch's pixels. Left
knees are mirrored so that every knee looks like a right knee (lateral side on
the left of the patch).

Coordinates are (x, y) = (column, row), with pixel centres at integers, in
both the image and the patch. The patch centre is ((roi_px - 1) / 2,
(roi_px - 1) / 2), so a centred crop of any size stays centred on the joint.

Geometry is done in millimetres, so anisotropic pixel spacing is honoured,
and the whole crop-rotate-scale-flip is a single affine map sampled once
(bilinear), after a Gaussian prefilter that stops aliasing when the patch is
coarser than the image.

`extract_side` is where a localiser starts on a film without landmarks: a
coarse square view of one knee's side (its half of a bilateral film, or a
whole single-knee film), axis-aligned, left sides mirrored the same way.

Intensity follows the reference pipeline (Tiulpin et al.): clip to the 5th..
99th percentile of the patch, then global contrast normalisation, which in
that pipeline is a linear stretch of the clipped range onto 0..255.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy import sparse

from koajax.data import schema

# Percentiles of the patch that are mapped to 0 and 255.
CLIP_PERCENTILES = (5.0, 99.0)


@dataclasses.dataclass(frozen=True)
class RoiGeometry:
  """The affine map between patch pixels and image pixels, both (x, y).

  image_xy = matrix @ roi_xy + offset.
  """
  matrix: np.ndarray  # (2, 2)
  offset: np.ndarray  # (2,)
  roi_px: int

  def to_image(self, roi_xy: np.ndarray) -> np.ndarray:
    return np.asarray(roi_xy, np.float64) @ self.matrix.T + self.offset

  def to_roi(self, image_xy: np.ndarray) -> np.ndarray:
    inverse = np.linalg.inv(self.matrix)
    return (np.asarray(image_xy, np.float64) - self.offset) @ inverse.T


def plateau_direction(landmarks_mm: np.ndarray) -> np.ndarray:
  """Unit vector (x, y) along the tibial plateau, pointing to +x.

  A total-least-squares line through the plateau points, so the result does
  not depend on how the image happens to be rotated.
  """
  points = landmarks_mm[list(schema.PLATEAU)]
  centred = points - points.mean(axis=0)
  _, singular, vt = np.linalg.svd(centred)
  if singular[0] < 1e-6:
    raise ValueError('tibial plateau landmarks coincide; cannot level the knee')
  direction = vt[0]
  return direction if direction[0] >= 0 else -direction


def roi_geometry(landmarks: np.ndarray, spacing: tuple[float, float],
                 side: str, *, roi_mm: float, roi_px: int) -> RoiGeometry:
  """The patch-to-image map for one knee.

  Args:
    landmarks: (16, 2) (x, y) image pixels.
    spacing: (row, col) mm per image pixel.
    side: 'R' or 'L'; 'L' mirrors the patch horizontally.
    roi_mm: patch side in millimetres.
    roi_px: patch side in pixels.
  """
  if side not in schema.SIDES:
    raise ValueError(f"side must be 'R' or 'L', got {side!r}")
  mm_per_image_px = np.array([spacing[1], spacing[0]], np.float64)  # (x, y)
  landmarks_mm = np.asarray(landmarks, np.float64) * mm_per_image_px
  along = plateau_direction(landmarks_mm)
  down = np.array([-along[1], along[0]])  # `along` turned 90 deg towards +y
  mm_per_roi_px = roi_mm / roi_px
  mirror = -1.0 if side == 'L' else 1.0
  # Columns: image-pixel step per patch-pixel step in x and in y.
  matrix = np.stack([mirror * along, down], axis=1) * (
      mm_per_roi_px / mm_per_image_px[:, None])
  centre = (roi_px - 1) / 2
  offset = np.asarray(landmarks[schema.JOINT_CENTRE], np.float64) - (
      matrix @ np.array([centre, centre]))
  return RoiGeometry(matrix=matrix, offset=offset, roi_px=roi_px)


# A film this much wider than tall (in mm) holds both knees side by side.
BILATERAL_ASPECT = 1.1


def is_bilateral(shape: tuple[int, int], spacing: tuple[float, float]
                 ) -> bool:
  """Whether a film of `shape` (rows, cols) holds both knees: bilateral
  posterior-anterior films are landscape, single-knee films portrait or
  square."""
  rows, cols = shape
  return cols * spacing[1] > BILATERAL_ASPECT * rows * spacing[0]


def side_geometry(shape: tuple[int, int], spacing: tuple[float, float],
                  side: str, *, bilateral: bool, view_mm: float,
                  view_px: int) -> RoiGeometry:
  """The coarse localiser's view of one knee's side of a film.

  An axis-aligned square of `view_mm` at `view_mm / view_px` mm per pixel
  centred on the side's half of a bilateral film (the right knee lies on
  the image left in a posterior-anterior view) or on the whole of a
  single-knee film; left knees mirrored, as `roi_geometry` mirrors them.
  Nothing about the knee is needed: this is where a localiser starts.
  """
  if side not in schema.SIDES:
    raise ValueError(f"side must be 'R' or 'L', got {side!r}")
  rows, cols = shape
  mm_per_image_px = np.array([spacing[1], spacing[0]], np.float64)  # (x, y)
  mirror = -1.0 if side == 'L' else 1.0
  matrix = np.diag([mirror, 1.0]) * (
      view_mm / view_px / mm_per_image_px[:, None])
  # Pixel centres are at integers, so the film spans -0.5 .. cols - 0.5.
  if bilateral:
    x = cols / 4 - 0.5 if side == 'R' else 3 * cols / 4 - 0.5
  else:
    x = (cols - 1) / 2
  centre = (view_px - 1) / 2
  offset = np.array([x, (rows - 1) / 2]) - matrix @ np.array([centre, centre])
  return RoiGeometry(matrix=matrix, offset=offset, roi_px=view_px)


def extract_side(
    image: np.ndarray,
    spacing: tuple[float, float],
    side: str,
    *,
    bilateral: bool,
    view_mm: float = 256.0,
    view_px: int = 256,
    background: float | None = None,
) -> tuple[np.ndarray, RoiGeometry]:
  """The coarse view of one side (`side_geometry`) as a uint8 image.

  Of a bilateral film only the side's half is shown (the other half is
  filled with `background`, like the world beyond the film), so the view
  holds one knee.

  Returns:
    (view, geometry): (view_px, view_px) uint8 and its map to the film.
  """
  return extract_sides(image, spacing, [side], bilateral=bilateral,
                       view_mm=view_mm, view_px=view_px,
                       background=background)[0]


def extract_sides(
    image: np.ndarray,
    spacing: tuple[float, float],
    sides: Sequence[str],
    *,
    bilateral: bool,
    view_mm: float = 256.0,
    view_px: int = 256,
    background: float | None = None,
) -> list[tuple[np.ndarray, RoiGeometry]]:
  """`extract_side` of each of `sides`, the film filtered once for all."""
  if image.ndim != 2:
    raise ValueError(f'image has shape {image.shape}, expected 2-D')
  geometries = [side_geometry(image.shape, spacing, side,
                              bilateral=bilateral, view_mm=view_mm,
                              view_px=view_px) for side in sides]
  if background is None:
    background = background_level(image)
  out = []
  for side, geometry, view in zip(sides, geometries,
                                  _sample_all(image, geometries)):
    if bilateral:
      # Columns of the view whose film x lies in the other half.
      x = geometry.matrix[0, 0] * np.arange(view_px) + geometry.offset[0]
      middle = image.shape[1] / 2 - 0.5
      other = x > middle if side == 'R' else x < middle
      view[:, other] = np.nan
    out.append((to_uint8(view, fill=background), geometry))
  return out


def background_level(image: np.ndarray) -> float:
  """A robust dark level of a bone-bright radiograph (air / soft tissue).

  Used to fill patch pixels that fall outside the image; a subsample is
  plenty for a percentile and keeps this cheap on 5-megapixel images.
  """
  step = max(1, int(math.sqrt(image.size / 250_000)))
  return float(np.percentile(image[::step, ::step], 1.0))


def _antialias_sigma(geometry: RoiGeometry) -> np.ndarray:
  """Gaussian sigma (row, col) in image pixels for the patch's sampling.

  The patch's pixel pitch in image pixels along each image axis (the
  patch is isotropic in mm, so this does not depend on the rotation);
  sigma = (step - 1) / 2 as in scikit-image's resize, 0 when the patch is as
  fine as the image or finer.
  """
  step_xy = np.linalg.norm(geometry.matrix, axis=1)
  return np.maximum(0.0, (step_xy[::-1] - 1.0) / 2.0)


def _axis_weights(positions: np.ndarray, length: int,
                  sigma: float) -> tuple[sparse.csr_array, int]:
  """The weights of one image axis: SciPy's Gaussian of `sigma`
  (`ndimage.gaussian_filter1d`: truncated at 4 sigma, 'nearest' at the
  edges), then linear interpolation at `positions` (pixel centres at whole
  numbers; those off the axis get the edge's weights and are masked later).

  Returns:
    (weights, start): (n, span) sparse weights on pixels start .. start +
    span - 1 of the axis, the only ones any position needs.
  """
  radius = int(4.0 * sigma + 0.5) if sigma > 1e-15 else 0
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (taps / sigma) ** 2) if radius else np.ones(1)
  kernel /= kernel.sum()
  left = np.clip(np.floor(positions), 0, max(length - 2, 0))
  frac = (positions - left)[:, None]
  # Offsets -radius .. radius + 1 from the left neighbour: the kernel under
  # its weight and under the right neighbour's.
  weights = np.zeros((len(positions), 2 * radius + 2))
  weights[:, :-1] += (1 - frac) * kernel
  weights[:, 1:] += frac * kernel
  pixels = np.clip(left[:, None].astype(int) + np.arange(-radius, radius + 2),
                   0, length - 1)
  start = int(pixels.min())
  rows = np.broadcast_to(np.arange(len(positions))[:, None], pixels.shape)
  # Repeated (row, pixel) pairs, where 'nearest' folds taps onto an edge,
  # are summed.
  return sparse.csr_array(
      (weights.ravel().astype(np.float32),
       (rows.ravel(), pixels.ravel() - start)),
      shape=(len(positions), int(pixels.max()) + 1 - start)), start


def _sample_separable(image: np.ndarray,
                      geometry: RoiGeometry) -> np.ndarray:
  """`_sample_all`'s samples for an axis-aligned patch (a coarse view) as
  two sparse products: the prefilter and the interpolation are separable
  along the image's axes, and only the filtered pixels next to a sample
  are needed: the two 1 mm/px side views of a 0.19 mm/px bilateral film
  took 6 ms on a Xeon core this way, 22 ms with the film filtered whole."""
  n = geometry.roi_px
  i = np.arange(n, dtype=np.float64)
  x = geometry.matrix[0, 0] * i + geometry.offset[0]
  y = geometry.matrix[1, 1] * i + geometry.offset[1]
  sigma = _antialias_sigma(geometry)  # (row, col)
  rows, r0 = _axis_weights(y, image.shape[0], sigma[0])
  cols, c0 = _axis_weights(x, image.shape[1], sigma[1])
  block = np.asarray(image[r0:r0 + rows.shape[1], c0:c0 + cols.shape[1]],
                     np.float32)
  samples = (cols @ (rows @ block).T).T
  rows_off = (y < 0) | (y > image.shape[0] - 1)
  cols_off = (x < 0) | (x > image.shape[1] - 1)
  samples[rows_off[:, None] | cols_off[None, :]] = np.nan
  return np.ascontiguousarray(samples)


def _sample_all(image: np.ndarray,
                geometries: Sequence[RoiGeometry]) -> list[np.ndarray]:
  """Bilinear samples of the (prefiltered) image on each patch grid; NaN
  where a patch leaves the image. The image is filtered once under all;
  axis-aligned patches (`_sample_separable`) take only what they need.

  Patches of one resolution share the prefilter, so the crop under their
  union is filtered once (a localiser's two looks at a knee overlap almost
  wholly; the two sides of a film together cover it). The crop reaches the
  filter's support beyond every sampled pixel, so each patch's pixels are
  those it would get alone.
  """
  sigma = _antialias_sigma(geometries[0])
  if any(not np.allclose(_antialias_sigma(g), sigma) for g in geometries):
    raise ValueError('patches sampled together need one resolution')
  if all(g.matrix[0, 1] == 0 and g.matrix[1, 0] == 0 for g in geometries):
    return [_sample_separable(image, g) for g in geometries]
  margin = np.ceil(4 * sigma[::-1]) + 2  # (x, y)
  bounds = []
  for geometry in geometries:
    n = geometry.roi_px
    corners = geometry.to_image(np.array(
        [[0, 0], [n - 1, 0], [0, n - 1], [n - 1, n - 1]], np.float64))
    low = np.floor(corners.min(axis=0) - margin).astype(int)
    high = np.ceil(corners.max(axis=0) + margin).astype(int) + 1
    x0, y0 = np.maximum(low, 0)
    x1, y1 = np.minimum(high, [image.shape[1], image.shape[0]])
    if x1 <= x0 or y1 <= y0:
      raise ValueError('the ROI lies entirely outside the image')
    bounds.append((x0, y0, x1, y1))
  # Work on the image crop under the patches only (one knee of a bilateral
  # film), with room for the filter's support.
  x0, y0 = (min(b[0] for b in bounds), min(b[1] for b in bounds))
  x1, y1 = (max(b[2] for b in bounds), max(b[3] for b in bounds))
  crop = np.asarray(image[y0:y1, x0:x1], np.float32)
  if sigma.any():
    crop = ndimage.gaussian_filter(crop, sigma, mode='nearest')
  # Each patch's points lie in its own part of the crop, or off the film
  # (NaN), so all sample the one crop.
  crop = Image.fromarray(np.ascontiguousarray(crop), mode='F')
  return [_bilinear(crop, geometry.matrix, geometry.offset, geometry.roi_px,
                    origin=(x0, y0), film=image.shape)
          for geometry in geometries]


def _bilinear(crop: Image.Image, matrix: np.ndarray, offset: np.ndarray,
              n: int, *, origin: tuple[int, int],
              film: tuple[int, int]) -> np.ndarray:
  """The (n, n) bilinear samples at film pixels `matrix @ (x, y) + offset`
  (pixel centres at whole numbers) of `crop`, the film's pixels from
  `origin` (x, y) on; NaN where the point leaves the (rows, cols) `film`.

  The pixels of scipy.ndimage.affine_transform(order=1, mode='constant',
  cval=nan) on the film, computed by PIL's affine transform, about twice as
  fast.
  """
  # PIL maps output pixel edges to input pixel edges: shift by half a pixel.
  c = matrix @ [-0.5, -0.5] + offset - origin + 0.5
  samples = np.array(crop.transform(
      (n, n), Image.Transform.AFFINE,
      (matrix[0, 0], matrix[0, 1], c[0], matrix[1, 0], matrix[1, 1], c[1]),
      resample=Image.Resampling.BILINEAR), np.float32)
  # PIL also extrapolates half a pixel beyond the edges; scipy does not.
  rows, cols = film
  corners = matrix @ [[0, n - 1, 0, n - 1], [0, 0, n - 1, n - 1]]
  corners += offset[:, None]
  if ((corners >= 1e-6).all() and (corners[0] <= cols - 1 - 1e-6).all() and
      (corners[1] <= rows - 1 - 1e-6).all()):
    return samples  # the patch lies on the film
  i = np.arange(n, dtype=np.float64)
  x = matrix[0, 0] * i[None, :] + matrix[0, 1] * i[:, None] + offset[0]
  y = matrix[1, 0] * i[None, :] + matrix[1, 1] * i[:, None] + offset[1]
  samples[(x < 0) | (x > cols - 1) | (y < 0) | (y > rows - 1)] = np.nan
  return samples


def to_uint8(roi: np.ndarray, fill: float) -> np.ndarray:
  """Percentile clip + contrast stretch to 8 bits; NaN pixels get `fill`."""
  valid = ~np.isnan(roi)
  if not valid.any():
    raise ValueError('the ROI lies entirely outside the image')
  low, high = np.percentile(roi[valid], CLIP_PERCENTILES)
  if not high > low:
    raise ValueError('the ROI has no contrast (constant intensity)')
  roi = np.where(valid, roi, fill)
  scaled = (np.clip(roi, low, high) - low) * (255.0 / (high - low))
  return np.round(scaled).astype(np.uint8)


def extract_roi(
    image: np.ndarray,
    spacing: tuple[float, float],
    landmarks: np.ndarray,
    side: str,
    *,
    roi_mm: float = 140.0,
    roi_px: int = 400,
    background: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Extracts one knee.

  Args:
    image: (rows, cols) radiograph, bone bright (`dicom_io.read_radiograph`).
    spacing: (row, col) mm per pixel.
    landmarks: (16, 2) (x, y) image pixels, `schema` order.
    side: 'R' or 'L', the patient's side; left knees come out mirrored.
    roi_mm: patch side in millimetres.
    roi_px: patch side in pixels.
    background: value for patch pixels outside the image; by default
      `background_level(image)` (pass it in to compute it once per film).

  Returns:
    (roi, keypoints): (roi_px, roi_px) uint8 patch and (16, 2) float32 (x, y)
    landmark positions in patch pixels (landmark 4 at the patch centre).

  Raises:
    ValueError: the landmarks are unusable (wrong shape, not finite,
      degenerate plateau) or the patch has no image content.
  """
  return extract_rois(image, spacing, [landmarks], side, roi_mm=roi_mm,
                      roi_px=roi_px, background=background)[0]


def extract_rois(
    image: np.ndarray,
    spacing: tuple[float, float],
    landmark_sets: Sequence[np.ndarray],
    side: str,
    *,
    roi_mm: float = 140.0,
    roi_px: int = 400,
    background: float | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """`extract_roi` of one knee's side at each of `landmark_sets` (a
  localiser's looks at it), the film filtered once for all."""
  landmark_sets = [np.asarray(points, np.float64) for points in landmark_sets]
  geometries = []
  for landmarks in landmark_sets:
    if landmarks.shape != (schema.NUM_LANDMARKS, 2):
      raise ValueError(f'landmarks have shape {landmarks.shape}, expected '
                       f'({schema.NUM_LANDMARKS}, 2)')
    if not np.isfinite(landmarks).all():
      raise ValueError('landmarks contain empty or non-numeric values')
    geometries.append(roi_geometry(landmarks, spacing, side, roi_mm=roi_mm,
                                   roi_px=roi_px))
  if image.ndim != 2:
    raise ValueError(f'image has shape {image.shape}, expected 2-D')
  if background is None:
    background = background_level(image)
  return [(to_uint8(patch, fill=background),
           geometry.to_roi(landmarks).astype(np.float32))
          for landmarks, geometry, patch in zip(
              landmark_sets, geometries, _sample_all(image, geometries))]
