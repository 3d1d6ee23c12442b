"""Semixup and its baselines: SL, mixup, Pi-model, ICT, MixMatch, Semixup.

Each is a pure loss function

    fn(forward, batch, key, *, epoch, head, ...) -> (loss, aux)

on one classification head of the task (`head`, the task's first): `forward(
images, key)` runs the model in training mode (dropout on, keyed by `key`)
on float Siamese pairs (N, 2, H, W), `batch` holds uint8 images and labels
('labeled', and 'unlabeled' for the semi-supervised methods), and `epoch` is
the (fractional) epoch for ramp-ups. None keeps state. Augmentation happens here, on the
device, so it fuses into the jitted step. Each view is its own forward call:
concatenating the views along the sharded batch axis would move images
between devices and give each device a larger batch, on which XLA's CPU
weight-gradient convolutions run slower per knee (the Semixup step took 57 s
with one call on the concatenated views, 45 s with one per view; see
benchmarks/README.md). For the same reason the consistency pool (labeled U
unlabeled knees) is kept as its two streams, and its views go to `forward`
as those parts: each runs as its own call unless the model has batch norm,
whose statistics are over the whole pool (`koajax.train.step.forward_parts`).
Every augmentation and mixing draw is the one the concatenated pool would
get, and with batch norm the step computes what it would on it (to float
rounding: XLA may sum in another order).

The losses themselves are the pure functions of `koajax.losses`; a method is
the recipe of views around one of them, and a config picks it by name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from koajax import losses
from koajax import methods
from koajax.data import augment

Array = jax.Array
Forward = Callable[[Array, Array], Array]
Parts = tuple[Array, ...]  # one batch as arrays to concatenate


def _augment(key: Array, images: Array) -> Array:
  """Semixup's Table S1 augmentation, one independent draw per knee."""
  return augment.augment_batch(augment.semixup_augment, key, images)


def _augment_parts(key: Array, parts: Parts) -> Parts:
  """`_augment(key, concatenate(parts))`, as its parts."""
  return augment.augment_parts(augment.semixup_augment, key, parts)


def _mix_parts(parts: Parts, perm: Array, lam: Array) -> Parts:
  """`mix(x, x[perm], lam)` of x = concatenate(parts), as its parts; `lam`
  a scalar or one value per sample of x."""
  whole = jnp.concatenate(parts)
  out, start = [], 0
  for part in parts:
    rows = slice(start, start + part.shape[0])
    start = rows.stop
    part_lam = lam if jnp.ndim(lam) == 0 else lam[rows]
    out.append(losses.mix(part, whole[perm[rows]], part_lam))
  return tuple(out)


def _forward(forward: Forward, key: Array, head: str,
             *views: Array | Parts) -> list[Array]:
  """`head`'s logits of several view batches (each an array or a tuple of
  parts), one forward pass (and dropout key) per view."""
  return [forward(v, jax.random.fold_in(key, i))['logits'][head]
          for i, v in enumerate(views)]


def _labels(batch: Mapping[str, Any], head: str) -> Array:
  return batch['labeled']['labels'][head]


def supervised(forward: Forward, batch: Mapping[str, Any], key: Array, *,
               epoch: Array, head: str = 'kl') -> tuple[Array, dict[str, Array]]:
  """SL: cross-entropy on augmented labeled knees."""
  del epoch
  k_aug, k_fwd = jax.random.split(key)
  x = _augment(k_aug, batch['labeled']['image'])
  (logits,) = _forward(forward, k_fwd, head, x)
  return losses.cross_entropy(logits=logits, labels=_labels(batch, head))


def mixup(forward: Forward, batch: Mapping[str, Any], key: Array, *,
          epoch: Array, head: str = 'kl', alpha: float = 0.75,
          floor: float | None = None) -> tuple[Array, dict[str, Array]]:
  """Mixup on labeled knees: lam CE(mix, y_i) + (1 - lam) CE(mix, y_j)."""
  del epoch
  k_aug, k_lam, k_perm, k_fwd = jax.random.split(key, 4)
  x, y = _augment(k_aug, batch['labeled']['image']), _labels(batch, head)
  lam = losses.sample_mix_lambda(k_lam, alpha=alpha, floor=floor)
  perm = losses.mixing_permutation(k_perm, x.shape[0])
  (logits,) = _forward(forward, k_fwd, head, losses.mix(x, x[perm], lam))
  return losses.mixup(logits_mixed=logits, labels_a=y, labels_b=y[perm],
                      lam=lam)


def _consistency_pool(batch: Mapping[str, Any]) -> Parts:
  """The knees consistency terms use, labeled and unlabeled together, as
  the parts of one batch."""
  return batch['labeled']['image'], batch['unlabeled']['image']


def pi_model(forward: Forward, batch: Mapping[str, Any], key: Array, *,
             epoch: Array, head: str = 'kl', weight: float = 1.0
             ) -> tuple[Array, dict[str, Array]]:
  """Pi-model: CE + ||f(Tx) - f(T'x)||^2 over labeled U unlabeled knees."""
  del epoch
  k1, k2, k3, k_fwd = jax.random.split(key, 4)
  pool = _consistency_pool(batch)
  logits_l, logits_1, logits_2 = _forward(
      forward, k_fwd, head, _augment(k1, batch['labeled']['image']),
      _augment_parts(k2, pool), _augment_parts(k3, pool))
  return losses.pi_model(
      logits_labeled=logits_l, labels=_labels(batch, head),
      probs_view1=jax.nn.softmax(logits_1), probs_view2=jax.nn.softmax(logits_2),
      weight=weight)


def ict(forward: Forward, batch: Mapping[str, Any], key: Array, *,
        epoch: Array, head: str = 'kl', max_weight: float = 100.0, rampup_epochs: float = 80.0,
        alpha: float = 0.75) -> tuple[Array, dict[str, Array]]:
  """ICT: CE (no mixup) + w(t) ||f(Mix(u_i, u_j)) - Mix(f(u_i), f(u_j))||^2.

  The weight ramps from 0 to `max_weight` with the sigmoid ramp-up over
  `rampup_epochs`. With no teacher network (no EMA), the targets f(u) come
  from the model itself in the same pass and are held constant.
  """
  k_l, k_u, k_lam, k_perm, k_fwd = jax.random.split(key, 5)
  u = _augment_parts(k_u, _consistency_pool(batch))
  lam = losses.sample_mix_lambda(k_lam, alpha=alpha)
  perm = losses.mixing_permutation(k_perm, sum(p.shape[0] for p in u))
  logits_l, logits_u, logits_mix = _forward(
      forward, k_fwd, head, _augment(k_l, batch['labeled']['image']), u,
      _mix_parts(u, perm, lam))
  probs_u = jax.nn.softmax(logits_u)
  weight = max_weight * losses.sigmoid_rampup(epoch, rampup_epochs)
  loss, aux = losses.ict(
      logits_labeled=logits_l, labels=_labels(batch, head),
      probs_mixed=jax.nn.softmax(logits_mix),
      probs_target_mixed=losses.mix(probs_u, probs_u[perm], lam),
      weight=weight)
  return loss, {**aux, 'consistency_weight': weight}


def mixmatch(forward: Forward, batch: Mapping[str, Any], key: Array, *,
             epoch: Array, head: str = 'kl', num_augmentations: int = 2,
             temperature: float = 0.5, alpha: float = 0.75,
             weight_u: float = 10.0, num_classes: int = 5
             ) -> tuple[Array, dict[str, Array]]:
  """MixMatch: guessed labels from K views, mixup over labeled U unlabeled."""
  del epoch
  k_l, k_u, k_lam, k_perm, k_guess, k_fwd = jax.random.split(key, 6)
  x = _augment(k_l, batch['labeled']['image'])
  u_images = batch['unlabeled']['image']
  u_views = tuple(_augment(k, u_images) for k in
                  jax.random.split(k_u, num_augmentations))
  n_u = u_images.shape[0]
  # The guess is made with dropout as in training; it carries no gradient.
  guess_logits = _forward(forward, k_guess, head, u_views)[0]
  guess = losses.mixmatch_guess(
      jax.nn.softmax(guess_logits).reshape(num_augmentations, n_u, -1),
      temperature)
  inputs = (x, *u_views)
  targets = jnp.concatenate([
      jax.nn.one_hot(_labels(batch, head), num_classes),
      jnp.tile(guess, (num_augmentations, 1))])
  n = targets.shape[0]
  # One coefficient per sample, folded >= 0.5 so each mix stays closer to
  # its own (labeled or unlabeled) sample.
  lam = losses.sample_mix_lambda(k_lam, alpha=alpha, shape=(n,))
  perm = losses.mixing_permutation(k_perm, n)
  mixed = _mix_parts(inputs, perm, lam)
  mixed_targets = losses.mix(targets, targets[perm], lam)
  n_l = x.shape[0]
  (logits,) = _forward(forward, k_fwd, head, mixed)
  return losses.mixmatch(
      logits_labeled_mixed=logits[:n_l],
      targets_labeled_mixed=mixed_targets[:n_l],
      probs_unlabeled_mixed=jax.nn.softmax(logits[n_l:]),
      targets_unlabeled_mixed=mixed_targets[n_l:], weight_u=weight_u)


def semixup(forward: Forward, batch: Mapping[str, Any], key: Array, *,
            epoch: Array, head: str = 'kl',
            terms: losses.SemixupTerms = losses.SemixupTerms(),
            alpha: float = 0.75, floor_unlabeled: float | None = None,
            floor_labeled: float | None = None,
            interpolate: str = 'probs', stop_gradient: bool = True
            ) -> tuple[Array, dict[str, Array]]:
  """Semixup (paper Algorithm 1) over labeled U unlabeled knees.

  Tx and T'x are two independent augmentations; the mixing partner x_j is
  Tx permuted within the batch, so f(x_j) is f(Tx) permuted and costs no
  extra pass. Paper defaults; `floor_*=0.55/0.7, interpolate='logits',
  stop_gradient=False` reproduce the reference code.
  """
  del epoch
  k1, k2, k_l, k_lam, k_lam_l, k_perm, k_perm_l, k_fwd = jax.random.split(key, 8)
  pool = _consistency_pool(batch)
  t1, t2 = _augment_parts(k1, pool), _augment_parts(k2, pool)
  lam = losses.sample_mix_lambda(k_lam, alpha=alpha, floor=floor_unlabeled)
  perm = losses.mixing_permutation(k_perm, sum(p.shape[0] for p in pool))
  x_l, y = _augment(k_l, batch['labeled']['image']), _labels(batch, head)
  lam_l = losses.sample_mix_lambda(k_lam_l, alpha=alpha, floor=floor_labeled)
  perm_l = losses.mixing_permutation(k_perm_l, x_l.shape[0])
  if terms.mixup_labeled:
    x_l = losses.mix(x_l, x_l[perm_l], lam_l)
  logits_l, logits_1, logits_2, logits_mix = _forward(
      forward, k_fwd, head, x_l, t1, t2, _mix_parts(t1, perm, lam))
  return losses.semixup(
      logits_labeled=logits_l, labels=y, labels_partner=y[perm_l],
      lam_labeled=lam_l, logits_aug1=logits_1, logits_aug2=logits_2,
      logits_mixed=logits_mix, logits_partner=logits_1[perm], lam=lam,
      terms=terms, interpolate=interpolate, stop_gradient=stop_gradient)


def _family(fn: Callable[..., Any], *,
            streams: tuple[str, ...] = ('labeled', 'unlabeled')
            ) -> methods.Spec:
  """A Spec for one of the functions above, on the task's first head."""
  params = inspect.signature(fn).parameters
  task_given = {'epoch', 'head', 'num_classes'}

  def create(task, **options):
    head = task.heads[0]
    bound = {'head': head.name}
    if 'num_classes' in params:
      bound['num_classes'] = head.num_classes
    if 'terms' in options:
      options['terms'] = losses.SemixupTerms(**dict(options['terms']))
    return methods.LossMethod(functools.partial(fn, **bound, **options),
                              streams=streams)

  return methods.Spec(create, {
      name: p.default for name, p in params.items()
      if p.kind is p.KEYWORD_ONLY and name not in task_given})


METHODS = {
    'supervised': _family(supervised, streams=('labeled',)),
    'mixup': _family(mixup, streams=('labeled',)),
    'pi_model': _family(pi_model),
    'ict': _family(ict),
    'mixmatch': _family(mixmatch),
    'semixup': _family(semixup),
}
