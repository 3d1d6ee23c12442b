"""The ResNet family: parameter counts as timm's, strides, the legacy
ceil-mode max-pool and grey input."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koajax import models
from koajax.models import resnet

# timm's counts with a 1000-class head (timm.create_model(name).
# num_params; the figures).
TIMM_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'seresnet50': 28_088_024,
    'seresnext50_32x4d': 27_559_896,
    'legacy_seresnet50': 28_088_024,
    'legacy_seresnext50_32x4d': 27_559_896,
}


def count(model_fn):
  abstract = nnx.eval_shape(model_fn)
  return sum(int(np.prod(p.shape))
             for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize('name', sorted(TIMM_PARAMS))
def test_parameter_counts_equal_timms(name):
  create = models.registry()[name]
  assert count(lambda: create(heads={'imagenet': 1000},
                              rngs=nnx.Rngs(0))) == TIMM_PARAMS[name]


@pytest.mark.parametrize('name', ['resnet18', 'legacy_seresnext50_32x4d'])
def test_stages_halve_and_heads_read_the_pooled_map(name):
  model = models.registry()[name](heads={'kl': 5, 'jsn_l': 4},
                                  dropout=0.5, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 96, 96)),
                  jnp.float32)
  out = model(x)  # grey: repeated to 3 channels
  sizes = [m.shape[1] for m in out['features']['stages']]
  # Stem /4, then /8, /16, /32 (the legacy pool rounds up: 48 -> 24).
  assert sizes == [24, 12, 6, 3]
  assert out['logits']['kl'].shape == (2, 5)
  assert out['logits']['jsn_l'].shape == (2, 4)
  pooled = out['features']['maps'].mean(axis=(1, 2))
  np.testing.assert_allclose(out['features']['pooled'], pooled, rtol=1e-5,
                             atol=1e-6)
  head = model.heads['kl']
  np.testing.assert_allclose(  # eval: dropout off, logits = linear(GAP)
      out['logits']['kl'],
      np.asarray(pooled) @ np.asarray(head.kernel[...]) +
      np.asarray(head.bias[...]), rtol=1e-4, atol=1e-5)


def test_legacy_max_pool_is_ceil_mode_without_padding():
  rng = np.random.default_rng(1)
  for n in (7, 8, 9, 112, 113):
    x = rng.normal(size=(1, n, n, 2)).astype(np.float32)
    model = nnx.eval_shape(lambda: resnet.ResNet(
        stage_sizes=(1,), bottleneck=False, flavour='legacy',
        heads={'a': 2}, rngs=nnx.Rngs(0)))
    got = np.asarray(resnet.ResNet._max_pool(model, jnp.asarray(x)))
    out = -(-(n - 3) // 2) + 1  # PyTorch ceil_mode=True
    by_hand = np.array([[[x[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c].max()
                          for c in range(2)] for j in range(out)]
                        for i in range(out)])
    np.testing.assert_array_equal(got[0], by_hand)


def test_unknown_flavour_is_named():
  with pytest.raises(ValueError, match="model.flavour must be 'timm' or "
                     "'legacy'"):
    resnet.ResNet(stage_sizes=(1,), bottleneck=False, flavour='cadene',
                  heads={'a': 2}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('stride', [1, 2])
def test_grouped_convolution_taps_equal_lax(stride):

  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 12)).astype(np.float32))
  args = (x, w, (stride, stride), [(1, 1), (1, 1)])
  kwargs = dict(dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                feature_group_count=4)
  want = jax.lax.conv_general_dilated(*args, **kwargs)
  np.testing.assert_allclose(resnet.grouped_conv(*args, **kwargs), want,
                             rtol=1e-5, atol=1e-5)
  # The gradients too, which the train step uses.
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, *args[2:], **kwargs)))
  got = jax.grad(loss(resnet.grouped_conv), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
