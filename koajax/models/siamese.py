"""Siamese networks over a (lateral, mirrored medial) pair of knee patches.

Both patches go through one shared branch; the two feature vectors are
concatenated and classified by one linear layer per head of the task. Input:
(B, 2, H, W) float, the two patches of a knee as made by
`koajax.data.views.siamese_pair` and normalised to [-1, 1]. Output, as every
koajax model returns it:

  {'logits': {head: (B, classes)},
   'features': {'maps': (B, 2, h, w, C) the branch's last feature maps of
                         both patches (Grad-CAM),
                'pooled': (B, 2F) the concatenated branch vectors}}

Every koajax model takes `offsets={layer: array}` (`Taps`), arrays added to
named feature maps on the way through, for Grad-CAM
(`koajax.evaluation.gradcam`). Layers here: 'block1'.. one per conv block of
the branch, and 'maps'.

Two backbones:
  * `SemixupNet`: the Semixup paper's network ("ours", Suppl. Table S2): VGG-like
    conv blocks with instance norm and LeakyReLU(0.2), dropout between groups,
    then GAP or separable adaptive max-pooling (SAM-VH / SAM-HV).
  * `KneeNet`: the Tiulpin et al. 2018 baseline: valid convolutions, batch norm,
    ReLU, max-pooling between groups, average pooling.

Dropout keys are passed at call time (`rngs=`), so the modules hold no RNG
state and a pure train step can split/merge them freely. `train` switches
both dropout and the norms' training mode; `dropout=True` with `train=False`
is MC dropout: sampled masks, norms in inference mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from koajax.models import dropout as dropout_lib

Pooling = Literal['gap', 'sam_vh', 'sam_hv']
_NORMAL_002 = jax.nn.initializers.normal(0.02)
KL_HEAD = {'kl': 5}


class Taps:
  """Offsets added to a model's named feature maps, and those maps.

  The Grad-CAM hook of every koajax model (`koajax.evaluation.gradcam`): a
  model called with `offsets={layer: zeros}` returns the same outputs, the
  gradient of a logit w.r.t. `offsets[layer]` is its gradient w.r.t. that
  layer's maps, and the maps (offset included) come back as
  `features['taps'][layer]`. This keeps every model a plain function of its
  inputs: no perturbation variables in its state, nothing to split off, the
  same graph for training.

  An offset has the shape of the layer's maps as returned (Siamese models:
  (B, 2, h, w, C)) or is a scalar, which broadcasts (to find the shape).
  """

  def __init__(self, offsets: Mapping[str, Any] | None):
    self.offsets = dict(offsets or {})
    self.maps = {}
    self.names = []

  def __call__(self, name: str, x: jax.Array) -> jax.Array:
    """`x` plus the offset of layer `name`, if any."""
    self.names.append(name)
    if name not in self.offsets:
      return x
    offset = jnp.asarray(self.offsets[name])
    if offset.ndim:
      offset = offset.reshape(x.shape)
    # In the maps' dtype, so a bfloat16 network stays bfloat16.
    x = x + offset.astype(x.dtype)
    self.maps[name] = x
    return x

  def features(self, reshape=lambda x: x) -> dict[str, Any]:
    """{'taps': {layer: maps}} if offsets were given, else {}; raises a
    ValueError naming the model's layers for a layer it does not have."""
    unknown = sorted(set(self.offsets) - set(self.names))
    if unknown:
      raise ValueError(f'no layer {", ".join(map(repr, unknown))} in this '
                       f'model; its layers: {", ".join(self.names)}')
    if not self.offsets:
      return {}
    return {'taps': {k: reshape(v) for k, v in self.maps.items()}}


class ConvBlock(nnx.Module):
  """3x3 conv (no bias) -> norm -> activation."""

  def __init__(self, cin: int, cout: int, *, stride: int = 1,
               padding: str | int = 1, norm: str = 'instance',
               negative_slope: float = 0.2, kernel_size: int = 3,
               kernel_init=_NORMAL_002, dtype=jnp.float32, rngs: nnx.Rngs):
    pad = padding if isinstance(padding, str) else [(padding, padding)] * 2
    self.conv = nnx.Conv(cin, cout, (kernel_size, kernel_size),
                         strides=stride, padding=pad, use_bias=False,
                         kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    if norm == 'instance':
      # The reference network's InstanceNorm2d has no affine parameters.
      self.norm = nnx.InstanceNorm(cout, epsilon=1e-5, use_bias=False,
                                   use_scale=False, dtype=dtype, rngs=rngs)
    elif norm == 'batch':
      # PyTorch momentum 0.1 is Flax momentum 0.9.
      self.norm = nnx.BatchNorm(cout, epsilon=1e-3, momentum=0.9,
                                dtype=dtype, rngs=rngs)
    else:
      raise ValueError(f'unknown norm {norm!r}')
    self.negative_slope = negative_slope

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.conv(x)
    if isinstance(self.norm, nnx.BatchNorm):
      x = self.norm(x, use_running_average=not train)
    else:
      x = self.norm(x)
    return jax.nn.leaky_relu(x, self.negative_slope)


class SeparableMaxPool(nnx.Module):
  """SAM: max over one axis, 1x1 conv + IN + LeakyReLU, max over the other.

  order='hv' pools along the width first (a (1 x W) window), 'vh' along the
  height first. With the feature map H/8 wide, the reference windows of
  H/8 cover the whole axis, so a full reduction is the same operation.
  """

  def __init__(self, channels: int, order: str, *, norm: str = 'instance',
               dtype=jnp.float32, rngs: nnx.Rngs):
    if order not in ('hv', 'vh'):
      raise ValueError(f'order must be hv or vh, got {order!r}')
    self.block = ConvBlock(channels, channels, kernel_size=1, padding=0,
                           norm=norm, dtype=dtype, rngs=rngs)
    self.axes = (2, 1) if order == 'hv' else (1, 2)  # NHWC

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    first, second = self.axes
    x = jnp.max(x, axis=first, keepdims=True)
    x = self.block(x, train=train)
    return jnp.max(x, axis=second, keepdims=True).reshape(x.shape[0], -1)


class SemixupNet(nnx.Module):
  """The Semixup Siamese network (widths 32-64-128-256, 128 px patches)."""

  def __init__(self, *, pooling: Pooling = 'sam_hv', width: int = 32,
               dropout: float = 0.35, heads: Mapping[str, int] = KL_HEAD,
               norm: str = 'instance', dtype: str = 'float32',
               rngs: nnx.Rngs):
    # dtype='bfloat16' runs the convolutions and norms in bf16 on
    # accelerators; parameters, statistics and the head stay float32.
    self.dtype = jnp.dtype(dtype)
    w = width
    # (cin, cout, stride) per block; groups end after blocks 3, 5 and 7.
    plan = [(1, w, 1), (w, w, 1), (w, w, 1),
            (w, 2 * w, 2), (2 * w, 2 * w, 1),
            (2 * w, 4 * w, 2), (4 * w, 4 * w, 1),
            (4 * w, 8 * w, 2), (8 * w, 8 * w, 1)]
    self.blocks = nnx.List([ConvBlock(i, o, stride=s, norm=norm,
                                      dtype=self.dtype, rngs=rngs)
                            for i, o, s in plan])
    self.group_ends = (2, 4, 6)
    self.pooling = pooling
    if pooling == 'gap':
      self.pool = None
    else:
      self.pool = SeparableMaxPool(8 * w, pooling.split('_')[1], norm=norm,
                                   dtype=self.dtype, rngs=rngs)
    self.dropout = dropout_lib.Dropout(dropout)
    # The reference head is a 1x1 convolution without bias on the pooled map.
    self.heads = _heads(heads, 16 * w, use_bias=False,
                        kernel_init=_NORMAL_002, rngs=rngs)

  def features(self, patches: jax.Array, *, train: bool, dropout: bool,
               rngs: nnx.Rngs | None, taps: Taps | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """(N, H, W, 1) patches -> ((N, h, w, 8w) maps, (N, 8w) features)."""
    taps = taps or Taps(None)
    x = patches.astype(self.dtype)
    for i, block in enumerate(self.blocks):
      x = taps(f'block{i + 1}', block(x, train=train))
      if i in self.group_ends:
        x = self.dropout(x, deterministic=not dropout, rngs=rngs)
    x = taps('maps', x)
    if self.pool is None:
      return x, jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    return x, self.pool(x, train=train).astype(jnp.float32)

  def __call__(self, pairs: jax.Array, *, train: bool = False,
               dropout: bool | None = None, rngs: nnx.Rngs | None = None,
               offsets: Mapping[str, Any] | None = None
               ) -> dict[str, dict[str, jax.Array]]:
    return _siamese_outputs(self, pairs, train=train,
                           dropout=train if dropout is None else dropout,
                           rngs=rngs, offsets=offsets)


class KneeNet(nnx.Module):
  """Tiulpin et al. 2018 Siamese baseline (DeepKnee), width 64."""

  def __init__(self, *, width: int = 64, dropout: float = 0.2,
               heads: Mapping[str, int] = KL_HEAD, rngs: nnx.Rngs):
    w = width
    kaiming = jax.nn.initializers.he_uniform()
    block = lambda i, o, s: ConvBlock(i, o, stride=s, padding=0, norm='batch',
                                      negative_slope=0.0, kernel_init=kaiming,
                                      rngs=rngs)
    self.blocks = nnx.List([block(1, w, 2), block(w, w, 1), block(w, w, 1),
                            block(w, 2 * w, 1), block(2 * w, 2 * w, 1),
                            block(2 * w, 4 * w, 1)])
    self.pool_after = (2, 4)  # 2x2 max-pooling after these blocks
    self.dropout = dropout_lib.Dropout(dropout)
    self.heads = _heads(heads, 8 * w, kernel_init=kaiming, rngs=rngs)

  def features(self, patches: jax.Array, *, train: bool, dropout: bool,
               rngs: nnx.Rngs | None, taps: Taps | None = None
               ) -> tuple[jax.Array, jax.Array]:
    del dropout, rngs  # the branch has no dropout
    taps = taps or Taps(None)
    x = patches
    for i, block in enumerate(self.blocks):
      x = taps(f'block{i + 1}', block(x, train=train))
      if i in self.pool_after:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = taps('maps', x)
    # Average pooling over the remaining (10 x 10 for 128 px) map.
    return x, jnp.mean(x, axis=(1, 2))

  def __call__(self, pairs: jax.Array, *, train: bool = False,
               dropout: bool | None = None, rngs: nnx.Rngs | None = None,
               offsets: Mapping[str, Any] | None = None
               ) -> dict[str, dict[str, jax.Array]]:
    return _siamese_outputs(self, pairs, train=train,
                           dropout=train if dropout is None else dropout,
                           rngs=rngs, offsets=offsets)


def _heads(heads: Mapping[str, int], features: int, **linear) -> nnx.Dict:
  """One linear classifier per head, created in the task's head order (so a
  single-head network initialises exactly as before heads existed)."""
  if not heads:
    raise ValueError('a model needs at least one head')
  return nnx.Dict({name: nnx.Linear(features, classes, **linear)
                   for name, classes in heads.items()})


def _siamese_outputs(model, pairs: jax.Array, *, train: bool, dropout: bool,
                     rngs: nnx.Rngs | None, offsets: Mapping[str, Any] | None
                     ) -> dict[str, dict[str, jax.Array]]:
  """Runs the shared branch once over both patches of every knee."""
  if pairs.ndim != 4 or pairs.shape[1] != 2:
    raise ValueError(f'expected (batch, 2, H, W) patch pairs, got {pairs.shape}')
  b, _, h, w = pairs.shape
  taps = Taps(offsets)
  # Both patches of every knee in one pass of the shared branch: batch
  # norm's statistics are over all 2B patches, and one larger call suits an
  # accelerator. (On 32 CPU devices two passes over B made the SL step 4 %
  # faster on one Xeon, benchmarks/README.md; they would draw other dropout
  # masks, so the one pass stays until a GPU says which it prefers.)
  maps, feats = model.features(pairs.reshape(2 * b, h, w, 1), train=train,
                               dropout=dropout, rngs=rngs, taps=taps)
  feats = feats.reshape(b, 2 * feats.shape[-1])  # [lateral | medial]
  pooled = feats
  feats = model.dropout(feats, deterministic=not dropout, rngs=rngs)
  return {'logits': {name: head(feats) for name, head in model.heads.items()},
          'features': {'maps': maps.reshape(b, 2, *maps.shape[1:]),
                       'pooled': pooled,
                       **taps.features(
                           lambda x: x.reshape(b, 2, *x.shape[1:]))}}


MODELS = {'semixup_net': SemixupNet, 'kneenet': KneeNet}
