"""The Siamese multi-level GAP network of confidence-driven early-OA detection
(Wang et al. 2025): KL-0 against KL-2 from a knee's patch pair.

One branch, shared by the lateral patch and the mirrored medial patch (the
Siamese view, (B, 2, H, W) float in [-1, 1]):

  block 1   2 x (3x3 conv -> batch norm -> ReLU),  32 channels
  block 2   3 x ...,  64 channels, the first conv with stride 2
  block 3   4 x ..., 128 channels, stride 2 on the first
  block 4   4 x ..., 256 channels, stride 2 on the first

and no pooling layer. Every block's output is pooled over space (global
average, or global max for the paper's Table III ablation) and the pooled
vectors of the chosen levels (all four by default: 32 + 64 + 128 + 256 =
480) are concatenated. The two patches' vectors are added, not
concatenated, so the classifier sees a 480-d vector whatever the side;
dropout 0.2 on it (the paper gives the rate, not the place; before the only
linear layer is where it can act) and a linear layer to the head's classes.
Convolutions have no bias (batch norm follows) and Kaiming-normal weights
(fan in, as PyTorch's `kaiming_normal_`).

Parameters: 2,686,690 with 2 classes (tests/test_siamese_gap.py counts them
by hand), against the 2.71 M the paper states; 3x3 kernels are assumed, as
the paper does not give the kernel size.

Output, as every koajax model:

  {'logits': {head: (B, classes)},
   'features': {'maps': (B, 2, h, w, 256) block 4 of both patches (Grad-CAM),
                'pooled': (B, 480) the summed multi-level vector,
                'levels': [(B, 2, C_i) pooled per block and patch]}}

Grad-CAM layers (`offsets=`, `koajax.models.siamese.Taps`): 'block1' ..
'block4' and 'maps' (= block 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from koajax.models import dropout as dropout_lib
from koajax.models import siamese

Pool = Literal['gap', 'gmp']
# (layers, channels) per block; blocks 2-4 halve the resolution.
BLOCKS = ((2, 32), (3, 64), (4, 128), (4, 256))
_KAIMING = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class _ConvBN(nnx.Module):

  def __init__(self, cin: int, cout: int, *, stride: int, dtype,
               rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride,
                         padding=[(1, 1), (1, 1)], use_bias=False,
                         kernel_init=_KAIMING, dtype=dtype, rngs=rngs)
    # PyTorch's BatchNorm2d: eps 1e-5, momentum 0.1.
    self.norm = nnx.BatchNorm(cout, epsilon=1e-5, momentum=0.9, dtype=dtype,
                              rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return jax.nn.relu(self.norm(self.conv(x), use_running_average=not train))


class SiameseGAP(nnx.Module):
  """Shared multi-level pooled branch, the two sides added, one linear head
  per task head."""

  def __init__(self, *, levels: Sequence[int] = (1, 2, 3, 4),
               pool: Pool = 'gap', dropout: float = 0.2,
               heads: Mapping[str, int], dtype: str = 'float32',
               rngs: nnx.Rngs):
    levels = tuple(int(i) for i in levels)
    if not levels or any(i not in (1, 2, 3, 4) for i in levels) or \
        len(set(levels)) != len(levels):
      raise ValueError(f'model.levels must be distinct blocks among 1-4 (P1..'
                       f'P4); got {levels}')
    if pool not in ('gap', 'gmp'):
      raise ValueError(f"model.pool must be 'gap' or 'gmp'; got {pool!r}")
    if not heads:
      raise ValueError('a model needs at least one head')
    self.dtype = jnp.dtype(dtype)
    self.levels = levels
    self.pool = pool
    blocks, cin = [], 1
    for i, (layers, channels) in enumerate(BLOCKS):
      blocks.append(nnx.List([
          _ConvBN(cin if j == 0 else channels, channels,
                  stride=2 if (i > 0 and j == 0) else 1, dtype=self.dtype,
                  rngs=rngs) for j in range(layers)]))
      cin = channels
    self.blocks = nnx.List(blocks)
    self.num_features = sum(BLOCKS[i - 1][1] for i in levels)
    self.dropout = dropout_lib.Dropout(dropout)
    self.heads = nnx.Dict({
        name: nnx.Linear(self.num_features, classes, kernel_init=_KAIMING,
                         rngs=rngs) for name, classes in heads.items()})

  def _pool(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.mean(x, axis=(1, 2)) if self.pool == 'gap' else \
        jnp.max(x, axis=(1, 2))

  def __call__(self, pairs: jax.Array, *, train: bool = False,
               dropout: bool | None = None, rngs: nnx.Rngs | None = None,
               offsets: Mapping[str, Any] | None = None) -> dict[str, dict]:
    if pairs.ndim != 4 or pairs.shape[1] != 2:
      raise ValueError(f'expected (batch, 2, H, W) patch pairs, got '
                       f'{pairs.shape}')
    b, _, h, w = pairs.shape
    taps = siamese.Taps(offsets)
    # Both patches of every knee in one pass of the shared branch.
    x = pairs.reshape(2 * b, h, w, 1).astype(self.dtype)
    pooled = []
    for i, block in enumerate(self.blocks):
      for layer in block:
        x = layer(x, train=train)
      x = taps(f'block{i + 1}', x)
      if i == len(self.blocks) - 1:
        x = taps('maps', x)  # before its pooling, which the logits read
      pooled.append(self._pool(x))
    chosen = jnp.concatenate([pooled[i - 1] for i in self.levels], axis=-1)
    summed = chosen.reshape(b, 2, -1).sum(axis=1)  # lateral + medial
    feats = self.dropout(summed, deterministic=not (
        train if dropout is None else dropout), rngs=rngs)
    return {'logits': {name: head(feats) for name, head in self.heads.items()},
            'features': {'maps': x.reshape(b, 2, *x.shape[1:]),
                         'pooled': summed,
                         'levels': [p.reshape(b, 2, -1) for p in pooled],
                         **taps.features(
                             lambda m: m.reshape(b, 2, *m.shape[1:]))}}


MODELS = {'siamese_gap': SiameseGAP}
