"""The confidence-driven hybrid loss of Wang et al. (2025), a pure function.

The confidence of a sample is c_s = p(true class). Within the batch, each
class's samples are ranked by c_s (descending; ties keep batch order) and
split into high / medium / low confidence by `ratios` (7:2:1): the sample of
rank r among a class's n goes to the first group whose cumulative share
exceeds (r + 1/2) / n, so 10 samples split exactly 7 / 2 / 1, a lone sample
is highly confident and two split 1 / 1 between high and medium. Then

  J = w_high J_LSCE(high) + w_medium J_KLD(medium) + w_low J_CE(low)

with weights 0.4 / 0.5 / 0.1, each term the mean over its group (0 for an
empty group):

  J_LSCE  cross-entropy against the label smoothed by eps (0.15): 1 - eps +
          eps / C on the true class, eps / C on each other;
  J_KLD   KL(q || p), q the class's target confidence c_k (the mean
          validation confidence of the true class, method state) on the true
          class and (1 - c_k) / (C - 1) on each other: a medium-confidence
          sample is pulled toward how confident the model is on that class
          in general, not toward certainty;
  J_CE    plain cross-entropy.

The ranking and the groups cover the whole batch the function is given: in
a jitted step over a batch sharded on several devices, XLA sorts the global
array, so 1 and 8 devices give the same loss (tested). Masked samples
(`mask` 0, e.g. padding) take part in no group.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_RATIOS = (7, 2, 1)
DEFAULT_WEIGHTS = (0.4, 0.5, 0.1)
GROUPS = ('high', 'medium', 'low')


def default_class_confidence(num_classes: int,
                             smoothing: float = 0.15) -> float:
  """c_k before the first evaluation: the smoothed label's true-class
  value, the target the high-confidence group is trained toward."""
  return 1.0 - smoothing + smoothing / num_classes


def confidence_groups(confidence: Array, labels: Array, *,
                      ratios: Sequence[float] = DEFAULT_RATIOS,
                      mask: Array | None = None) -> Array:
  """(B,) int32 group of each sample: 0 high, 1 medium, 2 low, -1 masked.

  `ratios` are whole numbers (7:2:1), so the cut is exact.
  """
  if any(int(r) != r or r <= 0 for r in ratios) or len(ratios) != 3:
    raise ValueError(f'ratios must be three whole numbers > 0 (high:medium:'
                     f'low, e.g. 7:2:1); got {tuple(ratios)}')
  n = confidence.shape[0]
  valid = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask) > 0
  ratios = [int(r) for r in ratios]
  # Rank within the class: count the same-class samples ahead of each one
  # (higher confidence, or equal and earlier in the batch). O(B^2), but
  # exact, sort-free and global over a sharded batch.
  idx = jnp.arange(n)
  same = (labels[:, None] == labels[None, :]) & valid[None, :] & valid[:, None]
  ahead = (confidence[None, :] > confidence[:, None]) | (
      (confidence[None, :] == confidence[:, None]) & (idx[None, :] < idx[:, None]))
  rank = jnp.sum(same & ahead, axis=1, dtype=jnp.int32)
  count = jnp.sum(same, axis=1, dtype=jnp.int32)
  # (rank + 1/2) / count >= cumulative share, in integers: a float quotient
  # lands on either side of a boundary (7 of 10) by rounding.
  total = sum(ratios)
  group = jnp.zeros((n,), jnp.int32)
  cumulative = 0
  for r in ratios[:-1]:
    cumulative += r
    group += ((2 * rank + 1) * total >= 2 * count * cumulative).astype(
        jnp.int32)
  return jnp.where(valid, group, -1).astype(jnp.int32)


def hybrid_loss(*, logits: Array, labels: Array, class_confidence: Array,
                ratios: Sequence[float] = DEFAULT_RATIOS,
                weights: Sequence[float] = DEFAULT_WEIGHTS,
                smoothing: float = 0.15, mask: Array | None = None
                ) -> tuple[Array, dict[str, Array]]:
  """(J, aux): the hybrid loss of (B, C) logits, (B,) labels and (C,)
  class confidences c_k; aux holds each term and each group's size."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  num_classes = log_p.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes)
  confidence = jnp.exp(jnp.sum(log_p * onehot, axis=-1))
  group = confidence_groups(jax.lax.stop_gradient(confidence), labels,
                            ratios=ratios, mask=mask)

  smooth = onehot * (1.0 - smoothing) + smoothing / num_classes
  lsce = -jnp.sum(smooth * log_p, axis=-1)
  c_k = jnp.asarray(class_confidence, jnp.float32)[labels]
  other = (1.0 - c_k) / max(num_classes - 1, 1)
  target = jnp.where(onehot > 0, c_k[:, None], other[:, None])
  # q log q with 0 log 0 = 0.
  q_log_q = jnp.where(target > 0, target * jnp.log(jnp.where(target > 0,
                                                             target, 1.0)),
                      0.0)
  kld = jnp.sum(q_log_q - target * log_p, axis=-1)
  ce = -jnp.sum(onehot * log_p, axis=-1)

  aux = {}
  loss = jnp.zeros((), jnp.float32)
  for g, (name, per_sample, w) in enumerate(zip(
      GROUPS, (lsce, kld, ce), weights)):
    members = (group == g).astype(jnp.float32)
    size = jnp.sum(members)
    term = jnp.sum(per_sample * members) / jnp.maximum(size, 1.0)
    loss = loss + w * term
    aux[f'{name}_term'] = term
    aux[f'{name}_size'] = size
  return loss, aux
