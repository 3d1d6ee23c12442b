"""The hash-mask dropout: rate, independence, determinism, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from koajax.models import dropout


def test_keep_rate_matches_the_binomial():
  shape = (4, 64, 64, 32)
  keep = np.asarray(dropout.keep_mask(jax.random.key(0), shape, 0.35))
  n = keep.size
  # Two-sided binomial test of the keep probability 0.65.
  p = stats.binomtest(int(keep.sum()), n, 0.65).pvalue
  assert p > 1e-4, (keep.mean(), p)


def test_bits_are_uniform_and_neighbours_uncorrelated():
  bits = np.asarray(dropout.random_bits(jax.random.key(1), (256, 256)),
                    np.float64) / 2**32
  assert stats.kstest(bits.ravel(), 'uniform').pvalue > 1e-4
  for a, b in ((bits[:, 1:], bits[:, :-1]), (bits[1:], bits[:-1])):
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert abs(r) < 5 / np.sqrt(a.size), r  # ~5 sigma of r under independence


def test_same_key_same_mask_other_key_independent_mask():
  shape = (8, 32, 32, 4)
  a = np.asarray(dropout.keep_mask(jax.random.key(3), shape, 0.5))
  b = np.asarray(dropout.keep_mask(jax.random.key(3), shape, 0.5))
  c = np.asarray(dropout.keep_mask(jax.random.key(4), shape, 0.5))
  np.testing.assert_array_equal(a, b)
  # Independent masks agree on about half of the elements.
  agree = (a == c).mean()
  assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(a.size), agree


def test_mask_does_not_depend_on_sharding():
  shape = (8, 16, 16, 4)
  key = jax.random.key(5)
  whole = np.asarray(dropout.keep_mask(key, shape, 0.35))
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(lambda k: dropout.keep_mask(k, shape, 0.35),
                    out_shardings=jax.NamedSharding(mesh, jax.P('data')))(key)
  np.testing.assert_array_equal(whole, np.asarray(sharded))


def test_inverted_scaling_and_modes():
  layer = dropout.Dropout(0.25)
  x = jnp.ones((4, 1000))
  y = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  np.testing.assert_array_equal(layer(x, deterministic=True), x)
  with pytest.raises(ValueError, match='needs rngs'):
    layer(x, deterministic=False)
  with pytest.raises(ValueError, match='rate'):
    dropout.Dropout(1.0)
