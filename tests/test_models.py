"""Siamese models: parameter counts worked out by hand, shapes, dropout keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from koajax.models import siamese


def _num_params(model):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _conv3x3(cin, cout):
  return 3 * 3 * cin * cout


# Semixup branch: 3x3 convs 1-32-32-32 | 64-64 | 128-128 | 256-256, no bias,
# instance norm without affine; head 512 -> 5 without bias.
SEMIXUP_CONVS = (_conv3x3(1, 32) + 2 * _conv3x3(32, 32) + _conv3x3(32, 64)
                 + _conv3x3(64, 64) + _conv3x3(64, 128) + _conv3x3(128, 128)
                 + _conv3x3(128, 256) + _conv3x3(256, 256))


@pytest.mark.parametrize('pooling, expected', [
    ('gap', SEMIXUP_CONVS + 512 * 5),
    ('sam_hv', SEMIXUP_CONVS + 256 * 256 + 512 * 5),  # SAM adds one 1x1 conv
    ('sam_vh', SEMIXUP_CONVS + 256 * 256 + 512 * 5),
])
def test_semixup_parameter_count(pooling, expected):
  assert expected in (1_182_496, 1_248_032)  # the totals, written out
  model = nnx.eval_shape(lambda: siamese.SemixupNet(pooling=pooling,
                                                     rngs=nnx.Rngs(0)))
  assert _num_params(model) == expected


def test_kneenet_parameter_count():
  convs = (_conv3x3(1, 64) + 2 * _conv3x3(64, 64) + _conv3x3(64, 128)
           + _conv3x3(128, 128) + _conv3x3(128, 256))
  batch_norm = 2 * (3 * 64 + 2 * 128 + 256)  # scale and bias
  head = 512 * 5 + 5
  model = nnx.eval_shape(lambda: siamese.KneeNet(rngs=nnx.Rngs(0)))
  assert _num_params(model) == convs + batch_norm + head


@pytest.mark.parametrize('make', [
    lambda: siamese.SemixupNet(pooling='sam_hv', rngs=nnx.Rngs(0)),
    lambda: siamese.KneeNet(rngs=nnx.Rngs(0)),
])
def test_dropout_keys_are_passed_at_call_time(make):
  model = make()
  x = jax.random.normal(jax.random.key(1), (2, 2, 64, 64))
  forward = nnx.jit(lambda m, x: m(x)['logits']['kl'])
  eval1, eval2 = forward(model, x), forward(model, x)
  np.testing.assert_array_equal(eval1, eval2)
  assert eval1.shape == (2, 5)
  train_forward = nnx.jit(
      lambda m, x, key: m(x, train=True,
                          rngs=nnx.Rngs(dropout=key))['logits']['kl'])
  train = lambda seed: train_forward(model, x, jax.random.key(seed))
  if isinstance(model, siamese.SemixupNet):
    np.testing.assert_array_equal(train(3), train(3))
    assert not np.allclose(train(3), train(4))


def test_branch_is_shared_between_patches():
  """Swapping the patches swaps the halves of the concatenated features."""
  model = siamese.SemixupNet(pooling='gap', rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 2, 32, 32))
  feats = nnx.jit(lambda m, p: m.features(p.reshape(-1, 32, 32, 1),
                                          train=False, dropout=False,
                                          rngs=None)[1].reshape(3, -1))
  f, g = feats(model, x), feats(model, x[:, ::-1])
  np.testing.assert_allclose(f[:, :256], g[:, 256:], rtol=1e-5, atol=1e-6)


def test_separable_pooling_matches_numpy():
  """SAM-HV = max over width, 1x1 conv + IN + LeakyReLU, max over height."""
  pool = siamese.SeparableMaxPool(4, 'hv', rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 6, 4)))
  kernel = np.asarray(pool.block.conv.kernel[...]).reshape(4, 4)
  y = x.max(axis=2) @ kernel  # (2, 5, 4)
  y = (y - y.mean(axis=1, keepdims=True)) / np.sqrt(y.var(axis=1, keepdims=True) + 1e-5)
  y = np.where(y > 0, y, 0.2 * y).max(axis=1)
  np.testing.assert_allclose(pool(jnp.asarray(x), train=False), y, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
  x = jax.random.normal(jax.random.key(2), (2, 2, 64, 64))
  f32 = siamese.SemixupNet(width=4, rngs=nnx.Rngs(0))
  bf16 = siamese.SemixupNet(width=4, dtype='bfloat16', rngs=nnx.Rngs(0))
  # Same float32 parameters; only the compute dtype differs.
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(bf16)))
  out32, out16 = f32(x)['logits']['kl'], bf16(x)['logits']['kl']
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()))
  assert not np.array_equal(out16, out32)  # bf16 really ran


def test_outputs_carry_every_head_and_the_features():
  """One linear head per task head on the same pooled features, and the
  last feature maps of both patches for Grad-CAM."""
  heads = {'kl': 5, 'ost_tl': 4, 'jsn_m': 4}
  model = siamese.SemixupNet(pooling='gap', width=4, heads=heads,
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 2, 32, 32))
  out = nnx.jit(lambda m, p: m(p))(model, x)
  assert {k: v.shape for k, v in out['logits'].items()} == {
      'kl': (3, 5), 'ost_tl': (3, 4), 'jsn_m': (3, 4)}
  pooled = np.asarray(out['features']['pooled'])
  assert pooled.shape == (3, 64)
  assert out['features']['maps'].shape == (3, 2, 4, 4, 32)
  # GAP of the maps is the pooled vector, lateral then medial.
  maps = np.asarray(out['features']['maps'])
  np.testing.assert_allclose(
      pooled, maps.mean(axis=(2, 3)).reshape(3, -1), rtol=1e-5, atol=1e-6)
  for name, head in model.heads.items():
    np.testing.assert_allclose(
        out['logits'][name],
        pooled @ np.asarray(head.kernel[...]) + 0.0, rtol=1e-4, atol=1e-5)
