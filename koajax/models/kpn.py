"""The keypoint-based pooling network of coherence learning (Zheng et al.
2021), Flax NNX.

A ResNet backbone (`koajax.models.resnet`, any timm-layout variant; the
paper's is ResNet-50) whose stage-3 maps (stride 16, 1024 channels for
ResNet-50, 20 x 20 at 320 px) are sampled bilinearly at the knee's landmarks
instead of being averaged over the whole image. Each head reads the vectors
of a group of landmarks: KL and both narrowing heads all of them, each
osteophyte head only its compartment's. Each head is dropout -> linear, as
in multi-task OARSI grading.

Landmarks (`koajax.data.schema`: tibia 0-8 and femur 9-15, each from the
lateral to the medial margin; 4 the joint centre). Left knees are mirrored
in the cache, so every knee looks like a right knee, lateral on the image
left, and an index names the same anatomical point on either side:

  all  0-15
  tl   0, 1, 2, 3     lateral plateau margin, middle, inner end, spine tip
  tm   5, 6, 7, 8     medial spine tip, plateau inner end, middle, margin
  fl   9, 10, 11      lateral femoral margin, condyle's lowest point, notch
                      edge
  fm   13, 14, 15     medial notch edge, condyle's lowest point, margin

The joint centre (4) and the notch roof (12) sit on the midline and belong to
no compartment; the heads that read all landmarks see them. A head reads
group `ost_<g>` -> `<g>` unless `head_groups` says otherwise, every other
head 'all'.

Coordinates: keypoints are (x, y) view pixels with pixel centres at integers
(`koajax.data.views`). With `grid='receptive_field'` (the default) map cell
(i, j) of a stage with stride s sits at view pixel (x, y) = (s j, s i): in
the timm layout every strided convolution and pool is padded symmetrically,
so each halving keeps cell j centred on input pixel 2 j, and a keypoint at x
samples the map at u = x / s. With `grid='half_pixel'` the map is treated as
a resize of the view (u = (x + 0.5) h / H - 0.5, the convention of
`views.rescale_keypoints`, of RoIAlign's aligned mode and of `grid_sample`
without aligned corners), which puts every cell (s - 1) / 2 px further in.
Points past the outer cells take the edge cell's value (the landmarks lie
well inside the ROI).

`combine` turns a group's sampled vectors into a head's input: 'mean' (C
features, the default), 'max' (C) or 'concat' (group size x C, in landmark
order).

`kpn=False` is the paper's ablation without keypoint pooling: every head
reads the global average pool of the last stage, as `resnet.ResNet` does,
and the keypoints are not needed. With `kpn=True` the stages after `stage`
are not run; their weights are still there, so the backbone's parameters are
those of the ResNet it is named after (ImageNet weights load through
`model.init`) and the ablation changes only the heads' inputs. (They get no
gradient; an L2 weight decay alone moves them, towards 0, unread.)

Output, as every koajax model:

  {'logits': {head: (B, classes)},
   'features': {'maps': (B, h, w, C) the last stage run (the sampled one),
                'pooled': (B, C) its global average,
                'stages': [(B, h_i, w_i, C_i) of each stage run],
                'keypoints': (B, K, C) the sampled vectors (kpn only)}}

A knee without landmarks (NaN keypoints) gives NaN logits: the trainer leaves
such knees out of a 'keypoints' view run (`pipeline.knees_with_keypoints`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from koajax.data import schema
from koajax.models import resnet
from koajax.models import siamese

COMBINE = ('mean', 'max', 'concat')
GRIDS = ('receptive_field', 'half_pixel')
ALL = 'all'
DEFAULT_GROUPS: dict[str, tuple[int, ...]] = {
    ALL: tuple(range(schema.NUM_LANDMARKS)),
    'tl': (0, 1, 2, 3),
    'tm': (5, 6, 7, 8),
    'fl': (9, 10, 11),
    'fm': (13, 14, 15),
}


def stride(stage: int) -> int:
  """Pixels per map cell after `stage` (1-4) of a ResNet: 4, 8, 16, 32."""
  return 2 ** (stage + 1)


def to_map(points: jax.Array, *, view_px: Sequence[int],
           map_px: Sequence[int], stage: int,
           grid: str = 'receptive_field') -> jax.Array:
  """(..., 2) (x, y) view pixels -> (x, y) map cells (module docstring).

  Args:
    points: keypoints in view pixels, pixel centres at integers.
    view_px: the view's (height, width).
    map_px: the map's (height, width).
    stage: the stage the map comes from (its stride: `stride(stage)`).
    grid: 'receptive_field' or 'half_pixel'.
  """
  if grid == 'receptive_field':
    return points / stride(stage)
  if grid == 'half_pixel':
    scale = jnp.array([map_px[1] / view_px[1], map_px[0] / view_px[0]],
                      points.dtype)
    return (points + 0.5) * scale - 0.5
  raise ValueError(f'model.grid must be one of {", ".join(GRIDS)}; got '
                   f'{grid!r}')


def _corners(u: jax.Array, size: int) -> tuple[jax.Array, jax.Array,
                                                jax.Array]:
  """Lower and upper cell index and the weight of the upper one, for
  coordinates `u` clamped into [0, size - 1]."""
  u = jnp.clip(u, 0.0, size - 1.0)
  lo = jnp.clip(jnp.floor(u), 0.0, max(size - 2, 0))
  hi = jnp.minimum(lo + 1.0, size - 1.0)
  return lo.astype(jnp.int32), hi.astype(jnp.int32), u - lo


def sample_bilinear(maps: jax.Array, points: jax.Array) -> jax.Array:
  """(B, K, C) float32 values of (B, h, w, C) maps at (B, K, 2) points.

  Points are (x, y) in map cells, cell (i, j) at (x=j, y=i); between cells
  the value is bilinear in x and y, and points outside the map are clamped
  to its edge.
  """
  h, w = maps.shape[1:3]
  x0, x1, fx = _corners(points[..., 0], w)
  y0, y1, fy = _corners(points[..., 1], h)

  def one(m, x0, x1, y0, y1):
    return m[y0, x0], m[y0, x1], m[y1, x0], m[y1, x1]

  v00, v01, v10, v11 = jax.vmap(one)(maps.astype(jnp.float32), x0, x1, y0,
                                     y1)
  fx, fy = fx[..., None], fy[..., None]
  return ((1 - fy) * ((1 - fx) * v00 + fx * v01)
          + fy * ((1 - fx) * v10 + fx * v11))


def head_group(head: str, head_groups: Mapping[str, str]) -> str:
  """The landmark group head `head` reads (module docstring)."""
  if head in head_groups:
    return head_groups[head]
  if head.startswith('ost_'):
    return head[len('ost_'):]
  return ALL


class KeypointPooling(resnet.ResNet):
  """A ResNet whose heads read its stage maps at the knee's landmarks."""

  def __init__(self, *, backbone: str = 'resnet50', kpn: bool = True,
               stage: int = 3, combine: str = 'mean',
               grid: str = 'receptive_field',
               groups: Mapping[str, Sequence[int]] | None = None,
               head_groups: Mapping[str, str] | None = None,
               dropout: float = 0.0, in_channels: int = 3,
               dtype: str = 'float32', heads: Mapping[str, int],
               rngs: nnx.Rngs):
    variant = resnet.timm_variant(backbone, stage,
                                  'the grid assumes the timm layout')
    if combine not in COMBINE:
      raise ValueError(f'model.combine must be one of {", ".join(COMBINE)}; '
                       f'got {combine!r}')
    if grid not in GRIDS:
      raise ValueError(f'model.grid must be one of {", ".join(GRIDS)}; got '
                       f'{grid!r}')
    super().__init__(**variant, dropout=dropout, in_channels=in_channels,
                     dtype=dtype, heads=heads, rngs=rngs)
    groups = {name: tuple(int(i) for i in idx) for name, idx in
              (DEFAULT_GROUPS if groups is None else groups).items()}
    head_groups = dict(head_groups or {})
    self.kpn = bool(kpn)
    self.stage = stage
    self.combine = combine
    self.grid = grid
    reads = {h: head_group(h, head_groups) for h in heads}
    for h, g in reads.items():
      if g not in groups:
        raise ValueError(f'head {h} reads landmark group {g!r}, which '
                         f'model.groups lacks (it has {", ".join(groups)})')
    for g, idx in groups.items():
      if not idx or min(idx) < 0 or max(idx) >= schema.NUM_LANDMARKS:
        raise ValueError(f'model.groups.{g} must list landmark indices in '
                         f'0..{schema.NUM_LANDMARKS - 1}; got {idx}')
    # (name, value) pairs rather than dicts: the model's static attributes
    # stay hashable, as jit needs a graph definition to be. Only the groups
    # some head reads, in the order of the heads.
    self.head_groups = tuple(reads.items())
    self.groups = tuple((g, groups[g]) for g in dict.fromkeys(reads.values()))
    if self.kpn:
      expansion = 4 if variant['bottleneck'] else 1
      channels = 64 * 2 ** (stage - 1) * expansion
      width = {g: channels * (len(idx) if combine == 'concat' else 1)
               for g, idx in self.groups}
      # Replaces the global-pool heads ResNet made: same names, other widths.
      self.heads = nnx.Dict({
          name: nnx.Linear(width[reads[name]], classes, rngs=rngs)
          for name, classes in heads.items()})

  def _combine(self, vectors: jax.Array) -> jax.Array:
    if self.combine == 'mean':
      return jnp.mean(vectors, axis=1)
    if self.combine == 'max':
      return jnp.max(vectors, axis=1)
    return vectors.reshape(vectors.shape[0], -1)

  def __call__(self, images: jax.Array, *, keypoints: jax.Array | None = None,
               train: bool = False, dropout: bool | None = None,
               rngs: nnx.Rngs | None = None,
               offsets: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """Logits and features of (B, H, W) knees with (B, K, 2) keypoints ((x,
    y) view pixels); `keypoints` is needed with kpn only."""
    taps = siamese.Taps(offsets)
    stage_maps = self.stage_maps(images, train=train, taps=taps,
                                 stages=self.stage if self.kpn else None)
    x = taps('maps', stage_maps[-1])
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    features = {'maps': x, 'pooled': pooled, 'stages': stage_maps}
    if self.kpn:
      if keypoints is None:
        raise ValueError(
            'the keypoint pooling network needs the knees\' keypoints '
            "(the 'keypoints' view); with model.kpn=False it pools globally")
      points = to_map(jax.lax.stop_gradient(jnp.asarray(keypoints,
                                                        jnp.float32)),
                      view_px=images.shape[-2:] if images.ndim == 3
                      else images.shape[1:3],
                      map_px=x.shape[1:3], stage=self.stage, grid=self.grid)
      sampled = sample_bilinear(x, points)
      features['keypoints'] = sampled
      inputs = {g: self._combine(sampled[:, list(idx)])
                for g, idx in self.groups}
    else:
      inputs = {g: pooled for g, _ in self.groups}
    deterministic = not (train if dropout is None else dropout)
    # One dropout mask per group, shared by the heads that read it (as
    # ResNet's heads share the one pooled vector's).
    inputs = {g: self.dropout(v, deterministic=deterministic, rngs=rngs)
              for g, v in inputs.items()}
    reads = dict(self.head_groups)
    logits = {name: head(inputs[reads[name]])
              for name, head in self.heads.items()}
    return {'logits': logits, 'features': {**features, **taps.features()}}


MODELS = {'kpn': KeypointPooling}
