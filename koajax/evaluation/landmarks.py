"""Landmark accuracy as KNEEL reports it, in millimetres.

A knee has 16 landmarks (the cache's keypoint order): tibia 0-8 with the
joint centre at 4, femur 9-15. For predicted and true landmarks in image
pixels and each image's pixel spacing this gives

  distance  per knee and landmark, the Euclidean distance in mm (spacing
            applied per axis, so anisotropic pixels count right);
  recall    per bone, the share of its landmarks within 1, 1.5, 2 and
            2.5 mm of the truth (KNEEL's table);
  outliers  the share of landmarks, and of knees with any landmark,
            10 mm or more from the truth;
  centre    the joint centre's error: mean, median, 95th percentile and
            the share of knees within 2 mm.

A true landmark that is missing (NaN) is left out of every figure; a
missing prediction where the truth exists counts as an outlier, so a
localiser cannot look better by giving up on hard knees.

For training, `scores` gives the validation figures under flat names
(`SCORE_NAMES`, a run's selection metrics; those in `LOWER_IS_BETTER` are
errors) and `write_report` writes a test report: metrics.json (`report`)
and predictions.csv (each knee's predicted and true landmarks and their
distances).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TIBIA = tuple(range(9))
FEMUR = tuple(range(9, 16))
CENTRE = 4
RADII_MM = (1.0, 1.5, 2.0, 2.5)
OUTLIER_MM = 10.0


def distances_mm(pred: np.ndarray, true: np.ndarray,
                 spacing: np.ndarray | tuple[float, float]) -> np.ndarray:
  """(knees, landmarks) distances in mm.

  Args:
    pred, true: (knees, landmarks, 2) points in pixels, (x, y).
    spacing: (row, col) mm per pixel, one pair for all knees or (knees, 2).
  """
  pred = np.asarray(pred, np.float64)
  true = np.asarray(true, np.float64)
  if pred.shape != true.shape or pred.shape[-1] != 2:
    raise ValueError(f'predicted landmarks {pred.shape} and true landmarks '
                     f'{true.shape} must both be (knees, landmarks, 2)')
  spacing = np.broadcast_to(np.asarray(spacing, np.float64),
                            (pred.shape[0], 2))
  mm_per_px = spacing[:, None, ::-1]  # (row, col) -> (x, y)
  d = np.sqrt((((pred - true) * mm_per_px) ** 2).sum(-1))
  truth = np.isfinite(true).all(-1)
  # A lost prediction is an outlier, never a missing value.
  return np.where(truth, np.where(np.isfinite(d), d, np.inf), np.nan)


def _recall(d: np.ndarray) -> dict[str, float]:
  d = d[~np.isnan(d)]
  return {f'{r:g}mm': float((d < r).mean()) if d.size else float('nan')
          for r in RADII_MM}


def report(pred: np.ndarray, true: np.ndarray,
           spacing: np.ndarray | tuple[float, float]) -> dict[str, Any]:
  """Every figure of the module docstring as one JSON-ready dict."""
  d = distances_mm(pred, true, spacing)
  known = ~np.isnan(d)
  centre = d[:, CENTRE][known[:, CENTRE]]
  finite = np.where(np.isfinite(d), d, np.nan)
  return {
      'knees': int(d.shape[0]),
      'recall': {'tibia': _recall(d[:, TIBIA]), 'femur': _recall(d[:, FEMUR])},
      'mean_mm': {'tibia': float(np.nanmean(finite[:, TIBIA])),
                  'femur': float(np.nanmean(finite[:, FEMUR]))},
      'per_landmark_mean_mm': [float(v) for v in np.nanmean(finite, axis=0)],
      'outliers': float((d[known] >= OUTLIER_MM).mean()),
      'knees_with_outlier': float(
          np.any(np.where(known, d >= OUTLIER_MM, False), axis=1).mean()),
      'centre': {
          'mean_mm': float(np.mean(centre)),
          'median_mm': float(np.median(centre)),
          'p95_mm': float(np.percentile(centre, 95)),
          'within_2mm': float((centre < 2.0).mean()),
      },
  }


# Validation scores of a landmark model, by name (`scores`).
SCORE_NAMES = ('landmarks/mean_mm', 'landmarks/centre_mm',
               'landmarks/within_2mm', 'landmarks/outliers')
LOWER_IS_BETTER = frozenset({'mean_mm', 'centre_mm', 'outliers'})
PREDICTIONS_CSV = 'predictions.csv'
METRICS_JSON = 'metrics.json'


def scores(pred: np.ndarray, true: np.ndarray,
           spacing: np.ndarray | tuple[float, float]) -> dict[str, float]:
  """The validation figures of `SCORE_NAMES`: the mean distance of every
  known landmark, the joint centre's mean distance, the share of landmarks
  within 2 mm and of outliers (>= 10 mm); a lost prediction is an outlier
  and an infinite distance."""
  d = distances_mm(pred, true, spacing)
  known = d[~np.isnan(d)]
  centre = d[:, CENTRE][~np.isnan(d[:, CENTRE])]
  return {'landmarks/mean_mm': float(np.mean(known)),
          'landmarks/centre_mm': float(np.mean(centre)),
          'landmarks/within_2mm': float((known < 2.0).mean()),
          'landmarks/outliers': float((known >= OUTLIER_MM).mean())}


def write_report(out_dir: str | Path, *, knee_ids: Sequence[str],
                 sides: Sequence[str], pred: np.ndarray, true: np.ndarray,
                 spacing: tuple[float, float], pixels: str,
                 sections: dict[str, Any] | None = None) -> dict[str, Any]:
  """predictions.csv and metrics.json of predicted against true landmarks
  ((n, K, 2) (x, y) in the pixels named by `pixels`, of `spacing` (row,
  col) mm); each file replaces its old self in one rename. Returns the
  metrics."""
  # pylint: disable-next=g-import-not-at-top
  from koajax.evaluation import plots, report as report_lib
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  d = distances_mm(pred, true, spacing)
  columns = {'knee_id': list(knee_ids), 'side': list(sides)}
  for k in range(pred.shape[1]):
    columns.update({f'x{k}': pred[:, k, 0], f'y{k}': pred[:, k, 1],
                    f'true_x{k}': true[:, k, 0], f'true_y{k}': true[:, k, 1],
                    f'mm{k}': d[:, k]})
  frame = pd.DataFrame(columns)
  plots.write_atomically(out_dir / PREDICTIONS_CSV,
                         lambda path: frame.to_csv(path, index=False))
  result = {**report(pred, true, spacing), 'pixels': pixels,
            'spacing_mm': list(map(float, spacing)),
            **(sections or {}),
            'files': {'predictions': PREDICTIONS_CSV}}
  text = json.dumps(report_lib.json_ready(result), indent=2,
                    allow_nan=False) + '\n'
  plots.write_atomically(out_dir / METRICS_JSON,
                         lambda path: path.write_text(text))
  return result


def headline(result: dict[str, Any]) -> str:
  """The figures worth printing from a `write_report` result."""
  return json.dumps({
      'centre_mean_mm': round(result['centre']['mean_mm'], 3),
      'centre_within_2mm': round(result['centre']['within_2mm'], 4),
      'tibia_recall_2mm': round(result['recall']['tibia']['2mm'], 4),
      'femur_recall_2mm': round(result['recall']['femur']['2mm'], 4),
      'outliers': round(result['outliers'], 4)})
