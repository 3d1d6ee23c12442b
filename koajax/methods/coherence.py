"""Coherence learning (Zheng et al. 2021) as a method.

KL and the six OARSI grades (task 'kl_oarsi', 29 classes in all) on the
'keypoints' view: the whole ROI at 320 px with its 16 landmarks, read by the
keypoint pooling network (`koajax.models.kpn`). The loss of a step is

  L = cls_weight L_cls + [epoch >= warmup_epochs] coherence_weight L_gmm

  L_cls  the sum over the heads of each head's prevalence-weighted
         cross-entropy over the knees it grades (ungraded heads masked;
         `losses.class_weighted_cross_entropy`);
  L_gmm  the incoherence loss softplus(-tau g(P)) / tau, averaged over the
         labeled and the unlabeled knees of the step
         (`koajax.coherence.incoherence_loss`), P a knee's 29 concatenated
         class probabilities and g the coherence mixture's log-density.

Class weights (the paper gives no formula): for a head whose training knees
hold n_c knees of class c, w_c = (1 / f_c) / mean_c'(1 / f_c') with
f_c = n_c / sum n, the inverse frequency normalised to mean 1 over the
classes present; a class with no training knee gets 0 (no knee carries it).
As in PyTorch's `CrossEntropyLoss(weight=...)`, a batch's loss divides by the
sum of its knees' weights, so only the ratios matter. With
`class_weighting='none'` every weight is 1.

The mixture is fitted before the first step on the training knees' grades
(`koajax.coherence.fit_gmm`: K components, full covariance, one-hot vectors
plus N(0, noise) noise seeded by the run's seed, only knees graded on every
head); its parameters and the class weights are the method's state, so they
are checkpointed with the weights and a resumed run uses exactly the same
ones. The mixture is fitted even with `coherence=False` (the ablation): the
test report measures every run's predictions with it (`report_sections`,
`koajax.evaluation.grade_coherence`).

Each knee is augmented on the device with `augment.jitter_augment`
(translation +-max_translation px, rotation +-max_rotation_deg, scale in
scale_range; the keypoints move with the image), labeled and unlabeled
alike, then mapped to [-1, 1] as the predictor maps them. The labeled and the
unlabeled knees go through the network as two forward passes (two batch-norm
batches), as the Semixup family does. During the warm-up the unlabeled pass
still runs (the switch is traced, the step compiled once) and its loss is
multiplied by 0.

`coherence=False` reads no unlabeled stream and adds no L_gmm: with
`model.kpn=False` as well these are the four runs of the paper's ablation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from koajax import cli
from koajax import coherence as coherence_lib
from koajax import losses
from koajax import methods
from koajax.data import augment
from koajax.data import views
from koajax.evaluation import grade_coherence

log = logging.getLogger(__name__)

CLASS_WEIGHTS = 'class_weights'  # method-state keys
GMM = 'gmm'
WEIGHTINGS = ('inverse_frequency', 'none')


def prevalence_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes,) float32 inverse class frequency of `labels` (-1 masked),
  normalised to mean 1 over the classes present; 0 for absent ones."""
  y = np.asarray(labels)
  counts = np.bincount(y[y >= 0], minlength=num_classes)[:num_classes]
  weights = np.zeros(num_classes, np.float64)
  present = counts > 0
  if present.any():
    weights[present] = counts.sum() / counts[present]  # 1 / frequency
    weights[present] /= weights[present].mean()
  return weights.astype(np.float32)


def classification_loss(*, logits, labels, class_weights
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sum over the heads of the class-weighted CE of each ({head: ...})."""
  total, aux = jnp.zeros((), jnp.float32), {}
  for head, z in logits.items():
    loss, _ = losses.class_weighted_cross_entropy(
        logits=z, labels=labels[head], class_weights=class_weights[head])
    aux[f'cross_entropy/{head}'] = loss
    total = total + loss
  return total, {'classification': total, **aux}


def concat_probs(logits, heads) -> jax.Array:
  """(B, 29) softmax of every head, side by side in `heads` order."""
  return coherence_lib.concat_probs(
      {h: jax.nn.softmax(logits[h].astype(jnp.float32), axis=-1)
       for h in heads}, heads)


@dataclasses.dataclass(frozen=True)
class Coherence(methods.Method):
  """Prevalence-weighted CE of every head plus the incoherence loss."""
  heads: tuple[str, ...]
  num_classes: tuple[tuple[str, int], ...]
  coherence: bool = True
  cls_weight: float = 1.0
  coherence_weight: float = 1.0
  warmup_epochs: float = 1.0
  tau: float = coherence_lib.DEFAULT_TAU
  components: int = coherence_lib.DEFAULT_COMPONENTS
  noise: float = coherence_lib.DEFAULT_NOISE
  reg_covar: float = coherence_lib.DEFAULT_REG_COVAR
  class_weighting: str = 'inverse_frequency'
  max_translation: float = 10.0
  max_rotation_deg: float = 5.0
  scale_range: tuple[float, float] = (0.95, 1.05)

  @property
  def streams(self) -> tuple[str, ...]:
    return ('labeled', 'unlabeled') if self.coherence else ('labeled',)

  def init_state(self, training: methods.TrainingData) -> dict[str, Any]:
    labels = training.labels
    empty = [h for h in self.heads if not np.any(np.asarray(labels[h]) >= 0)]
    if empty:
      raise cli.BadInput(
          f'no training knee grades {", ".join(empty)}: coherence learning '
          'needs KL and the six OARSI grades (a KL-only manifest?); add '
          'those columns to the manifest and rebuild the cache')
    classes = dict(self.num_classes)
    weights = {
        h: (prevalence_weights(labels[h], classes[h])
            if self.class_weighting == 'inverse_frequency'
            else np.ones(classes[h], np.float32))
        for h in self.heads}
    for h in self.heads:
      log.info('Class weights of %s: %s', h,
               ' '.join(f'{w:.3f}' for w in weights[h]))
    gmm = coherence_lib.fit_gmm(
        coherence_lib.stack_labels(labels, self.heads),
        [classes[h] for h in self.heads], components=self.components,
        noise=self.noise, seed=training.seed, reg_covar=self.reg_covar)
    return {CLASS_WEIGHTS: weights, GMM: gmm}

  def _views(self, key, stream):
    """Jittered, normalised images of a stream and their moved keypoints
    (None where the stream has none)."""
    kwargs = dict(max_translation=self.max_translation,
                  max_rotation_deg=self.max_rotation_deg,
                  scale_range=tuple(self.scale_range))
    if 'keypoints' not in stream:
      images = augment.augment_batch(augment.jitter_augment, key,
                                     stream['image'], **kwargs)
      return augment.normalise(images), {}
    images, points = augment.augment_batch(
        augment.jitter_augment, key, stream['image'], stream['keypoints'],
        **kwargs)
    return augment.normalise(images), {'keypoints': points}

  def loss(self, forward, batch, key, *, epoch, state):
    k_aug, k_aug_u, k_fwd, k_fwd_u = jax.random.split(key, 4)
    labeled = batch['labeled']
    x, inputs = self._views(k_aug, labeled)
    logits = forward(x, k_fwd, **inputs)['logits']
    cls, aux = classification_loss(logits=logits, labels=labeled['labels'],
                                   class_weights=state[CLASS_WEIGHTS])
    total = self.cls_weight * cls
    if self.coherence:
      x_u, inputs_u = self._views(k_aug_u, batch['unlabeled'])
      logits_u = forward(x_u, k_fwd_u, **inputs_u)['logits']
      p = jnp.concatenate([concat_probs(logits, self.heads),
                           concat_probs(logits_u, self.heads)])
      incoherence = coherence_lib.incoherence_loss(state[GMM], p,
                                                   tau=self.tau)
      on = (epoch >= self.warmup_epochs).astype(jnp.float32)
      total = total + on * self.coherence_weight * incoherence
      aux.update(incoherence=incoherence, coherence_on=on,
                 log_density=jnp.mean(coherence_lib.log_density(state[GMM],
                                                                p)))
    return total, aux

  def report_sections(self, state, probs, labels) -> dict[str, Any]:
    return {'coherence': grade_coherence.measures(state[GMM], probs, labels,
                                                  self.heads)}


def _create(task, **options) -> Coherence:
  if len(task.heads) < 2 or grade_coherence.KL_HEAD not in task.head_names:
    raise cli.BadInput(
        f'method coherence grades KL and the OARSI features; task '
        f"{task.name!r} has {', '.join(task.head_names)}. Use task "
        "'kl_oarsi' (configs/coherence.py)")
  if task.view not in views.KEYPOINT_VIEWS:
    raise cli.BadInput(
        f"method coherence reads the knees' keypoints: set view='keypoints' "
        f'(the {task.view!r} view has none)')
  if options.get('class_weighting', WEIGHTINGS[0]) not in WEIGHTINGS:
    raise cli.BadInput(
        f'method_kwargs.class_weighting must be one of '
        f'{", ".join(WEIGHTINGS)}; got {options["class_weighting"]!r}')
  if options.get('tau', 1.0) <= 0:
    raise cli.BadInput(f'method_kwargs.tau must be > 0; got '
                       f'{options["tau"]!r}')
  if 'scale_range' in options:
    options['scale_range'] = tuple(options['scale_range'])
  return Coherence(heads=task.head_names,
                   num_classes=tuple(task.num_classes.items()), **options)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Coherence)
             if f.name not in ('heads', 'num_classes')}

METHODS = {'coherence': methods.Spec(_create, _DEFAULTS)}
