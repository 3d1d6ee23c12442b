"""Grad-CAM (koajax.evaluation.gradcam) and the inverse view geometry.

Known answers: a network whose class score reads one bright square of the
ROI lights that square up, on the right patch and un-mirrored; Grad-CAM of
global-average-pooled networks equals the class activation map computed in
NumPy from the features (w_c = W_ck / hw), and of networks with nonlinear
pooling the gradient of an explicit maps -> logits split.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from koajax import runtime
from koajax.data import views
from koajax.evaluation import gradcam
from koajax.models import kpn
from koajax.models import resnet
from koajax.models import siamese
from koajax.models import siamese_gap
from koajax.train import predictor
from koajax.train import step as step_lib

ROI_PX, ROI_MM = 160, 140.0
# The bright square, in ROI pixels: inside the medial patch, on its side
# towards the knee centre (the mirrored patch shows it on the right).
MEDIAL_SQUARE = (slice(74, 88), slice(92, 106))
# For the whole-knee view: near the top-left corner.
CORNER_SQUARE = (slice(20, 36), slice(24, 40))


def _build(make, seed: int) -> nnx.Module:
  """The model `make()` builds, with NumPy-drawn weights (He normal
  kernels, zero biases, unit scales, batch statistics 0 and 1): XLA's
  random initialisers compile for seconds on CPU, and the tests only need
  some weights."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape),
                         leaf.dtype)
    fill = 1.0 if name in ('scale', 'var') else 0.0
    return jnp.full(leaf.shape, fill, leaf.dtype)

  return nnx.merge(graphdef, jax.tree.map_with_path(draw, state))


@nnx.jit
def _forward(model, x):
  return model(x, train=False)


def _rois(square, n: int, seed: int = 0) -> np.ndarray:
  """n noisy ROIs, the even ones with a bright square."""
  rng = np.random.default_rng(seed)
  rois = rng.normal(110, 25, (n, ROI_PX, ROI_PX)).clip(0, 255)
  rois[(slice(0, n, 2), *square)] = 230
  return rois.astype(np.uint8)


def _read_square(model: nnx.Module, x: jax.Array, head: str) -> None:
  """Sets the head so that class 1's logit is the linear discriminant of
  the pooled features of the knees with (even) and without (odd) the
  square: the score reads nothing but the square."""
  pooled = np.asarray(_forward(model, x)['features']['pooled'])
  kernel = np.zeros(model.heads[head].kernel.shape, np.float32)
  kernel[:, 1] = pooled[0::2].mean(0) - pooled[1::2].mean(0)
  model.heads[head].kernel[...] = jnp.asarray(kernel)
  model.heads[head].bias[...] = jnp.zeros(kernel.shape[1])


def _inside(roi_heatmap: np.ndarray, square, margin: int) -> bool:
  row, col = np.unravel_index(np.argmax(roi_heatmap), roi_heatmap.shape)
  rows, cols = square
  return (rows.start - margin <= row < rows.stop + margin and
          cols.start - margin <= col < cols.stop + margin)


def _gap_cam(maps: np.ndarray, kernel: np.ndarray, k: int) -> np.ndarray:
  """The class activation map of a GAP -> linear network (Zhou et al.
  2016), as Grad-CAM must give it: d logit / dA = W_k / hw everywhere."""
  h, w = maps.shape[-3:-1]
  return np.maximum(maps @ kernel[:, k] / (h * w), 0.0)


@pytest.fixture(scope='module')
def gap_case():
  """A Siamese GAP network (block 4 pooled only) whose head 'kl' reads a
  medial square; its head 'aux' keeps random weights."""
  rois = _rois(MEDIAL_SQUARE, 16)
  pairs = np.stack([views.siamese_pair(r, ROI_MM, 64) for r in rois])
  x = step_lib.normalise(jnp.asarray(pairs))
  model = _build(lambda: siamese_gap.SiameseGAP(
      levels=(4,), heads={'kl': 2, 'aux': 3}, rngs=nnx.Rngs(0)), seed=0)
  _read_square(model, x, 'kl')
  return model, x


def test_siamese_lights_up_the_square_unmirrored(gap_case):
  model, x = gap_case
  out = gradcam.gradcam(model, x, head='kl', target=1)
  placements = views.placements('siamese', ROI_PX, ROI_MM, size=64)
  roi = np.asarray(gradcam.to_roi(out['heatmap'], placements, ROI_PX))
  assert roi.shape == (16, ROI_PX, ROI_PX)
  assert roi.min() >= 0 and roi.max() <= 1
  # A feature cell is 8 view px, 6.7 ROI px: the peak may sit a few px
  # outside the square, never in the other half of the medial patch
  # (mirrored) nor in the lateral patch.
  for i in range(0, 16, 2):
    assert _inside(roi[i], MEDIAL_SQUARE, margin=4), i
    per_patch = np.asarray(out['cam'][i]).max(axis=(1, 2))
    assert per_patch[1] == pytest.approx(1.0) and per_patch[0] < 0.8
  # Nothing outside the two patches.
  (left, upper, between, lower), (after, *_, right, _) = (
      p.box for p in placements)
  assert not roi[:, :int(upper) - 1].any()
  assert not roi[:, int(lower) + 2:].any()
  assert not roi[:, :, :int(left) - 1].any()
  assert not roi[:, :, int(between) + 2:int(after) - 1].any()
  assert not roi[:, :, int(right) + 2:].any()
  assert roi[0][MEDIAL_SQUARE].mean() > 0.6


def test_gap_gradcam_is_the_class_activation_map(gap_case):
  model, x = gap_case
  ref = _forward(model, x)
  maps = np.asarray(ref['features']['maps'])
  logits = np.asarray(ref['logits']['aux'])
  predicted = gradcam.gradcam(model, x, head='aux')  # each knee's own class
  np.testing.assert_array_equal(predicted['class'], logits.argmax(-1))
  np.testing.assert_allclose(predicted['logit'], logits.max(-1), rtol=1e-5)
  np.testing.assert_allclose(predicted['probs'], jax.nn.softmax(logits),
                             atol=1e-6)
  classes = np.arange(len(x)) % 3  # one class per knee
  out = gradcam.gradcam(model, x, head='aux', target=classes)
  np.testing.assert_array_equal(out['class'], classes)
  kernel = np.asarray(model.heads['aux'].kernel[...])
  for i, k in enumerate(classes):
    cam = _gap_cam(maps[i], kernel, k)  # (2, h, w): both patches
    np.testing.assert_allclose(out['scale'][i], cam.max(), rtol=1e-4,
                               atol=1e-7)
    want = cam / cam.max() if cam.max() > 0 else cam
    np.testing.assert_allclose(out['cam'][i], want, atol=1e-5)


def test_another_layer_and_unknown_layers(gap_case):
  model, x = gap_case
  out = gradcam.gradcam(model, x[:2], head='kl', target=1, layer='block3')
  assert out['cam'].shape == (2, 2, 16, 16)  # block 3: twice block 4's
  assert out['heatmap'].shape == (2, 2, 64, 64)
  with pytest.raises(ValueError, match='its layers: block1, block2'):
    gradcam.gradcam(model, x[:2], head='kl', layer='block5')
  with pytest.raises(ValueError, match='one of the head'):
    gradcam.gradcam(model, x[:2], head='kl', target=2)
  with pytest.raises(ValueError, match='one per knee'):
    gradcam.gradcam(model, x[:2], head='kl', target=[0, 1, 1])


def test_whole_knee_resnet_through_a_member_and_a_crop():
  """A ResNet on the whole knee, via a predictor member, with the
  predictor's centre crop: the corner square lights up in the ROI."""
  size, crop = 72, 64
  rois = _rois(CORNER_SQUARE, 8, seed=1)
  images = np.stack([views.whole_knee(r, size) for r in rois])
  model = _build(lambda: resnet.ResNet(
      stage_sizes=(1, 1), bottleneck=False, heads={'kl': 3, 'jsn': 2},
      rngs=nnx.Rngs(1)), seed=1)
  x = predictor.centre_crop(step_lib.normalise(jnp.asarray(images)), crop)
  _read_square(model, x, 'jsn')
  member = predictor.Member(*nnx.split(model, nnx.Param, ...))
  out = gradcam.explain(member, images, head='jsn', view='whole',
                        roi_px=ROI_PX, roi_mm=ROI_MM, view_size=size,
                        crop=crop, target=1)
  assert out['cam'].shape == (8, 8, 8) and out['heatmap'].shape == (8, 64, 64)
  roi = np.asarray(out['roi'])
  for i in range(0, 8, 2):
    assert _inside(roi[i], CORNER_SQUARE, margin=6), i
  # The crop leaves a border of 4 view px (8.9 ROI px) uncovered.
  assert not roi[:, :8].any() and not roi[:, :, -8:].any()
  placements = views.placements('whole', ROI_PX, ROI_MM, size=size,
                                crop=crop)
  np.testing.assert_allclose(
      roi, gradcam.to_roi(out['heatmap'], placements, ROI_PX), atol=1e-6)
  # The same as gradcam() on the cropped inputs, and the closed form.
  direct = gradcam.gradcam(model, x, head='jsn', target=1)
  np.testing.assert_allclose(out['cam'], direct['cam'], atol=1e-6)
  maps = np.asarray(_forward(model, x)['features']['maps'])
  cam = _gap_cam(maps, np.asarray(model.heads['jsn'].kernel[...]), 1)
  np.testing.assert_allclose(out['scale'], cam.max(axis=(1, 2)), rtol=1e-4)


def _bilinear_weights(points: np.ndarray, h: int, w: int) -> np.ndarray:
  """(B, h, w): each cell's summed bilinear weight over a knee's points
  (map cells), by hand; the points lie inside the map."""
  out = np.zeros((len(points), h, w))
  for b, knee in enumerate(points):
    for x, y in knee:
      x0, y0 = int(np.floor(x)), int(np.floor(y))
      fx, fy = x - x0, y - y0
      for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
          out[b, y0 + dy, x0 + dx] += wy * wx
  return out


def test_keypoint_pooling_network_through_a_member_and_a_crop():
  """A head that averages the stage maps at 16 keypoints: y = W_k .
  mean_p A(p), so dy/dA_ij = W_k b_ij / 16 with b_ij the cell's bilinear
  weight. Grad-CAM's channel weights (their mean over the map) are W_k /
  hw, the class activation map; HiResCAM keeps b_ij, so it is 0 away from
  the keypoints. Through a predictor member with a centre crop, the
  keypoints move with the crop."""
  size, crop, k = 72, 64, 1
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (4, size, size), dtype=np.uint8)
  # Cropped-view pixels; the map cells (stride 16, 4 x 4) stay inside.
  points = rng.uniform(2, 46, (4, 16, 2)).astype(np.float32)
  model = _build(lambda: kpn.KeypointPooling(
      backbone='resnet18', heads={'kl': 3}, rngs=nnx.Rngs(0)), seed=5)
  member = predictor.Member(*nnx.split(model, nnx.Param, ...))
  x = predictor.centre_crop(step_lib.normalise(jnp.asarray(images)), crop)
  maps = np.asarray(model(x, keypoints=jnp.asarray(points),
                          train=False)['features']['maps'])
  assert maps.shape == (4, 4, 4, 256)
  kernel = np.asarray(model.heads['kl'].kernel[...])

  out = gradcam.gradcam(model, x, head='kl', target=k,
                        keypoints=jnp.asarray(points))
  want = _gap_cam(maps, kernel, k)
  np.testing.assert_allclose(out['cam'],
                             want / want.max(axis=(1, 2), keepdims=True),
                             atol=1e-5)

  margin = (size - crop) // 2
  hires = gradcam.explain(member, images, head='kl', view='keypoints',
                          roi_px=ROI_PX, roi_mm=ROI_MM, view_size=size,
                          crop=crop, target=k, method='hirescam',
                          keypoints=points + margin)
  weights = _bilinear_weights(points / kpn.stride(3), 4, 4)
  want = np.maximum(maps @ kernel[:, k] * weights / 16, 0)
  np.testing.assert_allclose(hires['cam'],
                             want / want.max(axis=(1, 2), keepdims=True),
                             atol=1e-5)
  assert np.all(np.asarray(hires['cam'])[weights == 0] == 0)
  assert hires['roi'].shape == (4, ROI_PX, ROI_PX)
  with pytest.raises(ValueError, match='keypoints'):
    gradcam.gradcam(model, x, head='kl')


def _split_cam(model: nnx.Module, x: jax.Array, k: int, logits_of,
               method: str) -> np.ndarray:
  """The CAM through an explicit split of the model at its last maps:
  `logits_of(maps)` by hand, differentiated w.r.t. the maps."""
  maps = _forward(model, x)['features']['maps']  # (B, 2, h, w, C)
  grads = np.asarray(jax.jit(jax.grad(
      lambda m: jnp.sum(logits_of(m)[:, k])))(maps))
  maps = np.asarray(maps)
  if method == 'gradcam':
    cam = np.einsum('bphwc,bpc->bphw', maps, grads.mean(axis=(2, 3)))
  else:
    cam = np.sum(grads * maps, axis=-1)
  cam = np.maximum(cam, 0)
  scale = cam.max(axis=(1, 2, 3), keepdims=True)
  return cam / np.where(scale > 0, scale, 1)


def test_global_max_pooling_matches_an_explicit_split():
  """Siamese GAP with global max pooling: logits = W (max_ij A_lateral +
  max_ij A_medial) + b, differentiated by hand."""
  model = _build(lambda: siamese_gap.SiameseGAP(
      levels=(4,), pool='gmp', heads={'kl': 3}, rngs=nnx.Rngs(0)), seed=2)
  x = jax.random.uniform(jax.random.key(4), (8, 2, 32, 32), minval=-1,
                         maxval=1)
  head = model.heads['kl']
  want = _split_cam(model, x, 2, lambda m: head(m.max(axis=(2, 3)).sum(1)),
                    'gradcam')
  out = gradcam.gradcam(model, x, head='kl', target=2)
  np.testing.assert_allclose(out['cam'], want, atol=1e-5)
  # The state as a predictor holds it gives the same.
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  again = gradcam.gradcam((graphdef, params, extra), x, head='kl', target=2)
  np.testing.assert_allclose(again['cam'], out['cam'], atol=1e-6)
  # A batch sharded over the 8 test devices: the same maps.
  mesh = runtime.data_mesh(len(x))
  sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P('data')))
  spread = gradcam.gradcam(model, sharded, head='kl', target=2)
  np.testing.assert_allclose(spread['cam'], out['cam'], atol=1e-5)


def test_sam_pooling_zeroes_gradcam_and_hirescam_matches_a_split():
  """The Semixup network's SAM pooling ends in an instance norm, so every
  Grad-CAM weight of its maps is 0; HiResCAM is not, and matches the
  explicit split through the model's own pooling and head."""
  model = _build(lambda: siamese.SemixupNet(
      width=4, pooling='sam_hv', heads={'kl': 5}, rngs=nnx.Rngs(0)), seed=3)
  x = jax.random.uniform(jax.random.key(5), (4, 2, 32, 32), minval=-1,
                         maxval=1)

  def logits_of(m):
    b, _, h, w, c = m.shape
    pooled = model.pool(m.reshape(2 * b, h, w, c), train=False)
    return model.heads['kl'](pooled.reshape(b, -1))

  hires = gradcam.gradcam(model, x, head='kl', target=3, method='hirescam')
  np.testing.assert_allclose(
      hires['cam'], _split_cam(model, x, 3, logits_of, 'hirescam'),
      atol=1e-4)
  plain = gradcam.gradcam(model, x, head='kl', target=3)
  assert np.all(np.asarray(plain['scale']) <
                1e-4 * np.asarray(hires['scale']))
  with pytest.raises(ValueError, match='unknown method'):
    gradcam.gradcam(model, x, head='kl', method='gradcam++')


def test_kneenet_default_layer():
  model = _build(lambda: siamese.KneeNet(width=4, heads={'kl': 5},
                                         rngs=nnx.Rngs(0)), seed=5)
  x = jax.random.uniform(jax.random.key(6), (2, 2, 64, 64), minval=-1,
                         maxval=1)
  out = gradcam.gradcam(model, x, head='kl')
  assert out['cam'].shape == (2, 2, 2, 2)
  assert out['heatmap'].shape == (2, 2, 64, 64)
  scale = np.asarray(out['scale'])
  cam = np.asarray(out['cam'])
  assert np.all((scale == 0) | np.isclose(cam.max(axis=(1, 2, 3)), 1))


def _ramps(value_of) -> np.ndarray:
  rows, cols = np.mgrid[:200, :200]
  return value_of(rows, cols).astype(np.uint8)


@pytest.mark.parametrize('axis', ['rows', 'cols'])
@pytest.mark.parametrize('view,size,crop', [
    ('siamese', 64, 0), ('siamese', 128, 0), ('siamese', 64, 51),
    ('whole', 72, 0), ('whole', 72, 61)])
def test_placements_invert_the_views(axis, view, size, crop):
  """Images whose pixels hold their own ROI coordinate (+20, so that 0 is
  'not covered'), cut as the views cut them, map back onto themselves."""
  roi_px, roi_mm = 200, 140.0
  roi = _ramps(lambda r, c: (r if axis == 'rows' else c) + 20)
  if view == 'siamese':
    images = views.siamese_pair(roi, roi_mm, size)
  else:
    images = views.whole_knee(roi, size)
  images = predictor.centre_crop(jnp.asarray(images, jnp.float32)[None],
                                 crop)
  placements = views.placements(view, roi_px, roi_mm, size=size, crop=crop)
  back = np.asarray(gradcam.to_roi(images, placements, roi_px))[0]
  centres = np.arange(roi_px) + 0.5  # pixel centres in pixel edges
  inside = np.zeros((roi_px, roi_px), bool)
  outside = np.ones((roi_px, roi_px), bool)
  for p in placements:
    left, upper, right, lower = p.box
    rows_in = (centres > upper + 1.5) & (centres < lower - 1.5)
    cols_in = (centres > left + 1.5) & (centres < right - 1.5)
    inside |= rows_in[:, None] & cols_in[None, :]
    rows_out = (centres < upper - 0.5) | (centres > lower + 0.5)
    cols_out = (centres < left - 0.5) | (centres > right + 0.5)
    outside &= rows_out[:, None] | cols_out[None, :]
  assert inside.sum() > 0.2 * roi_px**2 / len(placements)
  # uint8 rounding (0.5) and two bilinear resamplings of a linear ramp.
  np.testing.assert_allclose(back[inside], roi[inside], atol=1.0)
  assert not back[outside].any()


def test_placements_of_the_siamese_view_are_its_boxes():
  lateral, medial = views.placements('siamese', 300, 140.0)
  assert (lateral.box, medial.box) == views.siamese_boxes(300, 140.0)
  assert not lateral.mirrored and medial.mirrored
  whole, = views.placements('keypoints', 300, 140.0, size=320, crop=300)
  assert whole.box == pytest.approx((9.375, 9.375, 290.625, 290.625))
  with pytest.raises(ValueError, match='cannot crop'):
    views.placements('whole', 300, 140.0, crop=400)


def test_overlay_png(tmp_path):
  roi = _rois(CORNER_SQUARE, 1)[0]
  heatmap = np.zeros(roi.shape, np.float32)
  heatmap[CORNER_SQUARE] = 1.0
  heatmap[0, 0] = np.nan  # read as 0
  path = gradcam.overlay_png(roi, heatmap, tmp_path / 'figs' / 'knee.png',
                             title='KL 2, p = 0.83')
  with Image.open(path) as png:
    assert png.format == 'PNG' and min(png.size) >= 400
    pixels = np.asarray(png.convert('RGB'), np.int32)
  # Coloured over the square (1 % of the ROI), grey elsewhere.
  colour = np.abs(pixels - pixels.mean(-1, keepdims=True)).max(-1)
  assert colour.max() > 25 and 0.003 < np.mean(colour > 10) < 0.03
  assert [p.name for p in path.parent.iterdir()] == ['knee.png']
  with pytest.raises(ValueError, match='heatmap of its shape'):
    gradcam.overlay_png(roi, heatmap[:10], tmp_path / 'bad.png')


def test_as_acquired_flips_left_knees_back():
  image = np.arange(12).reshape(3, 4)
  np.testing.assert_array_equal(gradcam.as_acquired(image, 'R'), image)
  np.testing.assert_array_equal(gradcam.as_acquired(image, 'L'),
                                image[:, ::-1])
