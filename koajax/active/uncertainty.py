"""Uncertainty scores of Monte Carlo softmax samples, for active learning.

Input is `probs` shaped (T, N, C): T stochastic forward passes (MC dropout)
over N knees with C classes; T = 1 is one deterministic pass. Scores, each of
shape (N,), natural log (nats), higher means more uncertain:

  entropy           entropy of the mean prediction over T; ENT for T = 1,
                    ENT-MCD for T > 1
  bald              mutual information between prediction and weights (BALD,
                    MI-MCD): entropy of the mean minus the mean per-pass
                    entropy; 0 for T = 1
  least_confidence  1 - max of the mean prediction
  expected_entropy  mean over T of the per-pass entropy

`most_uncertain` / `least_uncertain` pick indices from a score with a
deterministic (stable, lower index first) tie order, so an acquisition round
is reproducible even when many knees share a score (e.g. bald = 0 for T = 1).
"""

from __future__ import annotations

import numpy as np
from scipy import special

SCORE_NAMES = ('entropy', 'bald', 'least_confidence', 'expected_entropy')

# Softmax outputs in float32 (or bfloat16) sum to 1 only up to round-off.
_SUM_TOLERANCE = 1e-3


def _check_probs(probs) -> np.ndarray:
  """Returns `probs` as float64 (T, N, C), or raises ValueError."""
  # The scores run on host after the device sweep, on at most a pool's worth
  # of (T, N, C) values; float64 keeps the difference of two nearly equal
  # entropies in `bald` accurate where float32 would leave visible round-off.
  p = np.asarray(probs, dtype=np.float64)
  if p.ndim != 3:
    raise ValueError(f'probs has shape {p.shape} (ndim {p.ndim}); pass softmax '
                     'probabilities shaped (T, N, C)')
  num_samples, _, num_classes = p.shape
  if num_samples == 0 or num_classes == 0:
    raise ValueError(f'probs has shape {p.shape}; need T >= 1 passes and '
                     'C >= 1 classes in (T, N, C)')
  if not np.all(np.isfinite(p)):
    raise ValueError('probs holds NaN or infinite values; pass softmax '
                     'probabilities shaped (T, N, C)')
  if p.size and p.min() < 0:
    raise ValueError(f'probs holds a negative value ({p.min():g}); pass softmax '
                     'probabilities (non-negative), not logits')
  if p.size:
    error = np.abs(p.sum(axis=-1) - 1.0)
    worst = np.unravel_index(np.argmax(error), error.shape)
    if error[worst] > _SUM_TOLERANCE:
      raise ValueError(
          f'probabilities at (t, n) = {tuple(int(i) for i in worst)} sum to '
          f'{p[worst].sum():g}; each row over the last axis (C) must sum to 1 '
          f'within {_SUM_TOLERANCE:g}; pass softmax probabilities shaped '
          '(T, N, C)')
  return p


def _entropy(p: np.ndarray) -> np.ndarray:
  """Entropy over the last axis; scipy's entr gives 0 log 0 = 0, no warning."""
  return special.entr(p).sum(axis=-1)


def mean_probs(probs) -> np.ndarray:
  """Mean prediction over the T passes, float64 (N, C)."""
  return _check_probs(probs).mean(axis=0)


def scores(probs) -> dict[str, np.ndarray]:
  """Uncertainty scores of MC softmax samples.

  Args:
    probs: softmax probabilities shaped (T, N, C), NumPy or JAX array.

  Returns:
    {name: float64 array (N,)} for every name in SCORE_NAMES.

  Raises:
    ValueError: `probs` is not (T, N, C) with T, C >= 1, or its rows are not
      probability vectors (non-negative, summing to 1 within 1e-3).
  """
  p = _check_probs(probs)
  mean = p.mean(axis=0)
  entropy = _entropy(mean)
  expected_entropy = _entropy(p).mean(axis=0)
  # Entropy is concave, so entropy >= expected_entropy exactly (Jensen);
  # a negative difference can only be round-off.
  bald = np.maximum(entropy - expected_entropy, 0.0)
  return {
      'entropy': entropy,
      'bald': bald,
      'least_confidence': 1.0 - mean.max(axis=-1),
      'expected_entropy': expected_entropy,
  }


def _check_selection(values, k: int) -> np.ndarray:
  # float64 so that negating for a descending sort cannot wrap unsigned ints.
  v = np.asarray(values, dtype=np.float64)
  if v.ndim != 1:
    raise ValueError(f'values has shape {v.shape}; pass one score per sample, '
                     'shaped (N,)')
  if not np.all(np.isfinite(v)):
    raise ValueError('values holds NaN or infinite scores')
  if isinstance(k, bool) or int(k) != k or not 0 <= k <= v.shape[0]:
    raise ValueError(f'k = {k!r}; need an integer 0 <= k <= N = {v.shape[0]}')
  return v


def most_uncertain(values, k: int) -> np.ndarray:
  """Indices of the k largest values, descending; ties go to the lower index."""
  v = _check_selection(values, k)
  return np.argsort(-v, kind='stable')[:int(k)]


def least_uncertain(values, k: int) -> np.ndarray:
  """Indices of the k smallest values, ascending; ties go to the lower index."""
  v = _check_selection(values, k)
  return np.argsort(v, kind='stable')[:int(k)]
