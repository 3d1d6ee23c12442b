"""Grad-CAM of any koajax model and head, laid back onto the knee ROI.

    out = gradcam(model, views, head='kl')            # one jitted call
    roi = to_roi(out['heatmap'], placements, roi_px)  # (B, roi_px, roi_px)
    overlay_png(knee_roi, roi[i], 'knee.png', title='KL 2, p = 0.83')

with `placements = koajax.data.views.placements(view, roi_px, roi_mm, ...)`,
or from a trained run's weights (`koajax.train.predictor.Member`) and cached
uint8 view images straight to ROI heatmaps, in one jitted call:

    out = explain(member, images, head='kl', view='siamese', roi_px=300,
                  roi_mm=140.0)                       # out['roi']

Grad-CAM (Selvaraju et al. 2017): for class k of a head, the gradient of
its logit y_k w.r.t. a layer's feature maps A (h x w x C) gives one weight
per channel, w_c = mean_ij dy_k / dA_ijc, and the map ReLU(sum_c w_c A_c).
The layer is the model's last block by default (`features['maps']`); others
by name ('block3' of `siamese_gap`, 'stage2' of a ResNet: the models'
docstrings list them). A Siamese model's two patches (lateral, mirrored
medial) each get their own weights and map, and both maps of a knee are
divided by their joint maximum, so the two compartments are comparable and
the stronger one reaches 1; a whole-knee model's map is divided by its own
maximum. A knee with no positive evidence for the class gets zeros.

`method='hirescam'` (Draelos & Carin 2020) keeps the gradient where it is
instead of averaging it over space: ReLU(sum_c dy_k / dA_ijc * A_ijc). It is
the choice for maps that an instance norm without affine parameters reads
before anything pools them, as in the Semixup network's SAM pooling (its
default; max over one axis, 1x1 conv, instance norm): the norm subtracts
each channel's mean, so the gradient of any output w.r.t. those maps sums to
zero over space in every channel, every Grad-CAM weight is 0 and the map is
float noise. Its inner blocks ('block1'..: conv, instance norm) come close
to that (only the zero-padded borders keep the sums off zero); with GAP
pooling its 'maps' are fine.

The gradient at an intermediate layer: every koajax model takes
`offsets={layer: array}` and adds it to that layer's maps
(`koajax.models.siamese.Taps`); with zeros the outputs are unchanged and
dy / d offset = dy / dA. This was chosen over Flax NNX's `Module.perturb`
with `nnx.capture`, which are new in flax 0.12 (and `perturb` outside
`capture` is deprecated and stores a variable in the module, changing the
state that training and checkpoints see), and over splitting each model
into maps -> logits, which needs code per model: `siamese_gap`'s logits
also read the earlier blocks' pooled vectors, and the offset gives the
partial derivative w.r.t. the chosen maps whatever follows them.

One call covers a batch: in inference mode (norms with their running
statistics, no dropout) a knee's logits depend on its own images only, so
the gradient of the sum of every knee's class logit is every knee's own
gradient, one backward pass for all; a batch sharded over devices stays
sharded.

Mapping back: each map is resized (bilinear) to its image's size, the
medial one un-mirrored, and placed where its image was cut from the ROI
(`koajax.data.views.placements`: the Siamese patches, the whole ROI, and
the predictor's centre crop, `predict.crop`); ROI pixels no image covers
are 0. The feature grid is taken to span its image evenly, as Grad-CAM
always assumes; for networks of valid convolutions (KneeNet) that is an
approximation at the borders.

Orientation: the cache stores left knees mirrored to look like right ones
(`koajax.data.preprocess.roi_geometry`, `koajax.data.png_folders`), lateral
side on the image left. ROI heatmaps and overlays are in the ROI as stored
in the cache; `as_acquired` flips a left knee's ROI and heatmap back to how
the knee lies on its radiograph.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from koajax.data import views as views_lib
from koajax.evaluation import plots
from koajax.train import predictor as predictor_lib
from koajax.train import step as step_lib

DEFAULT_LAYER = 'maps'
METHODS = ('gradcam', 'hirescam')
# Compiled functions of the latest graphdefs: (fn, graphdef, static, jitted).
_JITTED: list[tuple[Any, Any, tuple[Any, ...], Any]] = []
_MAX_JITTED = 16


def _jitted(fn, graphdef, **static):
  """`jax.jit(fn)` with `graphdef` and `static` bound, reused for equal ones.

  A GraphDef is compared, not hashed (flax keeps lists in it, e.g. conv
  padding, so it cannot be a static argument), and `nnx.split` makes a new
  one per call: equality keeps one compiled program per model structure.
  """
  key = tuple(sorted(static.items()))
  for entry in _JITTED:
    if entry[0] is fn and entry[2] == key and entry[1] == graphdef:
      return entry[3]
  jitted = jax.jit(functools.partial(fn, graphdef=graphdef, **static))
  _JITTED.append((fn, graphdef, key, jitted))
  del _JITTED[:-_MAX_JITTED]
  return jitted


def _targets(target: int | Sequence[int] | np.ndarray | jax.Array | None,
             batch: int) -> np.ndarray:
  """(batch,) int32 classes, -1 for 'the predicted class'."""
  if target is None:
    return np.full((batch,), -1, np.int32)
  target = np.asarray(target, np.int32)
  if target.ndim == 0:
    target = np.full((batch,), target)
  if target.shape != (batch,):
    raise ValueError(f'target must be None, a class index or one per knee '
                     f'({batch}), got shape {target.shape}')
  if np.any(target < 0):
    raise ValueError('target classes must be >= 0')
  return target


def _check_classes(target: np.ndarray, out: dict[str, jax.Array]) -> None:
  """Raises a ValueError for a target class the head does not have."""
  classes = out['probs'].shape[-1]  # known without waiting for the result
  if target.max() >= classes:
    raise ValueError(f'target class {target.max()} is not one of the '
                     f'head\'s {classes} classes')


def gradcam_arrays(model: nnx.Module, images: jax.Array, target: jax.Array,
                   *, head: str, layer: str = DEFAULT_LAYER,
                   method: str = 'gradcam',
                   keypoints: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
  """The Grad-CAM of a batch, as a traceable function (see `gradcam`).

  Args:
    model: a koajax model, called with `train=False`.
    images: the model's input, (B, 2, H, W) patch pairs or (B, H, W) knees.
    target: (B,) int classes to explain, -1 for each knee's predicted one.
    head: the head whose logits are explained.
    layer: the layer whose maps are differentiated.
    method: 'gradcam' or 'hirescam' (module docstring).
    keypoints: (B, K, 2) keypoints for a model that reads them (the
      keypoint pooling network), else None.

  Returns:
    As `gradcam`.
  """
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; choose one of '
                     f'{", ".join(METHODS)}')

  inputs = {} if keypoints is None else {'keypoints': keypoints}

  def forward(offset):
    return model(images, train=False, offsets={layer: offset}, **inputs)

  # The maps' shape, traced once without computing anything.
  maps = jax.eval_shape(lambda: forward(jnp.zeros(()))['features']['taps'])
  maps = maps[layer]

  def score(offset):
    out = forward(offset)
    logits = out['logits'][head].astype(jnp.float32)
    classes = jnp.where(target >= 0, target,
                        jnp.argmax(logits, axis=-1).astype(jnp.int32))
    chosen = jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]
    aux = {'class': classes, 'logit': chosen,
           'probs': jax.nn.softmax(logits, axis=-1),
           'maps': out['features']['taps'][layer]}
    # Knees are independent in inference mode, so the gradient of the sum
    # is each knee's own.
    return jnp.sum(chosen), aux

  grads, aux = jax.grad(score, has_aux=True)(jnp.zeros(maps.shape,
                                                       maps.dtype))
  acts = aux.pop('maps').astype(jnp.float32)
  grads = grads.astype(jnp.float32)
  if method == 'gradcam':
    weights = jnp.mean(grads, axis=(-3, -2))
    cam = jax.nn.relu(jnp.einsum('...hwc,...c->...hw', acts, weights))
  else:
    cam = jax.nn.relu(jnp.sum(grads * acts, axis=-1))
  # Jointly per knee: both patches of a pair share one scale.
  knee_axes = tuple(range(1, cam.ndim))
  scale = jnp.max(cam, axis=knee_axes)
  safe = jnp.where(scale > 0, scale, 1.0)
  cam = cam / safe.reshape(-1, *[1] * len(knee_axes))
  heatmap = jax.image.resize(cam, (*cam.shape[:-2], *images.shape[-2:]),
                             'bilinear')
  return {'cam': cam, 'heatmap': jnp.clip(heatmap, 0.0, 1.0),
          'scale': scale, **aux}


def _gradcam(states, images, target, keypoints, *, graphdef, head, layer,
             method):
  model = nnx.merge(graphdef, *states, copy=True)
  return gradcam_arrays(model, images, target, head=head, layer=layer,
                        method=method, keypoints=keypoints)


def gradcam(model: nnx.Module | tuple[Any, ...], images: jax.Array, *,
            head: str, target: int | Sequence[int] | jax.Array | None = None,
            layer: str = DEFAULT_LAYER, method: str = 'gradcam',
            keypoints: jax.Array | None = None) -> dict[str, jax.Array]:
  """Grad-CAM of a batch of knees, in one jitted call.

  Args:
    model: a koajax model, or its `(graphdef, *states)` as `nnx.split`
      returns them (e.g. `(member.graphdef, member.params, member.extra)`).
    images: what the model takes: normalised float (B, 2, H, W) patch pairs
      or (B, H, W) knees, possibly sharded over devices along B.
    head: the head whose logits are explained.
    target: the class to explain: None for each knee's predicted class, one
      index for all knees, or one per knee.
    layer: the layer whose maps are differentiated ('maps': the last
      block); an unknown name raises a ValueError listing the model's.
    method: 'gradcam', or 'hirescam' for maps an instance norm reads
      (the Semixup network with SAM pooling; module docstring).
    keypoints: (B, K, 2) keypoints in image pixels for a model that reads
      them (the keypoint pooling network, `koajax.models.kpn`).

  Returns:
    {'cam': (B, [2,] h, w) Grad-CAM at the layer's resolution, in [0, 1]
            (divided by 'scale'),
     'heatmap': (B, [2,] H, W) 'cam' resized to the images' size,
     'scale': (B,) the knee's largest raw Grad-CAM value (0: no positive
              evidence, and a map of zeros),
     'class': (B,) the class explained, 'logit': (B,) its logit,
     'probs': (B, classes) the head's probabilities}
  """
  if isinstance(model, nnx.Module):
    graphdef, *states = nnx.split(model)
  else:
    graphdef, *states = model
  classes = _targets(target, images.shape[0])
  fn = _jitted(_gradcam, graphdef, head=head, layer=layer, method=method)
  out = fn(tuple(states), images, classes, keypoints)
  _check_classes(classes, out)
  return out


def to_roi_arrays(heatmaps: jax.Array,
                  placements: Sequence[views_lib.Placement],
                  roi_px: int) -> jax.Array:
  """(B, roi_px, roi_px) ROI heatmaps, as a traceable function (`to_roi`)."""
  placements = tuple(placements)
  if heatmaps.ndim == 3:  # one image per knee
    heatmaps = heatmaps[:, None]
  if heatmaps.ndim != 4 or heatmaps.shape[1] != len(placements):
    raise ValueError(f'{len(placements)} placements for maps of shape '
                     f'{heatmaps.shape}; expected (B, {len(placements)}, H, '
                     'W)')
  b, _, h, w = heatmaps.shape
  roi = jnp.zeros((b, roi_px, roi_px), jnp.float32)
  for i, place in enumerate(placements):
    image = heatmaps[:, i].astype(jnp.float32)
    if place.mirrored:
      image = image[..., ::-1]
    left, upper, right, lower = place.box
    # scale_and_translate maps an image's pixel edges x to x * scale +
    # translation and leaves what lies outside the image at 0.
    placed = jax.image.scale_and_translate(
        image, (b, roi_px, roi_px), (1, 2),
        jnp.array([(lower - upper) / h, (right - left) / w], jnp.float32),
        jnp.array([upper, left], jnp.float32), 'linear', antialias=False)
    # The views' images do not overlap; max keeps [0, 1] if a custom
    # placement does.
    roi = jnp.maximum(roi, placed)
  return roi


@functools.partial(jax.jit, static_argnames=('placements', 'roi_px'))
def _to_roi(heatmaps, *, placements, roi_px):
  return to_roi_arrays(heatmaps, placements, roi_px)


def to_roi(heatmaps: jax.Array, placements: Sequence[views_lib.Placement],
           roi_px: int) -> jax.Array:
  """Maps over view images laid back onto their knees' ROIs.

  Args:
    heatmaps: (B, n, H, W) one map per image of a knee's view, in the order
      of `placements` (the Siamese pair: lateral, medial as the network saw
      it, i.e. mirrored), or (B, H, W) for single-image views.
    placements: where each image came from (`koajax.data.views.placements`).
    roi_px: the ROI's side in pixels.

  Returns:
    (B, roi_px, roi_px) float32, bilinear, 0 where no image covers.
  """
  return _to_roi(heatmaps, placements=tuple(placements), roi_px=roi_px)


def _explain(params, extra, input_norm, images, target, keypoints, *,
             graphdef, head, layer, method, crop, placements, roi_px):
  model = nnx.merge(graphdef, params, extra, copy=True)
  if not predictor_lib.takes_keypoints(model):
    keypoints = None
  # The predictor's inputs (`predictor._member_outputs`), without TTA.
  x, keypoints = predictor_lib.crop_view(step_lib.normalise(images),
                                         keypoints, crop)
  if input_norm is not None:
    x = (x - input_norm['mean']) / input_norm['std']
  out = gradcam_arrays(model, x, target, head=head, layer=layer,
                       method=method, keypoints=keypoints)
  return {**out, 'roi': to_roi_arrays(out['heatmap'], placements, roi_px)}


def explain(member: predictor_lib.Member, images: np.ndarray | jax.Array, *,
            head: str, view: str, roi_px: int, roi_mm: float,
            view_size: int = 0, crop: int = 0,
            target: int | Sequence[int] | jax.Array | None = None,
            layer: str = DEFAULT_LAYER, method: str = 'gradcam',
            keypoints: np.ndarray | jax.Array | None = None
            ) -> dict[str, jax.Array]:
  """Grad-CAM of a trained run's member on cached knees, onto their ROIs.

  The images go through what the predictor does before its network
  (uint8 -> [-1, 1], the centre crop, the run's `input_norm`); test-time
  augmentation is not applied. One jitted call.

  Args:
    member: the weights (`koajax.train.predictor.Member`).
    images: uint8 view images as `koajax.data.pipeline.eval_batches` yields
      them, (B, 2, H, W) or (B, H, W).
    head: the head whose logits are explained.
    view: the task's view ('siamese', 'whole', ...).
    roi_px: the cached ROI's side in pixels.
    roi_mm: the cached ROI's side in millimetres (cache meta 'roi_mm').
    view_size: the task's view size (0: the view's own).
    crop: the predictor's centre crop (`predict.crop`; 0: none).
    target: as for `gradcam`.
    layer: as for `gradcam`.
    method: as for `gradcam`.
    keypoints: (B, K, 2) the knees' keypoints in view pixels ('keypoints'
      view), for a model that reads them; shifted with the crop.

  Returns:
    `gradcam`'s outputs and 'roi': (B, roi_px, roi_px) heatmaps in [0, 1]
    over the ROI as stored in the cache.
  """
  placements = views_lib.placements(view, roi_px, roi_mm, size=view_size,
                                    crop=crop)
  classes = _targets(target, images.shape[0])
  fn = _jitted(_explain, member.graphdef, head=head, layer=layer,
               method=method, crop=crop, placements=placements,
               roi_px=roi_px)
  out = fn(member.params, member.extra, member.input_norm, images, classes,
           keypoints)
  _check_classes(classes, out)
  return out


def as_acquired(image: np.ndarray, side: str) -> np.ndarray:
  """A cached ROI (or a heatmap over it) as the knee lies on its
  radiograph: left knees, stored mirrored, flipped back."""
  if side not in ('R', 'L'):
    raise ValueError(f"side must be 'R' or 'L', got {side!r}")
  image = np.asarray(image)
  return image[..., ::-1] if side == 'L' else image


def overlay_png(roi_image: np.ndarray, heatmap: np.ndarray, path: str | Path,
                *, title: str | None = None, alpha: float = 0.45,
                cmap: str = 'jet') -> Path:
  """A PNG of the grey ROI under its heatmap, written atomically.

  Args:
    roi_image: (roi_px, roi_px) uint8 (or float in [0, 255]) ROI.
    heatmap: (roi_px, roi_px) in [0, 1], e.g. a row of `to_roi`'s output.
    path: the PNG to write (its folder is created).
    title: drawn above the image (e.g. the class and its probability).
    alpha: the heatmap's opacity where it is above 0; where it is 0 (no
      evidence, or no patch there) the ROI shows plain.
    cmap: a matplotlib colormap name.

  Returns:
    The path written.
  """
  # Imported here: matplotlib is only needed for figures.
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  roi_image = np.asarray(roi_image, np.float32)
  heatmap = np.nan_to_num(np.asarray(heatmap, np.float32))
  if roi_image.ndim != 2 or heatmap.shape != roi_image.shape:
    raise ValueError(f'expected a 2-D ROI and a heatmap of its shape, got '
                     f'{roi_image.shape} and {heatmap.shape}')
  heatmap = np.clip(heatmap, 0.0, 1.0)
  rgba = colormaps[cmap](heatmap)
  rgba[..., 3] = np.where(heatmap > 0, alpha, 0.0)
  side = 4.0
  fig = Figure(figsize=(side, side + (0.35 if title else 0.0)))
  ax = fig.add_axes((0.0, 0.0, 1.0, side / fig.get_figheight()))
  ax.imshow(roi_image, cmap='gray', vmin=0, vmax=255,
            interpolation='nearest')
  ax.imshow(rgba, interpolation='nearest')
  ax.set_axis_off()
  if title:
    fig.suptitle(title, fontsize=10, y=1.0 - 0.05 / fig.get_figheight())
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # At least the ROI's own pixels, and a readable title on small ROIs.
  dpi = max(100.0, roi_image.shape[0] / side)
  # The format is passed because the temporary name's suffix is not png.
  return plots.write_atomically(
      path, lambda partial: fig.savefig(partial, format='png', dpi=dpi))


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, *,
                alpha: float = 0.45, cmap: str = 'jet') -> np.ndarray:
  """(H, W, 3) uint8: the grey image with the heatmap blended in where it
  is above 0 (`gradcam.overlay_png`'s look, without a figure)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  heat = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0, 1)
  grey = np.repeat(np.asarray(image, np.float32)[..., None] / 255.0, 3, -1)
  colour = colormaps[cmap](heat)[..., :3]
  weight = np.where(heat > 0, alpha, 0.0)[..., None]
  return np.round((grey * (1 - weight) + colour * weight) * 255).astype(
      np.uint8)


GRADCAM_DIR = 'gradcam'
GRADCAM_CSV = 'gradcam.csv'


def write_extremes(out_dir: str | Path, member: predictor_lib.Member,
                   cache: Any, indices: np.ndarray, *, labels: np.ndarray,
                   probs: np.ndarray, head: str, view: str, count: int,
                   view_size: int = 0, crop: int = 0,
                   class_names: Sequence[str] | None = None) -> Path | None:
  """Overlays of the `count` most and `count` least confident knees.

  Confidence is p(true class), as the confidence-driven paper ranks knees;
  each overlay explains the knee's predicted class. Writes
  `out_dir`/gradcam/{most,least}_confident_<rank>_<knee_id>.png and
  gradcam.csv (one row per overlay); returns the folder, or None when no
  knee is graded.

  Args:
    out_dir: the report folder.
    member: the weights the report's probabilities came from.
    cache: the open cache of `indices`.
    indices: (n,) cache rows of the report's knees.
    labels: (n,) the head's labels (-1 ungraded: left out).
    probs: (n, C) the head's probabilities.
    head, view, view_size, crop: as for `explain`.
    count: knees at each end.
    class_names: names in titles (default: the class indices).
  """
  from koajax.data import pipeline  # pylint: disable=g-import-not-at-top
  labels, probs = np.asarray(labels), np.asarray(probs)
  indices = np.asarray(indices)
  graded = np.flatnonzero(labels >= 0)
  if not len(graded) or count < 1:
    return None
  confidence = probs[graded, labels[graded]]
  order = graded[np.argsort(-confidence, kind='stable')]
  count = min(count, len(order))
  chosen = [('most', order[:count]), ('least', order[::-1][:count])]
  rows = np.concatenate([picked for _, picked in chosen])
  (batch,) = pipeline.eval_batches(
      cache, indices[rows], view=view, view_size=view_size,
      batch_size=len(rows), sharding=pipeline.Sharding(0, 1))
  out = explain(member, batch['image'], head=head, view=view,
                roi_px=int(cache.meta['roi_px']),
                roi_mm=float(cache.meta['roi_mm']), view_size=view_size,
                crop=crop, keypoints=batch.get('keypoints'))
  heat = np.asarray(jax.device_get(out['roi']))
  names = list(class_names or [str(k) for k in range(probs.shape[1])])
  folder = Path(out_dir) / GRADCAM_DIR
  records, position = [], 0
  for kind, picked in chosen:
    for rank, row in enumerate(picked, 1):
      knee = cache.index['knee_id'].iloc[indices[row]]
      predicted = int(np.argmax(probs[row]))
      name = f'{kind}_confident_{rank}_{knee}.png'
      overlay_png(cache[int(indices[row])]['image'],
                  heat[position], folder / name,
                  title=(f'{knee}: true {names[labels[row]]}, predicted '
                         f'{names[predicted]}, p(true) = '
                         f'{probs[row, labels[row]]:.3f}'))
      records.append({'file': name, 'knee_id': knee, 'kind': kind,
                      'rank': rank, 'true': int(labels[row]),
                      'predicted': predicted,
                      'p_true': float(probs[row, labels[row]])})
      position += 1
  frame = pd.DataFrame(records)
  plots.write_atomically(folder / GRADCAM_CSV,
                         lambda path: frame.to_csv(path, index=False))
  return folder
