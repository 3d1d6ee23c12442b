"""How coherent a model's grades are: the coherence mixture's view of them.

Coherence learning (`koajax.coherence`) fits a Gaussian mixture on real
knees' 29-d grade vectors (KL + the six OARSI grades, one-hot side by side)
and trains the predictions towards where it puts mass. No paper reports
whether the predictions end up coherent; `measures` says so for a test set:

  mean_log_density         mean g(P) over the knees, P the concatenated
                           predicted probabilities (what the loss acts on)
  mean_log_density_onehot  mean g of the predicted grades, one-hot
  incoherent               share of knees whose predicted grades break a
                           rule of the KL scale (`RULES`)

and the same for the knees' true grades (the knees graded on every head),
the level the data itself reaches: readers are not always coherent either.

g is `koajax.coherence.log_density` in float32 (about 1e-5 relative to
scikit-learn's float64 `score_samples`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from koajax import coherence

# Rules of the KL scale a grade vector can break. KL 2 means a definite
# osteophyte, so KL >= 2 with no osteophyte and no narrowing is not a real
# knee; KL 0 means no feature of OA, so a moderate one (grade >= 2) is not
# either.
RULES = {
    'kl_without_findings': 'KL >= 2 with every osteophyte and narrowing '
                           'grade 0',
    'findings_without_kl': 'KL 0 with an osteophyte or narrowing grade >= 2',
}
KL_HEAD = 'kl'
_CHUNK = 4096  # knees per log-density call, so memory stays bounded


def incoherent(grades: np.ndarray,
               heads: Sequence[str]) -> dict[str, np.ndarray]:
  """{rule: (n,) bool} for (n, heads) int grades in `heads` order (the KL
  head and the OARSI heads); 'any' for a knee that breaks one."""
  grades = np.asarray(grades)
  heads = list(heads)
  if KL_HEAD not in heads or len(heads) < 2:
    raise ValueError(f'the coherence rules need the {KL_HEAD!r} head and the '
                     f'OARSI heads; got {heads}')
  kl = grades[:, heads.index(KL_HEAD)]
  findings = np.delete(grades, heads.index(KL_HEAD), axis=1)
  out = {'kl_without_findings': (kl >= 2) & np.all(findings == 0, axis=1),
         'findings_without_kl': (kl == 0) & np.any(findings >= 2, axis=1)}
  out['any'] = out['kl_without_findings'] | out['findings_without_kl']
  return out


def _log_density(gmm: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
  return np.concatenate([
      np.asarray(coherence.log_density(gmm, x[i:i + _CHUNK]), np.float64)
      for i in range(0, len(x), _CHUNK)] or [np.zeros(0)])


def _summary(gmm, heads, num_classes, grades, probs=None) -> dict[str, Any]:
  onehot = coherence.one_hot_grades(grades, num_classes).astype(np.float32)
  out = {'n_knees': int(len(grades))}
  if probs is not None:
    out['mean_log_density'] = float(np.mean(_log_density(gmm, probs)))
  out['mean_log_density_onehot'] = float(np.mean(_log_density(gmm, onehot)))
  out['incoherent'] = {rule: float(np.mean(mask))
                       for rule, mask in incoherent(grades, heads).items()}
  return out


def measures(gmm: Mapping[str, Any], probs: Mapping[str, np.ndarray],
             labels: Mapping[str, np.ndarray],
             heads: Sequence[str]) -> dict[str, Any]:
  """The coherence section of a test report (module docstring).

  Args:
    gmm: the coherence mixture (`koajax.coherence.fit_gmm`).
    probs: {head: (n, classes)} predicted probabilities of the test knees.
    labels: {head: (n,)} their true labels, -1 where ungraded.
    heads: the heads in the mixture's order (`Task.head_names`).

  Returns:
    {'predicted': {...}, 'true': {...} (or None without a fully graded
    knee), 'rules': RULES}, JSON-ready; values are NaN-free for n >= 1.
  """
  heads = list(heads)
  num_classes = [np.shape(probs[h])[-1] for h in heads]
  p = np.concatenate([np.asarray(probs[h], np.float32) for h in heads],
                     axis=1)
  predicted = np.stack([np.argmax(probs[h], axis=-1) for h in heads], axis=1)
  truth = coherence.stack_labels(labels, heads)
  graded = np.all(truth >= 0, axis=1)
  return {
      'predicted': _summary(gmm, heads, num_classes, predicted, p),
      'true': (_summary(gmm, heads, num_classes, truth[graded])
               if graded.any() else None),
      'rules': dict(RULES),
  }
