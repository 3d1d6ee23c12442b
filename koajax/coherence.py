"""Coherence learning's coherence model (Zheng et al. 2021), pure functions.

A knee's grades are not independent: a KL 4 knee with no narrowing and no
osteophyte is not a real knee. Coherence learning learns what real grade
combinations look like as a Gaussian mixture over the 29-d concatenation of
the seven heads' one-hot grades (task `kl_oarsi`: KL 5 classes, then the six
OARSI grades, 4 classes each, in `koajax.tasks` order), fitted once before
training, and penalises predictions the mixture finds unlikely:

  g(P)   = log sum_k w_k N(P; mu_k, Sigma_k)      (the paper's Eq. 3)
  L_gmm  = softplus(-tau g(P)) / tau = log(1 + exp(-tau g(P))) / tau

with P the concatenated class probabilities of a knee, labeled or not, and
tau = 0.5. The loss is about -g(P) where the mixture finds P unlikely
(g << 0) and fades to 0 where it finds P likely (g >> 0).

`fit_gmm` fits scikit-learn's `GaussianMixture` (full covariance, EM) on the
one-hot grade vectors of the training knees plus seeded Gaussian noise and
returns its parameters as float32 arrays: the method's state, checkpointed
with the weights. `log_density` is scikit-learn's `score_samples` for a
'full' mixture written in JAX, so it runs inside the jitted step and the
loss's gradient flows through P.

Only fully graded knees enter the fit. A knee with an ungraded head has no
one-hot vector, and filling the gap (with the head's prior, say) would put
mass on grade combinations nobody observed, the very thing the mixture is
there to rule out. The knee still teaches the other heads through their
cross-entropy and the coherence loss through its predictions; only the fit
leaves it out (a log line counts how many).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from koajax import cli

Array = jax.Array

log = logging.getLogger(__name__)

DEFAULT_COMPONENTS = 10
DEFAULT_NOISE = 0.2
DEFAULT_TAU = 0.5
DEFAULT_REG_COVAR = 1e-6
# A component's smallest covariance eigenvalue below this fraction of the
# noise's variance counts as (nearly) singular (`fit_gmm` warns).
THIN_VARIANCE = 0.01

# The parameter arrays `fit_gmm` returns and `log_density` reads.
PARAM_KEYS = ('weights', 'means', 'precisions_cholesky')


def one_hot_grades(grades: np.ndarray,
                   num_classes: Sequence[int]) -> np.ndarray:
  """(n, sum(num_classes)) float64 one-hot vectors of (n, heads) grades, the
  heads side by side in column order; an ungraded head (-1) is all zeros."""
  grades = np.asarray(grades)
  return np.concatenate(
      [(grades[:, j, None] == np.arange(c)).astype(np.float64)
       for j, c in enumerate(num_classes)], axis=1)


def fit_gmm(grades: np.ndarray, num_classes: Sequence[int], *,
            components: int = DEFAULT_COMPONENTS,
            noise: float = DEFAULT_NOISE, seed: int = 0,
            reg_covar: float = DEFAULT_REG_COVAR) -> dict[str, np.ndarray]:
  """Fits the coherence mixture on the training knees' grades.

  Args:
    grades: (n, heads) int grades in head order, -1 for an ungraded head;
      only the knees graded on every head are fitted (see the module doc).
    num_classes: classes of each head, in the same order (29 in all for
      `kl_oarsi`).
    components: mixture components K (the paper: 10).
    noise: standard deviation of the Gaussian noise added to every one-hot
      entry (the paper's N(0, 0.2)); without it each component would sit on
      a handful of exact one-hot points and its covariance would be
      singular.
    seed: seeds the noise and scikit-learn's k-means initialisation; the
      same grades and seed give the same mixture.
    reg_covar: added to the diagonal of every covariance (scikit-learn's
      `reg_covar`). A component left nearly singular (fewer knees than its
      D dimensions need) is a logged warning that names this field.

  Returns:
    {'weights': (K,), 'means': (K, D), 'precisions_cholesky': (K, D, D)},
    float32, D = sum(num_classes): what `log_density` needs (the upper
    triangular Cholesky factors of the precisions, as scikit-learn scores
    with them).

  Raises:
    cli.BadInput (a ValueError): grades outside their head's classes, fewer
      fully graded knees than components, or a fit that found a singular
      covariance; the message says what to change.
  """
  # Imported here: only the fit needs scikit-learn, not the train step.
  from sklearn import exceptions as sk_exceptions  # pylint: disable=g-import-not-at-top
  from sklearn import mixture  # pylint: disable=g-import-not-at-top

  grades = np.asarray(grades)
  num_classes = [int(c) for c in num_classes]
  if grades.ndim != 2 or grades.shape[1] != len(num_classes):
    raise cli.BadInput(
        f'coherence grades must be (knees, {len(num_classes)}) to match '
        f'{len(num_classes)} heads; got shape {grades.shape}')
  for j, c in enumerate(num_classes):
    bad = (grades[:, j] < -1) | (grades[:, j] >= c)
    if bad.any():
      raise cli.BadInput(
          f'coherence grades of head {j} must be -1 (ungraded) or 0..{c - 1}; '
          f'{int(bad.sum())} knees hold others (e.g. {grades[bad, j][0]}): '
          'map the cache grades to class labels first (Task.labels)')
  if components < 1 or noise < 0 or reg_covar < 0:
    raise cli.BadInput(
        'coherence components must be >= 1, noise and reg_covar >= 0; got '
        f'{components}, {noise:g} and {reg_covar:g}')
  graded = np.all(grades >= 0, axis=1)
  n_graded, n_left_out = int(graded.sum()), int((~graded).sum())
  if n_graded < components:
    raise cli.BadInput(
        f'only {n_graded} training knees are graded on all {len(num_classes)} '
        f'heads ({n_left_out} lack a grade) for {components} coherence '
        'components: lower coherence components or give more graded knees')
  x = one_hot_grades(grades[graded], num_classes)
  x += np.random.default_rng(seed).normal(0.0, noise, x.shape)
  gmm = mixture.GaussianMixture(components, covariance_type='full',
                                reg_covar=reg_covar, random_state=seed)
  try:
    with warnings.catch_warnings():
      # EM's own warning is logged below, saying what it means here.
      warnings.simplefilter('ignore', sk_exceptions.ConvergenceWarning)
      gmm.fit(x)
  except ValueError as error:
    if 'reg_covar' not in str(error):
      raise
    raise cli.BadInput(
        f'fitting the coherence mixture ({components} components on '
        f'{n_graded} knees) failed: a component has a singular covariance; '
        f'raise reg_covar (now {reg_covar:g}) or use fewer coherence '
        'components') from error
  if not gmm.converged_:
    log.warning('The coherence mixture did not converge in %d EM iterations; '
                'it is used as it stands', gmm.n_iter_)
  # A component fitted on fewer knees than the D dimensions need spans too
  # few directions: only reg_covar keeps it invertible, and its density off
  # its own knees falls by orders of magnitude (g of -1e5, a loss to match).
  floor = THIN_VARIANCE * noise ** 2
  thin = [k for k, cov in enumerate(gmm.covariances_)
          if np.linalg.eigvalsh(cov)[0] < floor]
  if thin and reg_covar < floor:
    log.warning(
        'Coherence mixture components %s have (nearly) singular covariances '
        '(%s of %d knees for %d dimensions): their log-density is extreme '
        'away from their knees. Raise reg_covar (now %g; e.g. %g) or use '
        'fewer coherence components', thin,
        ', '.join(f'{gmm.weights_[k] * n_graded:.0f}' for k in thin),
        n_graded, x.shape[1], reg_covar, noise ** 2 / 4)
  log.info('Coherence mixture: %d components fitted on %d fully graded knees '
           '(%d knees with an ungraded head left out), mean log-likelihood '
           '%.3f', components, n_graded, n_left_out, gmm.lower_bound_)
  return {'weights': gmm.weights_.astype(np.float32),
          'means': gmm.means_.astype(np.float32),
          'precisions_cholesky': gmm.precisions_cholesky_.astype(np.float32)}


def log_density(params: Mapping[str, Array], x: Array) -> Array:
  """(n,) log-density of the mixture `params` (`fit_gmm`) at the rows of x.

  scikit-learn's `GaussianMixture.score_samples` for 'full' covariance, in
  the dtype of x: with U_k the Cholesky factor of component k's precision,

    log N(x; mu_k, Sigma_k) = -(D log 2 pi + |(x - mu_k) U_k|^2) / 2
                              + sum_i log U_k[i, i]

  and the components combine by logsumexp over log w_k + log N_k.

  The products y_k = (x - mu_k) U_k of all K components are one matrix
  product, (x - c) [U_1 ... U_K] - (mu_k - c) U_k, rather than K small ones
  (3x faster on a CPU, `benchmarks/gmm_density.py`). Subtracting the
  mixture's mean c first keeps both terms small, so the cancellation near a
  component's mean costs float32 few digits: about 1e-5 of float64
  scikit-learn's |log-density| (at least 1), on probability vectors,
  one-hot vectors, the means and points far from them; the tests allow
  1e-4 (tests/test_coherence.py).

  Args:
    params: {'weights': (K,), 'means': (K, D), 'precisions_cholesky':
      (K, D, D)}.
    x: (n, D) points (the concatenated class probabilities of n knees).

  Returns:
    (n,) log-densities in x's dtype (at least float32).
  """
  dtype = jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)
  x = jnp.asarray(x, dtype)
  weights = jnp.asarray(params['weights'], dtype)
  means = jnp.asarray(params['means'], dtype)
  prec_chol = jnp.asarray(params['precisions_cholesky'], dtype)
  k, d, _ = prec_chol.shape
  # log det U_k: U_k is triangular, so its determinant is its diagonal's
  # product; a per-component constant, folded with the weight and 2 pi.
  log_det = jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=-2, axis2=-1)),
                    axis=-1)
  const = jnp.log(weights) + log_det - 0.5 * d * math.log(2.0 * math.pi)
  # HIGHEST: on recent GPUs JAX's default float32 matmul rounds its inputs
  # to TF32 (10-bit mantissa), errors of 1e-3 relative in y before the
  # cancellation below, far above what this density is tested to.
  highest = jax.lax.Precision.HIGHEST
  # Any centre gives the same y exactly; the mixture's mean keeps the terms
  # small.
  centre = jnp.sum(weights[:, None] * means, axis=0)
  stacked = jnp.transpose(prec_chol, (1, 0, 2)).reshape(d, k * d)
  xu = jnp.dot(x - centre, stacked, precision=highest).reshape(-1, k, d)
  muu = jnp.einsum('kd,kde->ke', means - centre, prec_chol, precision=highest)
  y = xu - muu
  log_prob = -0.5 * jnp.sum(jnp.square(y), axis=-1) + const
  return jax.nn.logsumexp(log_prob, axis=-1)


def incoherence_loss(params: Mapping[str, Array], probs_concat: Array, *,
                     tau: float = DEFAULT_TAU,
                     mask: Array | None = None) -> Array:
  """Mean over the knees of softplus(-tau g(P)) / tau, g = `log_density`.

  Args:
    params: the coherence mixture (`fit_gmm`).
    probs_concat: (n, D) concatenated class probabilities (`concat_probs`).
    tau: temperature (the paper: 0.5); > 0.
    mask: optional (n,) mask: the mean is over the knees with mask > 0 (0
      when there are none); the others (padding) may hold anything.

  Returns:
    The scalar loss, float32 (or float64 for float64 inputs).
  """
  if tau <= 0:
    raise ValueError(f'coherence tau must be > 0; got {tau}')
  if mask is None:
    g = log_density(params, probs_concat)
    return jnp.mean(jax.nn.softplus(-tau * g) / tau)
  keep = jnp.asarray(mask) > 0
  # A masked row (padding) may hold anything, nan included; zeroed before
  # the density, it cannot reach the mean or, as 0 * nan, the gradient.
  x = jnp.where(keep[:, None], probs_concat, 0.0)
  per_knee = jax.nn.softplus(-tau * log_density(params, x)) / tau
  per_knee = jnp.where(keep, per_knee, 0.0)
  return jnp.sum(per_knee) / jnp.maximum(jnp.sum(keep), 1).astype(
      per_knee.dtype)


def concat_probs(probs: Mapping[str, Array],
                 heads: Sequence[str]) -> Array:
  """(n, D) per-head probabilities {head: (n, classes)} side by side in
  `heads` order (`Task.head_names`), the order the mixture was fitted in."""
  missing = [h for h in heads if h not in probs]
  if missing:
    raise ValueError(f'no probabilities for heads {missing}; got '
                     f'{sorted(probs)}')
  return jnp.concatenate([jnp.asarray(probs[h]) for h in heads], axis=-1)


def stack_labels(labels: Mapping[str, np.ndarray],
                 heads: Sequence[str]) -> np.ndarray:
  """(n, heads) int grades {head: (n,) labels, -1 masked} in `heads` order:
  `fit_gmm`'s input from `TrainingData.labels`."""
  return np.stack([np.asarray(labels[h]) for h in heads], axis=1)
