r"""Coherence mixture log-density: koajax's JAX function against scikit-learn.

Times the log-density g(P) of coherence learning's Gaussian mixture (K = 10
full-covariance components over the 29-d KL + OARSI probabilities) on one
batch of knees, two ways, rounds alternated so that both see the same
machine state:
  * koajax: `koajax.coherence.log_density`, jitted, float32, the batch and
    the parameters already on the device, each call waited for
    (`block_until_ready`); compiled before the first round.
  * sklearn: `GaussianMixture.score_samples` of the same mixture on the same
    batch in float64 (scikit-learn's own dtype), numpy arrays in memory.

The mixture is `koajax.coherence.fit_gmm` on synthetic coherent grades (a
latent severity every grade follows), fitted once, untimed; the batch is
per-head softmaxes of random logits (probability vectors, as in training).
Before timing a guard checks that both sides compute the same thing: the
largest difference, relative to max(|g|, 1), must stay within 1e-4, or the
benchmark stops.

Each round times `--steps` calls per side after one untimed call
(`machine.time_steps`); the table gives median milliseconds per call and
scikit-learn's median over koajax's.

Run (CPU):
  python benchmarks/gmm_density.py                       # 10,000 knees
  python benchmarks/gmm_density.py --out=/tmp/gmm_density.json

Results print as a Markdown table, and go to --out as JSON when it is given.
"""

from __future__ import annotations

import os
import statistics
import sys

from absl import app
from absl import flags
import numpy as np
from scipy import special

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machine import summary, time_steps, write_json  # noqa: E402  (benchmarks/machine.py)

_KNEES = flags.DEFINE_integer('knees', 10_000, 'Knees in the scored batch.')
_COMPONENTS = flags.DEFINE_integer('components', 10,
                                   'Mixture components (paper: 10).')
_FIT_KNEES = flags.DEFINE_integer(
    'fit_knees', 1_000, 'Synthetic graded knees the mixture is fitted on '
    '(untimed).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed calls per side per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternated rounds.')
_OUT = flags.DEFINE_string('out', None, 'JSON results file (optional).')

PARITY_TOL = 1e-4  # relative to max(|g|, 1); tests/test_coherence.py


def coherent_grades(n: int, num_classes, seed: int = 0) -> np.ndarray:
  """(n, heads) grades that follow one latent severity, as real knees'
  grades go together (KL = severity, OARSI grades around severity - 1)."""
  rng = np.random.default_rng(seed)
  severity = rng.integers(0, num_classes[0], n)
  return np.stack(
      [severity] + [np.clip(severity - 1 + rng.integers(-1, 2, n), 0, c - 1)
                    for c in num_classes[1:]], axis=1)


def head_softmax(logits: np.ndarray, num_classes) -> np.ndarray:
  """Per-head softmax of (n, sum(num_classes)) logits, heads side by side."""
  heads = np.split(logits, np.cumsum(num_classes)[:-1], axis=1)
  return np.concatenate([special.softmax(z, axis=1) for z in heads], axis=1)


def sklearn_mixture(params: dict[str, np.ndarray]):
  """A fitted-looking scikit-learn mixture holding `params` in float64."""
  from sklearn import mixture
  means = params['means'].astype(np.float64)
  gmm = mixture.GaussianMixture(len(means), covariance_type='full')
  gmm.weights_ = params['weights'].astype(np.float64)
  gmm.means_ = means
  gmm.precisions_cholesky_ = params['precisions_cholesky'].astype(np.float64)
  gmm.n_features_in_ = means.shape[1]
  return gmm


def run(knees: int, components: int, fit_knees: int, steps: int,
        rounds: int) -> dict:
  """One result row: timings of both sides and the parity check."""
  import jax
  from koajax import coherence
  from koajax import tasks

  num_classes = list(tasks.get('kl_oarsi').num_classes.values())
  params = coherence.fit_gmm(coherent_grades(fit_knees, num_classes),
                             num_classes, components=components)
  rng = np.random.default_rng(1)
  x64 = head_softmax(rng.normal(size=(knees, sum(num_classes))) * 3,
                     num_classes)
  gmm = sklearn_mixture(params)

  density = jax.jit(coherence.log_density)
  device_params = jax.device_put(params)
  x32 = jax.device_put(x64.astype(np.float32))
  got = np.asarray(density(device_params, x32))  # compiles
  want = gmm.score_samples(x64)
  diff = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))
  if not diff <= PARITY_TOL:
    raise SystemExit(f'koajax and scikit-learn disagree: {diff:.2e} > '
                     f'{PARITY_TOL:g} (relative); not timing')

  times = {'koajax': [], 'sklearn': []}
  for _ in range(rounds):
    times['koajax'] += time_steps(
        lambda: density(device_params, x32).block_until_ready(), steps)
    times['sklearn'] += time_steps(lambda: gmm.score_samples(x64), steps)
  return {'knees': knees, 'dims': sum(num_classes), 'components': components,
          'koajax_dtype': 'float32', 'sklearn_dtype': 'float64',
          'max_rel_diff': diff, 'koajax_s': times['koajax'],
          'sklearn_s': times['sklearn']}


def table(row: dict) -> str:
  jax_ms = 1e3 * statistics.median(row['koajax_s'])
  sk_ms = 1e3 * statistics.median(row['sklearn_s'])
  return '\n'.join([
      '| knees | dims | K | koajax ms | sklearn ms | koajax speed-up | '
      'max rel diff |',
      '|---|---|---|---|---|---|---|',
      f"| {row['knees']} | {row['dims']} | {row['components']} | "
      f'{jax_ms:.2f} | {sk_ms:.2f} | {sk_ms / jax_ms:.1f}x | '
      f"{row['max_rel_diff']:.1e} |"])


def main(argv):
  del argv
  row = run(_KNEES.value, _COMPONENTS.value, _FIT_KNEES.value, _STEPS.value,
            _ROUNDS.value)
  print(f'Machine: {summary()}')
  print(table(row))
  write_json(_OUT.value, [row])


if __name__ == '__main__':
  app.run(main)
