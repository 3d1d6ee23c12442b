"""MC dropout: determinism, variability, sharding; the sweep command."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from koajax import runtime
from koajax.active import mc_dropout
from koajax.models import siamese


def _model(dropout=0.35, norm='instance'):
  return siamese.SemixupNet(width=4, dropout=dropout, norm=norm,
                            rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def pairs():
  return jax.random.uniform(jax.random.key(1), (6, 2, 32, 32), minval=-1,
                            maxval=1)


_sample = nnx.jit(lambda m, x, k: mc_dropout.mc_dropout_probs(
    m, x, k, num_samples=5))


def test_same_key_same_samples_other_key_other_samples(pairs):
  model = _model()
  a = _sample(model, pairs, jax.random.key(0))
  assert a.shape == (5, 6, 5)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(a, _sample(model, pairs, jax.random.key(0)))
  b = _sample(model, pairs, jax.random.key(1))
  assert np.abs(a - b).max() > 1e-3
  # The T samples differ from one another.
  assert np.abs(a[1:] - a[:1]).max(axis=(1, 2)).min() > 1e-4


def test_each_sample_is_one_pass_with_its_key(pairs):
  model = _model()
  key = jax.random.key(7)
  samples = _sample(model, pairs, key)
  for t, k in enumerate(jax.random.split(key, 5)):
    one = jax.nn.softmax(model(pairs, train=False, dropout=True,
                               rngs=nnx.Rngs(dropout=k))['logits']['kl'])
    np.testing.assert_allclose(samples[t], one, rtol=1e-5, atol=1e-6)
  grouped = nnx.jit(lambda m, x, k: mc_dropout.mc_dropout_probs(
      m, x, k, num_samples=5, samples_per_pass=2))(model, pairs, key)
  np.testing.assert_allclose(grouped, samples, rtol=1e-5, atol=1e-6)


def test_no_dropout_gives_identical_inference_mode_samples(pairs):
  model = _model(dropout=0.0, norm='batch')
  # Running statistics far from the batch's: inference mode must use them.
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.BatchStat):
      var[...] = var[...] + (0.5 if path[-1] == 'mean' else 2.0)
  samples = _sample(model, pairs, jax.random.key(0))
  expected = jax.nn.softmax(model(pairs, train=False)['logits']['kl'])
  for s in samples:
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-7)
  assert np.abs(expected - jax.nn.softmax(
      model(pairs, train=True)['logits']['kl'])).max() \
      > 1e-4


def test_predictor_runs_each_device_on_its_own_knees(pairs):
  model = _model()
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  images = np.asarray((pairs * 0.5 + 0.5) * 255, np.uint8)[:5]  # 5 knees
  key = jax.random.key(3)
  mesh = runtime.data_mesh(8)
  assert mesh.size == 8
  predictor = mc_dropout.MCDropoutPredictor(graphdef, mesh, num_samples=4,
                                            chunk_size=8)
  out = predictor(params, extra, images, key)
  assert out.shape == (4, 5, 5)
  np.testing.assert_array_equal(out, predictor(params, extra, images, key))
  # Device d samples its knee (padded to 8 rows, one per device) with key
  # fold_in(key, d).
  x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5
  for d in range(5):
    ref = mc_dropout.mc_dropout_probs(model, x[d:d + 1],
                                      jax.random.fold_in(key, d),
                                      num_samples=4)
    np.testing.assert_allclose(out[:, d:d + 1], ref, rtol=1e-4, atol=1e-6)


class _FakePredictor:
  """Chunks of 3 'knees'; probabilities from the images, counting calls."""
  chunk_size = 3

  def __init__(self):
    self.calls = 0

  def chunks(self, cache, indices):
    for i in range(0, len(indices), 3):
      yield np.asarray(indices[i:i + 3])

  def __call__(self, params, extra, images, key):
    self.calls += 1
    logits = np.stack([images * 0.1 * t for t in range(1, 5)])[..., None] * \
        np.arange(5)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_score_pool_saves_chunks_and_recomputes_on_new_settings(tmp_path):
  import types
  from koajax.active import sweep
  state = types.SimpleNamespace(params=None, extra=None)
  indices = np.arange(8)
  fake = _FakePredictor()
  first = sweep.score_pool(fake, state, None, indices, key=jax.random.key(0),
                           parts_dir=tmp_path, settings={'samples': 4})
  assert fake.calls == 3 and first['bald'].shape == (8,)
  (tmp_path / 'chunk_00001.npz').unlink()  # as a kill would leave it
  again = sweep.score_pool(fake, state, None, indices, key=jax.random.key(0),
                           parts_dir=tmp_path, settings={'samples': 4})
  assert fake.calls == 4  # only the missing chunk
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
  sweep.score_pool(fake, state, None, indices, key=jax.random.key(0),
                   parts_dir=tmp_path, settings={'samples': 5})
  assert fake.calls == 7  # other settings: everything again
