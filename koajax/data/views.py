"""Method views: what each method's network sees, cut from a stored knee ROI.

The cache stores one square ROI of `roi_mm` millimetres per knee (left knees
flipped to look like right ones, so the lateral side is on the image left).
The views here are plain NumPy/PIL so they run inside Grain worker processes:

  siamese   Semixup / active learning / confidence-driven Siamese nets: the
            central 110 mm resized to 300 px, rows 100:228, the lateral patch
            from cols 0:128 and the medial patch from cols 172:300 mirrored
            horizontally, stacked as (2, 128, 128).
  whole     multi-task OARSI grading: the whole ROI resized to `size` px.
  keypoints coherence learning: the whole ROI resized to 320 px, with the
            landmarks rescaled to match.

Coordinates follow the pixel-index convention of NumPy and scipy.ndimage: the
centre of pixel (row r, col c) is the point (x=c, y=r). Keypoints are (x, y).

`placements` gives the inverse: where each image of a view was cut from in
the ROI, so that maps over a view (Grad-CAM, `koajax.evaluation.gradcam`)
can be laid back onto the ROI.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import numpy as np
from PIL import Image

# Siamese view geometry (DESIGN.md "method views").
SIAMESE_CROP_MM = 110.0
SIAMESE_RESIZE_PX = 300
SIAMESE_ROWS = (100, 228)
SIAMESE_PATCH_PX = 128
LATERAL_COLS = (0, SIAMESE_PATCH_PX)
MEDIAL_COLS = (SIAMESE_RESIZE_PX - SIAMESE_PATCH_PX, SIAMESE_RESIZE_PX)

WHOLE_KNEE_PX = 300
KEYPOINTS_PX = 320


def _resize(image: np.ndarray, size: int,
            box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear resize of `box` (left, upper, right, lower; edges) to size^2.

  PIL takes a float box, so a crop whose edges fall between pixels is resampled
  exactly instead of being rounded to whole pixels first.
  """
  pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
  return np.asarray(
      pil.resize((size, size), Image.Resampling.BILINEAR, box=box))


def central_crop_box(roi_px: int, roi_mm: float,
                     crop_mm: float) -> tuple[float, float, float, float]:
  """The centred square of `crop_mm` in a `roi_mm` ROI, as a PIL box."""
  if not 0 < crop_mm <= roi_mm:
    raise ValueError(f'cannot crop {crop_mm} mm from a {roi_mm} mm ROI')
  side = roi_px * crop_mm / roi_mm
  lo = (roi_px - side) / 2
  return (lo, lo, lo + side, lo + side)


def siamese_boxes(roi_px: int, roi_mm: float
                  ) -> tuple[tuple[float, float, float, float], ...]:
  """The ROI regions of the (lateral, medial) patches, as PIL boxes.

  The regions that rows 100:228 and the patches' cols cover once the
  central 110 mm of a `roi_px` ROI are resized to 300 px.
  """
  lo, _, hi, _ = central_crop_box(roi_px, roi_mm, SIAMESE_CROP_MM)
  step = (hi - lo) / SIAMESE_RESIZE_PX  # ROI pixels per resized pixel
  top, bottom = (lo + r * step for r in SIAMESE_ROWS)
  return tuple((lo + cols[0] * step, top, lo + cols[1] * step, bottom)
               for cols in (LATERAL_COLS, MEDIAL_COLS))


def siamese_pair(roi: np.ndarray, roi_mm: float,
                 patch_px: int = SIAMESE_PATCH_PX) -> np.ndarray:
  """The (lateral, mirrored medial) patch pair, (2, patch_px, patch_px) uint8.

  Each patch is resampled straight from its region of the ROI
  (`siamese_boxes`): the same pixels (to rounding) as resizing the central
  110 mm to 300 px and cutting rows 100:228, at a third of the cost. A
  `patch_px` other than 128 samples the same regions more coarsely or
  finely.
  """
  lateral, medial = siamese_boxes(roi.shape[0], roi_mm)
  # Mirroring makes the medial compartment look like a lateral one, so one
  # shared branch sees both with the same orientation.
  return np.stack([_resize(roi, patch_px, lateral),
                   _resize(roi, patch_px, medial)[:, ::-1]])


def whole_knee(roi: np.ndarray, size: int = WHOLE_KNEE_PX) -> np.ndarray:
  """The whole ROI resized to (size, size) uint8."""
  return _resize(roi, size)


def rescale_keypoints(keypoints: np.ndarray, from_px: int,
                      to_px: int) -> np.ndarray:
  """Maps (x, y) points from a from_px^2 image onto its to_px^2 resize.

  Pixel centres sit half a pixel in from the edges, hence the +-0.5; unknown
  (NaN) points stay NaN.
  """
  scale = to_px / from_px
  return ((np.asarray(keypoints, np.float32) + 0.5) * scale - 0.5).astype(
      np.float32)


def with_keypoints(roi: np.ndarray, keypoints: np.ndarray,
                   size: int = KEYPOINTS_PX) -> tuple[np.ndarray, np.ndarray]:
  """The whole ROI at (size, size) and its keypoints in the new pixels."""
  return whole_knee(roi, size), rescale_keypoints(keypoints, roi.shape[0], size)


# A view turns a decoded knee into the arrays a network takes; `size` is
# its pixel size (the patch side of the Siamese pair, the side of the others).
View = Callable[[dict[str, Any], float], dict[str, np.ndarray]]


def _siamese_view(knee: dict[str, Any], roi_mm: float,
                  size: int = SIAMESE_PATCH_PX) -> dict[str, np.ndarray]:
  return {'image': siamese_pair(knee['image'], roi_mm, size)}


def _whole_view(knee: dict[str, Any], roi_mm: float,
                size: int = WHOLE_KNEE_PX) -> dict[str, np.ndarray]:
  del roi_mm  # the whole ROI, whatever its extent
  return {'image': whole_knee(knee['image'], size)}


def _keypoints_view(knee: dict[str, Any], roi_mm: float,
                    size: int = KEYPOINTS_PX) -> dict[str, np.ndarray]:
  del roi_mm
  image, keypoints = with_keypoints(knee['image'], knee['keypoints'], size)
  return {'image': image, 'keypoints': keypoints}


# Views cut with the knee's landmarks: a knee whose landmarks are unknown
# (NaN, as PNG-folder caches store them) cannot be seen through them.
KEYPOINT_VIEWS = frozenset({'keypoints'})

# The pixel size of each view at size 0 (its own).
VIEW_PX = {'siamese': SIAMESE_PATCH_PX, 'whole': WHOLE_KNEE_PX,
           'keypoints': KEYPOINTS_PX}

VIEWS: dict[str, View] = {
    'siamese': _siamese_view,
    'whole': _whole_view,
    'keypoints': _keypoints_view,
}


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one image of a view was resampled from in the ROI.

  Attributes:
    box: (left, upper, right, lower) in ROI pixel edges, as a PIL box: the
      edges of the image (after any crop) lie there.
    mirrored: the image was flipped left-right after resampling (the medial
      patch of the Siamese pair).
  """
  box: tuple[float, float, float, float]
  mirrored: bool = False


def _cropped(box: tuple[float, float, float, float], px: int, crop: int,
             mirrored: bool) -> tuple[float, float, float, float]:
  """The part of `box` left by the centre crop of `crop` px of its px^2
  image, as `koajax.train.predictor.centre_crop` cuts it."""
  if not crop:
    return box
  if not 0 < crop <= px:
    raise ValueError(f'cannot crop {crop} px from a {px} px view')
  start = (px - crop) // 2
  # The crop is taken from the image as the network sees it; in a mirrored
  # image its columns start from the other edge.
  col = px - start - crop if mirrored else start
  left, upper, right, lower = box
  sx, sy = (right - left) / px, (lower - upper) / px
  return (left + col * sx, upper + start * sy, left + (col + crop) * sx,
          upper + (start + crop) * sy)


def placements(view: str, roi_px: int, roi_mm: float, *, size: int = 0,
               crop: int = 0) -> tuple[Placement, ...]:
  """Where the images of `view` came from in a roi_px^2 ROI of roi_mm.

  Args:
    view: one of VIEWS.
    roi_px: the ROI's side in pixels.
    roi_mm: the ROI's side in millimetres.
    size: the view's pixel size (0: its own), as for `get_view`.
    crop: the centre crop of `crop` px cut from every image before the
      network (`predict.crop`); 0: none.

  Returns:
    One placement per image the network sees of a knee: (lateral, medial)
    for 'siamese', the whole ROI for the others.
  """
  if view not in VIEWS:
    raise ValueError(f'unknown view {view!r}; choose one of {sorted(VIEWS)}')
  px = size or VIEW_PX[view]
  if view == 'siamese':
    found = [Placement(box, mirrored) for box, mirrored in
             zip(siamese_boxes(roi_px, roi_mm), (False, True))]
  else:
    found = [Placement((0.0, 0.0, float(roi_px), float(roi_px)))]
  return tuple(Placement(_cropped(p.box, px, crop, p.mirrored), p.mirrored)
               for p in found)


def get_view(name: str, size: int = 0) -> View:
  """The view function called `name` (one of VIEWS) at `size` px (0: the
  view's own size), or a clear error."""
  if name not in VIEWS:
    raise ValueError(
        f'unknown view {name!r}; choose one of {sorted(VIEWS)}')
  if size < 0:
    raise ValueError(f'view size must be >= 0 px (0: the view\'s own), '
                     f'got {size}')
  return functools.partial(VIEWS[name], size=size) if size else VIEWS[name]
