"""The predictor: ensembles and five-crop test-time augmentation, checked
against the models called directly and averaged in NumPy."""

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import special

from koajax import runtime
from koajax import tasks
from koajax.train import predictor as predictor_lib
from koajax.train import step as step_lib
from config_loader import load_config


def test_five_crop_takes_four_corners_and_the_centre():
  images = np.arange(2 * 2 * 9 * 9).reshape(2, 2, 9, 9)
  crops = predictor_lib.five_crop(images, 5)
  expected = [images[..., :5, :5], images[..., :5, 4:], images[..., 4:, :5],
              images[..., 4:, 4:], images[..., 2:7, 2:7]]
  for got, want in zip(crops, expected):
    np.testing.assert_array_equal(got, want)
  # Five different crops, not one crop five times.
  assert len({c.tobytes() for c in crops}) == 5
  with pytest.raises(ValueError, match='tta_crop'):
    predictor_lib.five_crop(images, 9)


def _members(task, seeds):
  config = load_config('supervised', 'smoke')
  members = []
  for seed in seeds:
    graphdef, _, state = step_lib.create_state(config, task,
                                               jax.random.key(seed))
    members.append(predictor_lib.state_member(graphdef, state))
  return members


def _direct_logits(member, images):
  model = nnx.merge(member.graphdef, member.params, member.extra)
  x = (images.astype(np.float32) / 255 - 0.5) / 0.5
  return np.asarray(model(x, train=False)['logits']['kl'], np.float64)


@pytest.mark.parametrize('ensemble', ['probs', 'logits'])
@pytest.mark.parametrize('tta', ['none', 'five_crop'])
def test_ensemble_and_tta_average_as_documented(ensemble, tta):
  task = tasks.get('kl')
  members = _members(task, (0, 1))
  images = np.random.default_rng(0).integers(0, 256, (5, 2, 32, 32),
                                             dtype=np.uint8)
  predictor = predictor_lib.Predictor(
      members, task, runtime.data_mesh(8), batch_size=8, tta=tta,
      tta_crop=24, ensemble=ensemble)
  got = predictor.predict_images(images)['kl']

  views = ([images] if tta == 'none' else
           [images[..., t:t + 24, l:l + 24]
            for t, l in ((0, 0), (0, 8), (8, 0), (8, 8), (4, 4))])
  per_member = [[_direct_logits(m, v) for v in views] for m in members]
  if ensemble == 'probs':
    want = np.mean([np.mean([special.softmax(z, axis=1) for z in zs], 0)
                    for zs in per_member], 0)
  else:
    want = special.softmax(np.mean([np.mean(zs, 0) for zs in per_member], 0),
                           axis=1)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
  # Two different members: the ensemble is not one of them.
  single = predictor_lib.Predictor(members[:1], task, runtime.data_mesh(8),
                                   batch_size=8, tta=tta, tta_crop=24,
                                   ensemble=ensemble).predict_images(images)
  assert not np.allclose(single['kl'], got)


def test_unknown_settings_name_the_field():
  task = tasks.get('kl')
  members = _members(task, (0,))
  with pytest.raises(ValueError, match='predict.tta'):
    predictor_lib.Predictor(members, task, runtime.data_mesh(8), tta='ten')
  with pytest.raises(ValueError, match=r'predict.tta_crop must lie in '
                     r'1..127 px for the 128 px siamese view; got 128'):
    predictor_lib.Predictor(members, task, runtime.data_mesh(8),
                            tta='five_crop', tta_crop=128)
  with pytest.raises(ValueError, match='predict.ensemble'):
    predictor_lib.Predictor(members, task, runtime.data_mesh(8),
                            ensemble='votes')


def test_non_finite_leaves_names_the_arrays_holding_nan_or_inf():
  task = tasks.get('kl')
  (member,) = _members(task, (0,))
  assert predictor_lib.non_finite_leaves(member.params) == []
  leaves, treedef = jax.tree_util.tree_flatten(member.params)
  paths = [jax.tree_util.keystr(p, simple=True, separator='/') for p, _ in
           jax.tree_util.tree_flatten_with_path(member.params)[0]]
  leaves[1] = leaves[1].at[(0,) * leaves[1].ndim].set(np.nan)
  leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(np.inf)
  broken = jax.tree_util.tree_unflatten(treedef, leaves)
  assert predictor_lib.non_finite_leaves(broken) == [paths[1], paths[-1]]
