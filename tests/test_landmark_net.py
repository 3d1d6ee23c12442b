"""The landmark network: shapes, parameters against timm's trunk, a flat
start at the image centre, and that it learns where a landmark is."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from koajax.models import landmark_net


def _net(**kwargs):
  return landmark_net.LandmarkNet(heads={}, rngs=nnx.Rngs(0), **kwargs)


def test_points_start_at_the_centre_of_flat_maps():
  net = _net(stage=3, decoder_width=16)
  out = nnx.jit(lambda m, x: m(x))(net, jnp.zeros((2, 64, 96)))
  assert out['logits'] == {}
  assert out['landmarks'].shape == (2, 16, 2)
  assert out['features']['heatmaps'].shape == (2, 16, 24, 16)  # stride 4
  # Zero-initialised logits: every map flat, every point at the centre.
  np.testing.assert_allclose(out['landmarks'], np.broadcast_to(
      [47.5, 31.5], (2, 16, 2)), atol=1e-4)


def test_parameters_are_timms_trunk_plus_the_decoder():
  timm = pytest.importorskip('timm')
  net = _net(stage=3, decoder_width=64)
  ref = timm.create_model('resnet18', num_classes=0)
  trunk = sum(p.numel() for name, p in ref.named_parameters()
              if not name.startswith('layer4'))
  # 1x1 laterals (weights + biases) of 64, 128, 256 channels to 64, two
  # 3x3 convs with batch norm, and the 1x1 conv to 16 maps with biases.
  decoder = ((64 + 128 + 256) * 64 + 3 * 64 + 2 * (9 * 64 * 64 + 2 * 64)
             + 64 * 16 + 16)
  params = nnx.state(net, nnx.Param)
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == trunk + decoder


def test_heads_are_refused():
  with pytest.raises(ValueError, match='predicts landmarks, not grades'):
    landmark_net.LandmarkNet(heads={'kl': 5}, rngs=nnx.Rngs(0))


def test_it_learns_where_a_blob_is():
  """A bright disc at a random place per image; the landmark is its centre.
  A few dozen Adam steps bring the mean error well below the start's."""
  rng = np.random.default_rng(0)
  centres = rng.uniform(8, 56, (8, 2)).astype(np.float32)
  yy, xx = np.mgrid[0:64, 0:64]
  images = np.stack([((xx - cx) ** 2 + (yy - cy) ** 2 < 25).astype(np.float32)
                     for cx, cy in centres])
  net = _net(stage=2, decoder_width=16, landmarks=1)
  optimizer = nnx.Optimizer(net, optax.adam(3e-3), wrt=nnx.Param)

  def loss_fn(model, x, y):
    return jnp.abs(model(x, train=True)['landmarks'][:, 0] - y).mean()

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  x, y = jnp.asarray(images), jnp.asarray(centres)
  first = float(step(net, optimizer, x, y))
  for _ in range(40):
    last = float(step(net, optimizer, x, y))
  assert last < 0.3 * first, (first, last)
