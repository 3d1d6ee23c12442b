"""Confidence-driven early-OA detection (Wang et al. 2025): the hybrid loss
as a method, and its cross-entropy baseline.

The task is KL-0 against KL-2 ('kl0_vs_kl2', one head of 2 classes) on the
Siamese patch pair. The loss (`koajax.hybrid_loss`) needs c_k, the mean
confidence of class k on the validation knees: it is the method's state,
recomputed from the validation predictions at every evaluation
(`update_state`) and checkpointed with the weights, so a resumed run goes on
with the c_k it had. Before the first evaluation c_k is
`hybrid_loss.default_class_confidence` (the smoothed label's true-class
value), and a class absent from the validation knees keeps its previous c_k.

Augmentation on the device: rotation +-10 deg and gamma p 0.5 in [0.5, 1.5]
(Semixup's stream without its noise and padding); the paper's brightness
jitter is not reproduced.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from koajax import cli
from koajax import hybrid_loss
from koajax import losses
from koajax import methods
from koajax.data import augment

CLASS_CONFIDENCE = 'class_confidence'


def class_confidence(probs: np.ndarray, labels: np.ndarray,
                     previous: np.ndarray) -> np.ndarray:
  """(C,) mean p(true class) of each class's graded knees; `previous` where a
  class has none."""
  probs, labels = np.asarray(probs), np.asarray(labels)
  out = np.asarray(previous, np.float32).copy()
  for k in range(probs.shape[1]):
    rows = labels == k
    if rows.any():
      out[k] = probs[rows, k].mean()
  return out


@dataclasses.dataclass(frozen=True)
class Confidence(methods.Method):
  """The hybrid loss (or plain cross-entropy) on augmented patch pairs."""
  head: str
  num_classes: int
  loss_kind: str = 'hybrid'  # 'hybrid' or 'ce' (the paper's baseline)
  ratios: tuple[int, int, int] = hybrid_loss.DEFAULT_RATIOS
  weights: tuple[float, float, float] = hybrid_loss.DEFAULT_WEIGHTS
  smoothing: float = 0.15
  max_rotation_deg: float = 10.0
  gamma_p: float = 0.5
  streams: tuple[str, ...] = ('labeled',)

  def init_state(self, training: methods.TrainingData) -> dict[str, Any]:
    del training
    start = hybrid_loss.default_class_confidence(self.num_classes,
                                                 self.smoothing)
    return {CLASS_CONFIDENCE: np.full(self.num_classes, start, np.float32)}

  def update_state(self, state: Any, validation: methods.Validation) -> Any:
    y = np.asarray(validation.labels[self.head])
    graded = y >= 0
    return {**state, CLASS_CONFIDENCE: class_confidence(
        np.asarray(validation.probs[self.head])[graded], y[graded],
        np.asarray(state[CLASS_CONFIDENCE]))}

  def loss(self, forward, batch, key, *, epoch, state):
    del epoch
    k_aug, k_fwd = jax.random.split(key)
    x = augment.augment_batch(
        augment.semixup_augment, k_aug, batch['labeled']['image'],
        noise_p=0.0, pad_fraction=0.0, max_rotation_deg=self.max_rotation_deg,
        gamma_p=self.gamma_p)
    logits = forward(x, k_fwd)['logits'][self.head]
    labels = batch['labeled']['labels'][self.head]
    graded = labels >= 0
    labels = jnp.maximum(labels, 0)
    if self.loss_kind == 'ce':
      return losses.cross_entropy(logits=logits, labels=labels, mask=graded)
    loss, aux = hybrid_loss.hybrid_loss(
        logits=logits, labels=labels,
        class_confidence=state[CLASS_CONFIDENCE], ratios=self.ratios,
        weights=self.weights, smoothing=self.smoothing, mask=graded)
    return loss, {**aux, **{f'class_confidence/{k}': c for k, c in
                            enumerate(state[CLASS_CONFIDENCE])}}


def _create(task, **options) -> Confidence:
  if options.get('loss_kind', 'hybrid') not in ('hybrid', 'ce'):
    raise cli.BadInput("method_kwargs.loss_kind must be 'hybrid' or 'ce'; got "
                       f"{options['loss_kind']!r}")
  for name in ('ratios', 'weights'):
    if name in options:
      options[name] = tuple(options[name])
  head = task.heads[0]
  return Confidence(head=head.name, num_classes=head.num_classes, **options)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Confidence)
             if f.name not in ('head', 'num_classes', 'streams')}

METHODS = {'confidence': methods.Spec(_create, _DEFAULTS)}
