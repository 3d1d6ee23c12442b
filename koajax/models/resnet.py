"""ResNet, SE-ResNet and SE-ResNeXt as variants of one definition (Flax NNX).

The backbones of Tiulpin & Saarakkala 2019 (multi-task KL + OARSI grading)
and of coherence learning. One `ResNet` takes the stage sizes, the block
(basic or bottleneck), the cardinality and base width of the grouped 3x3
convolution (ResNeXt), squeeze-excitation, and the flavour of the layout:

  'timm'    timm's current layout: the stride on the bottleneck's 3x3 conv,
            a padded 3x3 / 2 max-pool after the stem;
  'legacy'  the Cadene `pretrainedmodels` SENet layout the paper's ImageNet
            weights come from: SE-ResNet's stride on the first 1x1 conv
            (SE-ResNeXt keeps it on the 3x3), a 3x3 / 2 max-pool with
            ceil mode and no padding.

Channels last (NHWC), float32 parameters, compute in `dtype` (bfloat16 on
accelerators). Batch norm as PyTorch's (eps 1e-5, momentum 0.1). Grey knees
(B, H, W) are repeated to 3 channels so ImageNet weights apply.

Each head is global average pooling -> dropout -> linear, as in the paper;
the output is koajax's model output with the stage maps as features:

  {'logits': {head: (B, classes)},
   'features': {'maps': (B, h, w, C) last stage, 'pooled': (B, C),
                'stages': [(B, h_i, w_i, C_i) for each of the 4 stages]}}

With one 1000-class head and no dropout the parameter counts equal timm's
(tests/test_resnet.py). Grad-CAM layers (`offsets=`,
`koajax.models.siamese.Taps`): 'stage1'.. one per stage and 'maps' (= the
last stage).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from koajax.models import dropout as dropout_lib
# For `siamese.Taps`, the Grad-CAM hook every koajax model shares.
from koajax.models import siamese

Flavour = Literal['timm', 'legacy']
# PyTorch's BatchNorm2d: eps 1e-5, momentum 0.1 (Flax keeps 1 - momentum).
_BN = dict(epsilon=1e-5, momentum=0.9)
# Kaiming normal, fan-out, as timm and torchvision initialise convolutions.
_KAIMING = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def grouped_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, **kwargs):
  """`lax.conv_general_dilated`, with grouped convolutions on CPU as one
  batched matrix product per kernel tap.

  XLA's CPU grouped convolution (and its gradient) is slow beyond use: the
  3x3, 32-group convolution of an SE-ResNeXt50 stage-1 block (batch 16, 75
  px, 128 channels) took 19.4 s forward and backward on a 2-core AMD EPYC,
  against 0.87 s as 9 taps, each an einsum over the groups; the whole train
  step 146 s against PyTorch's 3.8 s. Accelerators keep XLA's convolution.
  The taps compute the same sums (tested against `lax` and timm).
  """
  dilated = any(d != 1 for d in (lhs_dilation or ())) or any(
      d != 1 for d in (rhs_dilation or ()))
  if (feature_group_count == 1 or dilated or isinstance(padding, str)
      or jax.default_backend() != 'cpu'):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, **kwargs)
  del kwargs  # precision, out_sharding: defaults here
  # NHWC input, HWIO kernel (I = channels per group), as nnx.Conv passes.
  kh, kw, cg, cout = rhs.shape
  groups = feature_group_count
  n, h, w, _ = lhs.shape
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  kernel = rhs.reshape(kh, kw, cg, groups, cout // groups)
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(x, (0, i, j, 0),
                          (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                           x.shape[3]), (1, sh, sw, 1))
      term = jnp.einsum('nhwgc,cgd->nhwgd',
                        tap.reshape(n, ho, wo, groups, cg), kernel[i, j])
      y = term if y is None else y + term
  return y.reshape(n, ho, wo, cout)


def _conv(cin: int, cout: int, kernel: int, *, stride: int = 1,
          groups: int = 1, padding: int | None = None, bias: bool = False,
          dtype, rngs: nnx.Rngs) -> nnx.Conv:
  pad = kernel // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride,
                  padding=[(pad, pad)] * 2, feature_group_count=groups,
                  use_bias=bias, kernel_init=_KAIMING, dtype=dtype,
                  conv_general_dilated=grouped_conv, rngs=rngs)


def _bn(channels: int, *, dtype, rngs: nnx.Rngs,
        zero: bool = False) -> nnx.BatchNorm:
  return nnx.BatchNorm(channels, **_BN, dtype=dtype, rngs=rngs,
                       scale_init=(nnx.initializers.zeros if zero else
                                   nnx.initializers.ones))


class SqueezeExcite(nnx.Module):
  """Channel gates from the pooled map: 1x1 conv C -> C/16, ReLU, 1x1 conv
  back, sigmoid (both flavours; timm rounds C/16 to a multiple of 8, which
  every ResNet width already is)."""

  def __init__(self, channels: int, *, reduction: int = 16, dtype,
               rngs: nnx.Rngs):
    hidden = channels // reduction
    self.fc1 = _conv(channels, hidden, 1, bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = _conv(hidden, channels, 1, bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    return x * jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))


class Block(nnx.Module):
  """A basic (two 3x3) or bottleneck (1x1, grouped 3x3, 1x1) residual block,
  with optional squeeze-excitation before the sum."""

  def __init__(self, cin: int, planes: int, *, stride: int, bottleneck: bool,
               groups: int, base_width: int, se: bool, stride_on_1x1: bool,
               dtype, rngs: nnx.Rngs):
    expansion = 4 if bottleneck else 1
    cout = planes * expansion
    self.bottleneck = bottleneck
    if bottleneck:
      width = int(planes * base_width / 64) * groups
      s1, s3 = (stride, 1) if stride_on_1x1 else (1, stride)
      self.conv1 = _conv(cin, width, 1, stride=s1, dtype=dtype, rngs=rngs)
      self.bn1 = _bn(width, dtype=dtype, rngs=rngs)
      self.conv2 = _conv(width, width, 3, stride=s3, groups=groups,
                         dtype=dtype, rngs=rngs)
      self.bn2 = _bn(width, dtype=dtype, rngs=rngs)
      self.conv3 = _conv(width, cout, 1, dtype=dtype, rngs=rngs)
      self.bn3 = _bn(cout, dtype=dtype, rngs=rngs)
    else:
      self.conv1 = _conv(cin, planes, 3, stride=stride, dtype=dtype,
                         rngs=rngs)
      self.bn1 = _bn(planes, dtype=dtype, rngs=rngs)
      self.conv2 = _conv(planes, planes, 3, dtype=dtype, rngs=rngs)
      self.bn2 = _bn(planes, dtype=dtype, rngs=rngs)
    self.se = SqueezeExcite(cout, dtype=dtype, rngs=rngs) if se else None
    if stride != 1 or cin != cout:
      self.down_conv = _conv(cin, cout, 1, stride=stride, padding=0,
                             dtype=dtype, rngs=rngs)
      self.down_bn = _bn(cout, dtype=dtype, rngs=rngs)
    else:
      self.down_conv = self.down_bn = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def bn(norm, y):
      return norm(y, use_running_average=not train)

    shortcut = x
    y = jax.nn.relu(bn(self.bn1, self.conv1(x)))
    if self.bottleneck:
      y = jax.nn.relu(bn(self.bn2, self.conv2(y)))
      y = bn(self.bn3, self.conv3(y))
    else:
      y = bn(self.bn2, self.conv2(y))
    if self.se is not None:
      y = self.se(y)
    if self.down_conv is not None:
      shortcut = bn(self.down_bn, self.down_conv(x))
    return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
  """A ResNet-family classifier with one GAP -> dropout -> linear per head."""

  # Subclasses that predict something else (landmarks) take no class heads.
  needs_heads = True

  def __init__(self, *, stage_sizes: Sequence[int], bottleneck: bool,
               groups: int = 1, base_width: int = 64, se: bool = False,
               flavour: Flavour = 'timm', dropout: float = 0.0,
               in_channels: int = 3, dtype: str = 'float32',
               heads: Mapping[str, int], rngs: nnx.Rngs):
    if flavour not in ('timm', 'legacy'):
      raise ValueError(f"model.flavour must be 'timm' or 'legacy'; got "
                       f'{flavour!r}')
    if not heads and self.needs_heads:
      raise ValueError('a model needs at least one head')
    dtype = jnp.dtype(dtype)
    self.in_channels = in_channels
    self.flavour = flavour
    self.stem_conv = _conv(in_channels, 64, 7, stride=2, dtype=dtype,
                           rngs=rngs)
    self.stem_bn = _bn(64, dtype=dtype, rngs=rngs)
    # Legacy SE-ResNet strides its first 1x1 conv; SE-ResNeXt its 3x3.
    stride_on_1x1 = flavour == 'legacy' and se and groups == 1
    stages, cin = [], 64
    for i, size in enumerate(stage_sizes):
      planes = 64 * 2 ** i
      blocks = []
      for j in range(size):
        blocks.append(Block(
            cin, planes, stride=2 if (i > 0 and j == 0) else 1,
            bottleneck=bottleneck, groups=groups, base_width=base_width,
            se=se, stride_on_1x1=stride_on_1x1, dtype=dtype, rngs=rngs))
        cin = planes * (4 if bottleneck else 1)
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.num_features = cin
    self.dropout = dropout_lib.Dropout(dropout)
    # Heads in float32 whatever the compute dtype.
    self.heads = nnx.Dict({name: nnx.Linear(cin, classes, rngs=rngs)
                           for name, classes in heads.items()})

  def _max_pool(self, x: jax.Array) -> jax.Array:
    if self.flavour == 'timm':
      return nnx.max_pool(x, (3, 3), strides=(2, 2),
                          padding=((1, 1), (1, 1)))
    # ceil_mode=True without padding: pad at the end only where a last,
    # partial window starts inside the map.
    h, w = x.shape[1:3]
    extra = [(0, (-(n - 3) % 2)) if n > 3 else (0, 0) for n in (h, w)]
    x = jnp.pad(x, ((0, 0), *extra, (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, (3, 3), strides=(2, 2))

  def stage_maps(self, images: jax.Array, *, train: bool,
                 taps: siamese.Taps, stages: int | None = None
                 ) -> list[jax.Array]:
    """The output maps of the first `stages` stages (default: all), each
    through its Grad-CAM tap ('stage1', ...); later stages are not run."""
    x = images
    if x.ndim == 3:  # grey knees: one channel, repeated for RGB weights
      x = x[..., None]
    if x.shape[-1] == 1 and self.in_channels == 3:
      x = jnp.repeat(x, 3, axis=-1)
    x = jax.nn.relu(self.stem_bn(self.stem_conv(x),
                                 use_running_average=not train))
    x = self._max_pool(x)
    maps = []
    for i, stage in enumerate(self.stages[:stages]):
      for block in stage:
        x = block(x, train=train)
      x = taps(f'stage{i + 1}', x)
      maps.append(x)
    return maps

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout: bool | None = None, rngs: nnx.Rngs | None = None,
               offsets: Mapping[str, Any] | None = None) -> dict[str, dict]:
    taps = siamese.Taps(offsets)
    stage_maps = self.stage_maps(images, train=train, taps=taps)
    x = taps('maps', stage_maps[-1])
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    feats = self.dropout(pooled, deterministic=not (
        train if dropout is None else dropout), rngs=rngs)
    return {'logits': {name: head(feats) for name, head in self.heads.items()},
            'features': {'maps': x, 'pooled': pooled, 'stages': stage_maps,
                         **taps.features()}}


# The variants, by the names timm gives them.
VARIANTS = {
    'resnet18': dict(stage_sizes=(2, 2, 2, 2), bottleneck=False),
    'resnet34': dict(stage_sizes=(3, 4, 6, 3), bottleneck=False),
    'resnet50': dict(stage_sizes=(3, 4, 6, 3), bottleneck=True),
    'seresnet50': dict(stage_sizes=(3, 4, 6, 3), bottleneck=True, se=True),
    'seresnext50_32x4d': dict(stage_sizes=(3, 4, 6, 3), bottleneck=True,
                              se=True, groups=32, base_width=4),
    'legacy_seresnet50': dict(stage_sizes=(3, 4, 6, 3), bottleneck=True,
                              se=True, flavour='legacy'),
    'legacy_seresnext50_32x4d': dict(stage_sizes=(3, 4, 6, 3),
                                     bottleneck=True, se=True, groups=32,
                                     base_width=4, flavour='legacy'),
}


def timm_variant(backbone: str, stage: int, why: str) -> dict[str, Any]:
  """The timm-layout variant `backbone` for a model that reads its stage
  maps up to `stage`; a legacy or unknown name, or a stage it lacks, is a
  ValueError naming the field (`why`: what needs the timm layout)."""
  variant = VARIANTS.get(backbone)
  if variant is None or variant.get('flavour', 'timm') != 'timm':
    timm = sorted(n for n, v in VARIANTS.items()
                  if v.get('flavour', 'timm') == 'timm')
    raise ValueError(f'model.backbone must be one of {", ".join(timm)} '
                     f'({why}); got {backbone!r}')
  if not 1 <= stage <= len(variant['stage_sizes']):
    raise ValueError(f'model.stage must be 1..{len(variant["stage_sizes"])}'
                     f'; got {stage}')
  return variant


def _variant(name: str):
  def create(**kwargs) -> ResNet:
    return ResNet(**{**VARIANTS[name], **kwargs})
  create.__name__ = name
  create.__doc__ = f'{name} ({VARIANTS[name]})'
  return create


MODELS = {name: _variant(name) for name in VARIANTS}
