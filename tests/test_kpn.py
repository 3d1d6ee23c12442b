"""The keypoint pooling network: bilinear sampling at known points against
values worked out by hand, the view-to-map grid, the compartments, the
backbone's parameters against ResNet-50's, the ablation and the predictor
handing keypoints on."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koajax import models
from koajax import tasks
from koajax.models import kpn
from koajax.train import predictor as predictor_lib

HEADS = tasks.get('kl_oarsi').num_classes


def _bilinear_by_hand(m, x, y):
  """m[y, x] for one (h, w, C) map: the four neighbours, weighted by the
  area opposite them, points clamped into the map."""
  h, w = m.shape[:2]
  x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
  x0, y0 = min(int(np.floor(x)), w - 2), min(int(np.floor(y)), h - 2)
  fx, fy = x - x0, y - y0
  return ((1 - fx) * (1 - fy) * m[y0, x0] + fx * (1 - fy) * m[y0, x0 + 1]
          + (1 - fx) * fy * m[y0 + 1, x0] + fx * fy * m[y0 + 1, x0 + 1])


def test_sampling_a_known_map_at_known_points_is_bilinear():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  points = np.array([
      [[0.0, 0.0], [6.0, 4.0], [2.25, 1.5], [3.0, 2.0]],  # corners, cell
      [[5.5, 3.75], [-1.0, 2.0], [9.0, 7.5], [0.1, 3.9]],  # outside: clamped
  ], np.float32)
  got = np.asarray(kpn.sample_bilinear(jnp.asarray(maps), jnp.asarray(points)))
  want = np.array([[_bilinear_by_hand(maps[b], *p) for p in points[b]]
                   for b in range(2)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # A point on a cell is that cell; halfway between two is their mean.
  np.testing.assert_allclose(got[0, 3], maps[0, 2, 3], rtol=1e-6)
  halfway = kpn.sample_bilinear(jnp.asarray(maps),
                                jnp.array([[[3.5, 2.0]]] * 2))
  np.testing.assert_allclose(halfway[0, 0],
                             (maps[0, 2, 3] + maps[0, 2, 4]) / 2, rtol=1e-6)


def test_a_linear_map_samples_to_the_grid_coordinates():
  # Channel 0 holds the column, channel 1 the row: sampling returns the
  # map coordinates of each point, so the grids are checked in view pixels.
  h = w = 20
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  maps = jnp.asarray(np.stack([cols, rows], -1)[None].astype(np.float32))
  view = np.array([[[0.0, 0.0], [16.0, 32.0], [159.5, 100.0], [300.0, 8.0]]],
                  np.float32)
  receptive = kpn.to_map(jnp.asarray(view), view_px=(320, 320),
                         map_px=(h, w), stage=3)
  np.testing.assert_allclose(kpn.sample_bilinear(maps, receptive),
                             view / 16, rtol=1e-6)
  half = kpn.to_map(jnp.asarray(view), view_px=(320, 320), map_px=(h, w),
                    stage=3, grid='half_pixel')
  np.testing.assert_allclose(
      kpn.sample_bilinear(maps, half),
      np.clip((view + 0.5) / 16 - 0.5, 0, 19), rtol=1e-6)


def test_compartments_follow_the_landmark_convention():
  # Tibia 0-8 and femur 9-15, lateral to medial; 4 and 12 on the midline.
  groups = kpn.DEFAULT_GROUPS
  assert groups['all'] == tuple(range(16))
  assert set(groups['tl']) | set(groups['tm']) == set(range(9)) - {4}
  assert set(groups['fl']) | set(groups['fm']) == set(range(9, 16)) - {12}
  assert max(groups['tl']) < 4 < min(groups['tm'])
  assert max(groups['fl']) < 12 < min(groups['fm'])
  reads = {h: kpn.head_group(h, {}) for h in HEADS}
  assert reads == {'kl': 'all', 'jsn_l': 'all', 'jsn_m': 'all',
                   'ost_tl': 'tl', 'ost_fl': 'fl', 'ost_tm': 'tm',
                   'ost_fm': 'fm'}


def _count(model_fn, leave_out=('heads',)):
  abstract = nnx.eval_shape(model_fn)
  params = nnx.state(abstract, nnx.Param)
  return sum(int(np.prod(p.shape)) for path, p in
             jax.tree_util.tree_flatten_with_path(params)[0]
             if getattr(path[0], 'key', None) not in leave_out)


@pytest.mark.parametrize('use_kpn', [True, False])
def test_the_backbone_is_resnet50s(use_kpn):
  ours = _count(lambda: kpn.KeypointPooling(heads=HEADS, kpn=use_kpn,
                                            rngs=nnx.Rngs(0)))
  resnet50 = _count(lambda: models.registry()['resnet50'](
      heads={'imagenet': 1000}, rngs=nnx.Rngs(0)))
  assert ours == resnet50 == 25_557_032 - (2048 * 1000 + 1000)


def _model(**kwargs):
  return kpn.KeypointPooling(backbone='resnet18', heads=HEADS,
                             rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize('combine,width', [('mean', 1), ('max', 1),
                                           ('concat', None)])
def test_heads_read_their_group_of_sampled_vectors(combine, width):
  model = _model(combine=combine)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 64, 64)), jnp.float32)
  points = jnp.asarray(rng.uniform(4, 60, size=(2, 16, 2)), jnp.float32)
  out = model(images, keypoints=points)
  maps = out['features']['maps']
  assert maps.shape == (2, 4, 4, 256)  # stage 3: stride 16, not run further
  assert len(out['features']['stages']) == 3
  sampled = out['features']['keypoints']
  np.testing.assert_allclose(
      sampled, kpn.sample_bilinear(maps, points / 16), rtol=1e-6)
  for head, classes in HEADS.items():
    idx = list(kpn.DEFAULT_GROUPS[kpn.head_group(head, {})])
    group = np.asarray(sampled)[:, idx]
    x = {'mean': group.mean(1), 'max': group.max(1),
         'concat': group.reshape(2, -1)}[combine]
    layer = model.heads[head]
    assert layer.kernel.shape == (256 * (width or len(idx)), classes)
    np.testing.assert_allclose(
        out['logits'][head],
        x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]),
        rtol=1e-4, atol=1e-4)


def test_the_ablation_pools_the_last_stage_and_needs_no_keypoints():
  model = _model(kpn=False, dropout=0.5)
  images = jnp.ones((2, 64, 64), jnp.float32)
  out = model(images)
  assert out['features']['maps'].shape == (2, 2, 2, 512)
  pooled = np.asarray(out['features']['maps']).mean(axis=(1, 2))
  layer = model.heads['ost_fl']
  np.testing.assert_allclose(
      out['logits']['ost_fl'],
      pooled @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]),
      rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='needs the knees.*keypoints'):
    _model()(images)
  with pytest.raises(ValueError, match='model.backbone'):
    kpn.KeypointPooling(backbone='legacy_seresnet50', heads=HEADS,
                        rngs=nnx.Rngs(0))


def test_the_predictor_hands_keypoints_on_and_shifts_them_with_crops():
  model = _model()
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  assert predictor_lib.takes_keypoints(model)
  assert not predictor_lib.takes_keypoints(
      models.registry()['resnet18'](heads=HEADS, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(8, 72, 72)).astype(np.uint8)
  points = rng.uniform(10, 60, size=(8, 16, 2)).astype(np.float32)
  member = predictor_lib.Member(graphdef, params, extra)
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  task = tasks.get('kl_oarsi', view='keypoints', view_size=72)
  got = predictor_lib.Predictor([member], task, mesh, batch_size=8,
                                crop=64).predict_images(images, points)
  # By hand: the centre 64 px (4 px in from each edge), the points moved
  # with it.
  x = (images[:, 4:68, 4:68].astype(np.float32) / 255 - 0.5) / 0.5
  logits = model(jnp.asarray(x), keypoints=jnp.asarray(points - 4))['logits']
  for head in HEADS:
    np.testing.assert_allclose(got[head], jax.nn.softmax(logits[head]),
                               rtol=1e-4, atol=1e-5)
