"""The Siamese multi-level GAP network: parameters counted by hand, levels,
pooling, and the two sides added."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from koajax import models
from koajax.models import siamese_gap


def _hand_count(classes=2, levels=(1, 2, 3, 4)):
  """3x3 convolutions without bias, batch-norm scale and bias, one linear."""
  plan = [(1, 32), (32, 32),
          (32, 64), (64, 64), (64, 64),
          (64, 128), (128, 128), (128, 128), (128, 128),
          (128, 256), (256, 256), (256, 256), (256, 256)]
  convs = sum(9 * cin * cout for cin, cout in plan)
  norms = sum(2 * cout for _, cout in plan)
  features = sum((32, 64, 128, 256)[i - 1] for i in levels)
  return convs + norms + features * classes + classes


def _count(model):
  params = nnx.state(model, nnx.Param)
  return sum(x.size for x in jax.tree.leaves(params))


def test_parameter_count_equals_the_hand_count():
  model = siamese_gap.SiameseGAP(heads={'kl0_vs_kl2': 2}, rngs=nnx.Rngs(0))
  assert _count(model) == _hand_count() == 2_686_690
  p3 = siamese_gap.SiameseGAP(heads={'kl0_vs_kl2': 2}, levels=(3,),
                              rngs=nnx.Rngs(0))
  assert _count(p3) == _hand_count(levels=(3,))


def test_the_two_sides_are_added_and_each_level_pooled():
  model = siamese_gap.SiameseGAP(heads={'h': 2}, pool='gmp', rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  pairs = jnp.asarray(rng.normal(size=(3, 2, 32, 32)).astype(np.float32))
  out = model(pairs)
  levels = out['features']['levels']
  assert [l.shape for l in levels] == [(3, 2, 32), (3, 2, 64), (3, 2, 128),
                                       (3, 2, 256)]
  maps = out['features']['maps']
  assert maps.shape == (3, 2, 4, 4, 256)  # 32 px halved three times
  # Global max pooling of the last block's maps, per patch.
  np.testing.assert_allclose(levels[3], maps.max(axis=(2, 3)), rtol=1e-6)
  summed = np.concatenate([np.asarray(l) for l in levels], -1).sum(axis=1)
  np.testing.assert_allclose(out['features']['pooled'], summed, rtol=1e-5)
  # Swapping the patches leaves a sum, and so the logits, unchanged.
  swapped = model(pairs[:, ::-1])
  np.testing.assert_allclose(swapped['logits']['h'], out['logits']['h'],
                             rtol=1e-4, atol=1e-5)


def test_models_registry_builds_it_and_bad_options_are_named():
  import ml_collections
  model = models.create(ml_collections.ConfigDict(
      {'name': 'siamese_gap', 'levels': (2, 4), 'pool': 'gap'}),
      heads={'kl0_vs_kl2': 2}, rngs=nnx.Rngs(0))
  assert model.num_features == 64 + 256
  with pytest.raises(ValueError, match='model.levels'):
    siamese_gap.SiameseGAP(heads={'h': 2}, levels=(0, 5), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='model.pool'):
    siamese_gap.SiameseGAP(heads={'h': 2}, pool='avg', rngs=nnx.Rngs(0))
