"""Multi-task KL + OARSI grading (Tiulpin & Saarakkala 2019).

One network, a head per grade (KL, then the six OARSI grades in the paper's
order: `koajax.tasks` 'kl_oarsi'), trained on the unweighted mean of the
heads' cross-entropies over the knees each head grades
(`losses.multi_head_cross_entropy`). The knee view is the whole 140 mm ROI
at 310 px; training sees a random 300 px crop with the reference code's
noise, rotation and gamma (`augment.crop_augment`), evaluation the centre
crop (`config.predict.crop`).

Input normalisation follows the paper: the grey values are standardised by
the mean and standard deviation of the training knees' views, computed once
before the first step. They are the method's state (`input_norm`, in the
units of `step.normalise`), so they are checkpointed with the weights, and
the predictor standardises every knee it sees with the same two numbers.

The schedule (heads trained alone first, then the whole network, Adam with
PyTorch-style L2) is the optimiser's (`step.make_optimizer`), set by
configs/oarsi.py. While the heads train alone the network still runs in
training mode, so the backbone's batch-norm statistics follow the knees
(its weights do not move).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from koajax import cli
from koajax import losses
from koajax import methods
from koajax.data import augment

log = logging.getLogger(__name__)

INPUT_NORM = 'input_norm'  # method-state key the predictor applies


def standardise(images: jax.Array, norm: Any) -> jax.Array:
  """(x - mean) / std with the `input_norm` state ({'mean', 'std'})."""
  return (images - norm['mean']) / norm['std']


def view_statistics(batches) -> dict[str, np.ndarray]:
  """{'mean', 'std'} of uint8 view batches, in `step.normalise` units."""
  total = total_sq = count = 0.0
  for images in batches:
    x = np.asarray(images, np.float64) / 255.0 * 2.0 - 1.0
    total += x.sum()
    total_sq += np.square(x).sum()
    count += x.size
  if not count:
    raise cli.BadInput('no training knee to compute the input mean and '
                       'standard deviation from')
  mean = total / count
  std = np.sqrt(max(total_sq / count - mean ** 2, 0.0))
  return {'mean': np.float32(mean), 'std': np.float32(max(std, 1e-6))}


@dataclasses.dataclass(frozen=True)
class MultiTask(methods.Method):
  """Mean cross-entropy of every head on augmented, standardised knees."""
  heads: tuple[str, ...]
  num_classes: tuple[tuple[str, int], ...]
  crop: int = 300
  noise_p: float = 0.5
  noise_gain: float = 0.3
  max_rotation_deg: float = 10.0
  gamma_p: float = 0.5
  gamma_range: tuple[float, float] = (0.5, 1.5)
  standardise_inputs: bool = True
  streams: tuple[str, ...] = ('labeled',)

  def init_state(self, training: methods.TrainingData) -> dict[str, Any]:
    labels = training.labels
    empty = [h for h in self.heads if not np.any(np.asarray(labels[h]) >= 0)]
    if len(empty) == len(self.heads):
      raise cli.BadInput('no training knee has a grade for any head')
    if empty:
      raise cli.BadInput(
          f'no training knee grades {", ".join(empty)}: the cache holds no '
          'such grades (a KL-only manifest?). Train KL alone with '
          'configs/supervised.py, or add the OARSI columns '
          f'({", ".join(empty)}) to the manifest and rebuild the cache')
    for head, classes in self.num_classes:
      y = np.asarray(labels[head])
      missing = [c for c in range(classes) if not np.any(y == c)]
      if missing:
        log.warning(
            'The training knees hold no %s grade %s: that head cannot learn '
            'it. Use fewer folds (split.num_folds) or another split.seed, '
            'or more data', head, ', '.join(map(str, missing)))
    if not self.standardise_inputs or training.images is None:
      return {INPUT_NORM: {'mean': np.float32(0.0), 'std': np.float32(1.0)}}
    norm = view_statistics(training.images())
    log.info('Input normalisation from the %d training knees: mean %.4f, '
             'std %.4f (of [-1, 1] grey values)', len(training.index),
             norm['mean'], norm['std'])
    return {INPUT_NORM: norm}

  def loss(self, forward, batch, key, *, epoch, state):
    del epoch
    k_aug, k_fwd = jax.random.split(key)
    x = augment.augment_batch(
        augment.crop_augment, k_aug, batch['labeled']['image'],
        crop=self.crop, noise_p=self.noise_p, noise_gain=self.noise_gain,
        max_rotation_deg=self.max_rotation_deg, gamma_p=self.gamma_p,
        gamma_range=tuple(self.gamma_range))
    logits = forward(standardise(x, state[INPUT_NORM]), k_fwd)['logits']
    return losses.multi_head_cross_entropy(
        logits=logits, labels=batch['labeled']['labels'])


def _create(task, **options) -> MultiTask:
  if len(task.heads) < 2:
    raise cli.BadInput(
        f'method multitask grades several heads; task {task.name!r} has one. '
        "Use task 'kl_oarsi' (configs/oarsi.py)")
  if 'gamma_range' in options:
    options['gamma_range'] = tuple(options['gamma_range'])
  return MultiTask(heads=task.head_names,
                   num_classes=tuple(task.num_classes.items()), **options)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MultiTask)
             if f.name not in ('heads', 'num_classes', 'streams')}

METHODS = {'multitask': methods.Spec(_create, _DEFAULTS)}
