"""The synthetic cohort's acquisition sites and what each film varies.

A site fixes the detector (modality, bits, pixel spacing and the tags that
carry it, field of view), the DICOM conventions (photometric interpretation,
rescale) and the site's image quality (contrast, tone curve, noise, how
often collimator blades show). Each film then draws its own exposure and
processing around its site's (`detector`), so no two films of a site look
alike and models must cope with the spread as with hospital films.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from koajax.data import anatomy


@dataclasses.dataclass(frozen=True)
class Site:
  """An acquisition site: detector, DICOM conventions and image quality."""
  modality: str  # 'CR' or 'DX'
  photometric: str  # MONOCHROME1 stores bone dark
  bits: int
  spacing: float  # mm per pixel
  spacing_tags: tuple[str, ...]  # ImagerPixelSpacing and/or PixelSpacing
  rescale: tuple[float, float]  # slope, intercept
  fov: tuple[float, float]  # width, height in mm
  contrast: float
  gamma: float
  noise: float
  collimation: float  # probability that collimator blades show
  manufacturer: str


SITES = {
    'A': Site('CR', 'MONOCHROME1', 12, 0.20, ('ImagerPixelSpacing',),
              (1.0, 0.0), (305.0, 152.0), 1.0, 1.0, 0.014, 0.3,
              'Synthetic Phosphor Co'),
    'B': Site('DX', 'MONOCHROME2', 14, 0.175,
              ('ImagerPixelSpacing', 'PixelSpacing'), (1.0, 0.0),
              (300.0, 150.0), 1.1, 0.85, 0.010, 0.0, 'Synthetic Flat Panel'),
    'C': Site('CR', 'MONOCHROME2', 12, 0.19, ('PixelSpacing',),
              (2.0, -1000.0), (305.0, 152.0), 0.9, 1.2, 0.018, 0.5,
              'Synthetic Phosphor Co'),
    'D': Site('DX', 'MONOCHROME1', 16, 0.16, ('ImagerPixelSpacing',),
              (0.5, 512.0), (300.0, 150.0), 1.05, 0.95, 0.009, 0.1,
              'Synthetic Digital Radiography'),
    'E': Site('CR', 'MONOCHROME2', 12, 0.17,
              ('ImagerPixelSpacing', 'PixelSpacing'), (1.0, 0.0),
              (305.0, 153.0), 0.95, 1.1, 0.015, 0.2, 'Synthetic Imaging'),
}

def detector(site: Site, rng: np.random.Generator,
              variety: float = 1.0) -> anatomy.Detector:
  """Per-image variation of exposure and processing around the site's.

  `variety` (`koajax.data.synthetic --variety`) widens every spread: more images show collimator
  blades (a site that never does then sometimes does), blades reach further
  into the film, exposure and processing vary more. At 1 the draws are
  exactly the standard ones.
  """
  v = variety
  collimation = (0.0,) * 4
  if rng.random() < 1 - (1 - site.collimation) / v:
    collimation = tuple(rng.uniform(2.0, 2.0 + 7.0 * v, 2)) + tuple(
        rng.uniform(0.0, 6.0 * v, 2))

  def jitter(sd: float) -> float:
    # A factor that stays positive however wide the spread.
    sd *= v
    return float(1 + np.clip(rng.normal(0, sd), max(-3 * sd, -0.8), 3 * sd))

  return anatomy.Detector(
      spacing=site.spacing, width_mm=site.fov[0], height_mm=site.fov[1],
      bits=site.bits, contrast=site.contrast * jitter(0.05),
      gamma=site.gamma * jitter(0.04), noise=site.noise * jitter(0.15),
      signal_range=3.6 * jitter(0.04), black=0.04 * jitter(0.3),
      heel=float(rng.normal(0, 0.15 * v)), texture=0.3 * jitter(0.1),
      collimation=collimation)
