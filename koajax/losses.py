"""Losses of Semixup and its baselines (SL, mixup, Pi-model, ICT, MixMatch).

Every loss is a pure function with keyword-only arguments that takes logits
and/or probabilities (never a model) and returns `(loss, aux)`: a scalar and a
dict of scalar terms for logging. The trainer runs the network, draws the
mixing coefficients and partners with the helpers below, and calls one loss.

Helpers:
  sample_mix_lambda   lambda ~ Beta(alpha, alpha), folded to max(l, 1 - l).
  mixing_permutation  the mixing partner of each sample (random permutation).
  mix                 lambda * a + (1 - lambda) * b, lambda scalar or per row.
  sigmoid_rampup      exp(-5 (1 - t)^2), t = clip(epoch / length, 0, 1).
  sharpen             p^(1/T), renormalised.
  mixmatch_guess      MixMatch label guess: mean over K views, then sharpen.

Normalisation, shared by all the consistency terms (`squared_l2`): squared
differences of probability vectors are summed over the batch and the classes
and divided by Nb * Nc (batch size times number of classes). This is the
reference code's `softmax_mse_loss` (sum / Nc) divided by the batch size, the
MixMatch paper's L_u = 1 / (L |U'|) sum ||q - p||^2, and Semixup's
(1 / (Nb Nc)) L_u. Cross-entropies are means over the batch (the reference's
summed CE divided by the batch size).

Differences from the reference PyTorch code (Oulu-IMEDS/semixup) that koajax
does not reproduce, so that each method matches its paper:
  * Semixup mixes *logits* for the interpolation target,
    softmax(lam z_i + (1 - lam) z_j), and never detaches a target. The paper
    mixes predictions; `semixup(interpolate='logits', stop_gradient=False)`
    gives the reference behaviour.
  * ICT (reference): logits mixed, no detach, weight 10 ramped over 80
    *iterations*, Beta(0.2, 0.2) floored at 0.7, every term divided by
    2 * Nb. MixMatch (reference): the whole loss halved, and the mixed
    guesses (already probabilities) go through a second softmax before the
    squared error. Constant factors of the whole loss are not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Aux = dict[str, Array]


# ----------------------------------------------------------------- helpers


def sample_mix_lambda(key: Array, *, alpha: float = 0.75,
                      floor: float | None = None,
                      shape: Sequence[int] = ()) -> Array:
  """Draws mixup coefficients folded to [0.5, 1].

  lambda ~ Beta(alpha, alpha), lambda <- max(lambda, 1 - lambda), so the mix
  stays closer to its first argument, whose label/prediction it keeps. The
  reference code draws one lambda per batch (the default shape) and raises it
  to at least 0.55 for unlabeled and 0.7 for labeled batches (`floor`).

  Args:
    key: PRNG key.
    alpha: Beta concentration (0.75 Semixup/MixMatch, 0.2 ICT).
    floor: optional lower bound applied after folding.
    shape: () for one coefficient per batch, (B,) for one per sample.

  Returns:
    float32 array of `shape`.
  """
  lam = jax.random.beta(key, alpha, alpha, shape=tuple(shape),
                        dtype=jnp.float32)
  lam = jnp.maximum(lam, 1.0 - lam)
  if floor is not None:
    lam = jnp.maximum(lam, floor)
  return lam


def mixing_permutation(key: Array, n: int) -> Array:
  """Index of each sample's mixing partner: a random permutation of range(n).

  A sample may be its own partner, as with the reference's `torch.randperm`.
  """
  return jax.random.permutation(key, n)


def mix(x: Array, y: Array, lam: Array | float) -> Array:
  """lam * x + (1 - lam) * y; lam a scalar or one value per leading row."""
  dtype = jnp.result_type(x, y)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  lam = jnp.asarray(lam, dtype)
  # Per-sample coefficients (B,) broadcast over all trailing axes.
  lam = lam.reshape(lam.shape + (1,) * (jnp.ndim(x) - lam.ndim))
  return lam * x + (1.0 - lam) * y


def sigmoid_rampup(epoch: Array | float, length: float) -> Array:
  """exp(-5 (1 - t)^2) with t = clip(epoch / length, 0, 1) (Laine & Aila).

  Goes from exp(-5) ~ 0.0067 at epoch 0 to 1 at `length` and stays there;
  `length` 0 means no ramp-up.
  """
  if length == 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(epoch, jnp.float32) / length, 0.0, 1.0)
  return jnp.exp(-5.0 * jnp.square(1.0 - t))


def sharpen(p: Array, temperature: float) -> Array:
  """Lowers the entropy of distributions over the last axis: p^(1/T) / sum."""
  p = jnp.power(p, 1.0 / temperature)
  return p / jnp.sum(p, axis=-1, keepdims=True)


def mixmatch_guess(probs_k_views: Array, temperature: float = 0.5) -> Array:
  """MixMatch label guess from (K, B, C) predictions on K augmentations.

  The guess is a target, not a prediction: no gradient flows through it.
  """
  guess = sharpen(jnp.mean(probs_k_views, axis=0), temperature)
  return jax.lax.stop_gradient(guess)


# ------------------------------------------------------------ shared terms


def _batch_mean(values: Array, mask: Array | None) -> Array:
  """Mean of per-example values over the real (mask = 1) examples."""
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask, jnp.float32)
  # `where`, not a product, so garbage in padded rows cannot leak in.
  total = jnp.sum(jnp.where(mask > 0, values * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def _log_probs(logits: Array) -> Array:
  # float32 even for bf16 logits: log-softmax and its gradient need the range.
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _probs(logits: Array) -> Array:
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _nll(logits: Array, labels: Array) -> Array:
  """Per-example -log p(label)."""
  log_p = _log_probs(logits)
  return -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32),
                              axis=-1)[..., 0]


def squared_l2(*, probs: Array, targets: Array,
               mask: Array | None = None) -> Array:
  """The consistency term: sum of squared differences / (Nb * Nc).

  Symmetric in its arguments and differentiable in both; callers that want a
  constant target apply `jax.lax.stop_gradient` themselves.
  """
  per_example = jnp.mean(jnp.square(probs - targets), axis=-1)
  return _batch_mean(per_example, mask)


# ------------------------------------------------------------ supervised


def cross_entropy(*, logits: Array, labels: Array,
                  mask: Array | None = None) -> tuple[Array, Aux]:
  """Mean CE with integer labels; `mask` (B,) drops padded examples."""
  loss = _batch_mean(_nll(logits, labels), mask)
  return loss, {'cross_entropy': loss}


def multi_head_cross_entropy(*, logits: Mapping[str, Array],
                             labels: Mapping[str, Array]
                             ) -> tuple[Array, Aux]:
  """Unweighted mean over heads of each head's CE over its graded knees.

  Labels of -1 (ungraded) are masked. A head with no graded knee in the
  batch has no cross-entropy and leaves the mean (it is not counted as 0);
  a batch with no graded knee at all gives 0.
  """
  per_head, present = {}, []
  for head, z in logits.items():
    y = labels[head]
    graded = y >= 0
    per_head[head] = _batch_mean(_nll(z, jnp.maximum(y, 0)), graded)
    present.append(jnp.any(graded))
  present = jnp.stack(present).astype(jnp.float32)
  losses = jnp.stack(list(per_head.values()))
  loss = jnp.sum(losses * present) / jnp.maximum(jnp.sum(present), 1.0)
  return loss, {f'cross_entropy/{h}': v for h, v in per_head.items()}


def class_weighted_cross_entropy(*, logits: Array, labels: Array,
                                 class_weights: Array) -> tuple[Array, Aux]:
  """CE weighted by the true class, over the graded knees (label >= 0).

  sum_i w[y_i] (-log p_i(y_i)) / sum_i w[y_i], PyTorch's
  `CrossEntropyLoss(weight=w, ignore_index=-1)`: a batch's loss is a
  weighted mean, so the scale of `class_weights` does not matter, only
  their ratios. 0 when no knee of the batch is graded.

  Args:
    logits: (B, C).
    labels: (B,) int, -1 for an ungraded knee.
    class_weights: (C,) weight of each class.
  """
  graded = labels >= 0
  y = jnp.maximum(labels, 0)
  w = jnp.where(graded, jnp.asarray(class_weights, jnp.float32)[y], 0.0)
  nll = jnp.where(graded, _nll(logits, y), 0.0)
  loss = jnp.sum(w * nll) / jnp.where(jnp.sum(w) > 0, jnp.sum(w), 1.0)
  return loss, {'cross_entropy': loss}


def soft_cross_entropy(*, logits: Array, targets: Array,
                       mask: Array | None = None) -> tuple[Array, Aux]:
  """Mean CE against target distributions (B, C), e.g. mixed one-hots."""
  per_example = -jnp.sum(targets * _log_probs(logits), axis=-1)
  loss = _batch_mean(per_example, mask)
  return loss, {'cross_entropy': loss}


def mixup(*, logits_mixed: Array, labels_a: Array, labels_b: Array,
          lam: Array | float, mask: Array | None = None) -> tuple[Array, Aux]:
  """lam CE(f(mix), y_a) + (1 - lam) CE(f(mix), y_b), lam scalar or (B,).

  Equal to `soft_cross_entropy` with mixed one-hot targets.
  """
  nll_a = _nll(logits_mixed, labels_a)
  nll_b = _nll(logits_mixed, labels_b)
  loss = _batch_mean(mix(nll_a, nll_b, lam), mask)
  return loss, {'cross_entropy_a': _batch_mean(nll_a, mask),
                'cross_entropy_b': _batch_mean(nll_b, mask)}


# --------------------------------------------------------- semi-supervised


def pi_model(*, logits_labeled: Array, labels: Array, probs_view1: Array,
             probs_view2: Array, weight: Array | float = 1.0,
             mask_labeled: Array | None = None,
             mask_unlabeled: Array | None = None) -> tuple[Array, Aux]:
  """Pi-model: CE + weight * ||f(Tx) - f(T'x)||^2 / (Nb Nc).

  Gradients flow through both views, as in Laine & Aila and the reference
  code (which detaches neither); weight 1 in the Semixup comparison.
  """
  supervised, _ = cross_entropy(logits=logits_labeled, labels=labels,
                                mask=mask_labeled)
  consistency = squared_l2(probs=probs_view1, targets=probs_view2,
                           mask=mask_unlabeled)
  loss = supervised + weight * consistency
  return loss, {'supervised': supervised, 'consistency': consistency}


def ict(*, logits_labeled: Array, labels: Array, probs_mixed: Array,
        probs_target_mixed: Array, weight: Array | float,
        mask_labeled: Array | None = None,
        mask_unlabeled: Array | None = None) -> tuple[Array, Aux]:
  """Interpolation Consistency Training: CE + weight * ICT term.

  The ICT term is ||f(Mix(u_i, u_j)) - Mix(f(u_i), f(u_j))||^2 / (Nb Nc), with
  `probs_mixed` = softmax f(Mix(u_i, u_j)) and `probs_target_mixed` =
  Mix(softmax f(u_i), softmax f(u_j)). In ICT the target comes from an EMA
  teacher; koajax trains without EMA, so the trainer passes the model's own
  predictions and the target is held constant here (stop_gradient), which is
  how ICT treats it. Labeled data get plain CE (no mixup). The weight is the
  trainer's: 100 * sigmoid_rampup(epoch, 80).
  """
  supervised, _ = cross_entropy(logits=logits_labeled, labels=labels,
                                mask=mask_labeled)
  consistency = squared_l2(probs=probs_mixed,
                           targets=jax.lax.stop_gradient(probs_target_mixed),
                           mask=mask_unlabeled)
  loss = supervised + weight * consistency
  return loss, {'supervised': supervised, 'consistency': consistency}


def mixmatch(*, logits_labeled_mixed: Array, targets_labeled_mixed: Array,
             probs_unlabeled_mixed: Array, targets_unlabeled_mixed: Array,
             weight_u: Array | float = 10.0,
             mask_labeled: Array | None = None,
             mask_unlabeled: Array | None = None) -> tuple[Array, Aux]:
  """MixMatch: L_x + weight_u * L_u (Berthelot et al. 2019, eq. 2-5).

  L_x is the soft CE of the mixed labeled batch X' against its mixed targets,
  L_u = 1 / (L |U'|) sum ||q - p||^2 (L classes) on the mixed unlabeled batch
  U'. Targets (mixed one-hots and `mixmatch_guess` guesses) are constants.
  """
  loss_x, _ = soft_cross_entropy(
      logits=logits_labeled_mixed,
      targets=jax.lax.stop_gradient(targets_labeled_mixed), mask=mask_labeled)
  loss_u = squared_l2(
      probs=probs_unlabeled_mixed,
      targets=jax.lax.stop_gradient(targets_unlabeled_mixed),
      mask=mask_unlabeled)
  loss = loss_x + weight_u * loss_u
  return loss, {'loss_x': loss_x, 'loss_u': loss_u}


# ----------------------------------------------------------------- Semixup

_UNLABELED_TERMS = ('in_manifold', 'out_of_manifold', 'interpolation')


@dataclasses.dataclass(frozen=True)
class SemixupTerms:
  """Weights of the Semixup terms; 0 (or False) drops a term (Table V).

  Attributes:
    in_manifold: w0, on ||f(Tx) - f(T'x)||^2.
    out_of_manifold: w1, on each of ||f(mix) - f(Tx)||^2 and
      ||f(mix) - f(T'x)||^2.
    interpolation: w2, on ||f(mix) - Mix(f(Tx), f(x_j))||^2.
    mixup_labeled: mixup CE on labeled data; plain CE when False.

  Defaults w = (2, 2, 4) are the reference scripts' effective values
  (`--in_mnf_coef 2 --in_out_mnf_coef 2 --ic_coef 4`, the argparse defaults
  that no script overrides).
  """

  in_manifold: float = 2.0
  out_of_manifold: float = 2.0
  interpolation: float = 4.0
  mixup_labeled: bool = True

  def without(self, *names: str) -> SemixupTerms:
    """A copy with the named terms dropped, e.g. `.without('interpolation')`."""
    fields = {f.name for f in dataclasses.fields(self)}
    unknown = set(names) - fields
    if unknown:
      raise ValueError(f'unknown Semixup terms {sorted(unknown)}; '
                       f'choose from {sorted(fields)}')
    return dataclasses.replace(
        self, **{n: False if n == 'mixup_labeled' else 0.0 for n in names})


def _dropped(weight: float) -> bool:
  # Only a literal 0 skips a term; a traced weight is always kept.
  return isinstance(weight, (int, float)) and weight == 0


def semixup(*, logits_labeled: Array, labels: Array,
            labels_partner: Array | None = None,
            lam_labeled: Array | float | None = None,
            logits_aug1: Array, logits_aug2: Array, logits_mixed: Array,
            logits_partner: Array, lam: Array | float,
            terms: SemixupTerms = SemixupTerms(),
            interpolate: Literal['probs', 'logits'] = 'probs',
            stop_gradient: bool = True,
            mask_labeled: Array | None = None,
            mask_unlabeled: Array | None = None) -> tuple[Array, Aux]:
  """The Semixup loss (paper Algorithm 1): L = L_l / Nb + L_u / (Nb Nc).

  Unlabeled batch (drawn from labeled U unlabeled data), with T, T' two
  augmentations, x_j the mixing partner and mix = Mix_lam(Tx, x_j):
    L_u / (Nb Nc) = w0 ||f(Tx) - f(T'x)||^2
                  + w1 (||f(mix) - f(Tx)||^2 + ||f(mix) - f(T'x)||^2)
                  + w2 ||f(mix) - Mix_lam(f(Tx), f(x_j))||^2,
  each squared norm between softmax outputs, through `squared_l2`. In the
  reference code x_j is the permuted augmented batch, so `logits_partner` is
  just `logits_aug1[perm]` and costs no extra forward pass.
  Labeled batch: mixup CE lam CE(f(mix_l), y) + (1 - lam) CE(f(mix_l), y_j).
  Each batch is normalised by its own size (they may differ).

  Args:
    logits_labeled: f of the mixed labeled batch (of the plain batch when
      `terms.mixup_labeled` is False).
    labels: integer labels y of the labeled batch.
    labels_partner: labels of the labeled mixing partners, y_j.
    lam_labeled: mixing coefficient(s) of the labeled batch.
    logits_aug1: f(Tx) on the unlabeled batch.
    logits_aug2: f(T'x), a second augmentation of the same images.
    logits_mixed: f(Mix_lam(Tx, x_j)).
    logits_partner: f(x_j).
    lam: unlabeled mixing coefficient(s), scalar or (B,).
    terms: term weights; `SemixupTerms().without(...)` for the ablations.
    interpolate: 'probs' mixes the softmax outputs, Mix(f(Tx), f(x_j)) as
      in the paper; 'logits' takes softmax of the mixed logits, as in the
      reference code.
    stop_gradient: hold the interpolation target constant (ICT's treatment
      of the same term). The reference code propagates through it
      (`interpolate='logits', stop_gradient=False` reproduces it).
    mask_labeled: (B_l,) 1 for real, 0 for padded labeled examples.
    mask_unlabeled: (B_u,) the same for the unlabeled batch.

  Returns:
    (loss, aux): aux holds the labeled loss ('supervised'), every unweighted
    unlabeled term (also dropped ones, for monitoring; 'out_of_manifold' is
    the sum of its two squared norms) and their weighted sum ('unlabeled').
  """
  if interpolate not in ('probs', 'logits'):
    raise ValueError(f"interpolate must be 'probs' or 'logits', "
                     f'got {interpolate!r}')

  if terms.mixup_labeled:
    if labels_partner is None or lam_labeled is None:
      raise ValueError('labeled mixup needs labels_partner and lam_labeled')
    supervised, _ = mixup(logits_mixed=logits_labeled, labels_a=labels,
                          labels_b=labels_partner, lam=lam_labeled,
                          mask=mask_labeled)
  else:
    supervised, _ = cross_entropy(logits=logits_labeled, labels=labels,
                                  mask=mask_labeled)

  p_aug1, p_aug2, p_mixed = (_probs(logits_aug1), _probs(logits_aug2),
                             _probs(logits_mixed))
  if interpolate == 'probs':
    target = mix(p_aug1, _probs(logits_partner), lam)
  else:
    target = _probs(mix(logits_aug1, logits_partner, lam))
  if stop_gradient:
    target = jax.lax.stop_gradient(target)

  def sq_l2(probs, targets):
    return squared_l2(probs=probs, targets=targets, mask=mask_unlabeled)

  raw = {
      'in_manifold': sq_l2(p_aug1, p_aug2),
      'out_of_manifold': sq_l2(p_mixed, p_aug1) + sq_l2(p_mixed, p_aug2),
      'interpolation': sq_l2(p_mixed, target),
  }
  unlabeled = jnp.zeros((), jnp.float32)
  for name in _UNLABELED_TERMS:
    weight = getattr(terms, name)
    if not _dropped(weight):
      unlabeled = unlabeled + weight * raw[name]

  loss = supervised + unlabeled
  return loss, {'supervised': supervised, **raw, 'unlabeled': unlabeled}
