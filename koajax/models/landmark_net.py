"""The landmark network: heatmaps from a ResNet trunk, soft-argmax to points.

KNEEL localises with hourglass networks; koajax uses what it already has and
can load ImageNet weights into, a timm-layout ResNet, with a small top-down
decoder (a feature pyramid) back to stride 4:

  stages 1..`stage` of the ResNet (strides 4, 8, 16, ...)
  -> a 1x1 projection of each to `decoder_width` channels
  -> from the deepest: upsample x2 (nearest), add the next shallower
     projection,
     3x3 conv + batch norm + ReLU; until stride 4
  -> a 1x1 conv to one heatmap of logits per landmark
  -> soft-argmax (`koajax.models.heatmaps`): (x, y) in input pixels.

The mean over the cells of a stride-4 map is continuous, so points are
sub-pixel; view sizes that are multiples of 2^(stage + 1) keep every map an
exact halving of the one above. The stages after `stage` are not built. The output follows koajax's model convention, with the points
beside the (empty) class logits:

  {'logits': {}, 'landmarks': (B, K, 2),
   'features': {'heatmaps': (B, h, w, K) probabilities,
                'stages': [...], 'decoded': (B, h, w, decoder_width)}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from koajax.data import schema
from koajax.models import heatmaps
from koajax.models import resnet
from koajax.models import siamese

STRIDE = 4  # of the heatmaps: ResNet's first stage


class LandmarkNet(resnet.ResNet):
  """K landmarks of a grey image, as heatmaps and their soft-argmax."""

  needs_heads = False

  def __init__(self, *, backbone: str = 'resnet18',
               landmarks: int = schema.NUM_LANDMARKS, stage: int = 3,
               decoder_width: int = 64, in_channels: int = 3,
               dtype: str = 'float32', heads: Mapping[str, int],
               rngs: nnx.Rngs):
    if heads:
      raise ValueError(
          'the landmark network predicts landmarks, not grades; its task '
          f'has no class heads (got {", ".join(heads)})')
    variant = resnet.timm_variant(backbone, stage,
                                  'the decoder reads timm-layout stages')
    # Only the stages the decoder reads are built.
    trunk = {**variant, 'stage_sizes': variant['stage_sizes'][:stage]}
    super().__init__(**trunk, in_channels=in_channels, dtype=dtype, heads={},
                     rngs=rngs)
    self.stage = stage
    dt = jnp.dtype(dtype)
    expansion = 4 if variant['bottleneck'] else 1
    widths = [64 * 2 ** i * expansion for i in range(stage)]
    self.lateral = nnx.List([
        resnet._conv(c, decoder_width, 1, bias=True, dtype=dt, rngs=rngs)  # pylint: disable=protected-access
        for c in widths])
    self.smooth = nnx.List([
        resnet._conv(decoder_width, decoder_width, 3, dtype=dt, rngs=rngs)  # pylint: disable=protected-access
        for _ in range(stage - 1)])
    self.smooth_bn = nnx.List([
        resnet._bn(decoder_width, dtype=dt, rngs=rngs)  # pylint: disable=protected-access
        for _ in range(stage - 1)])
    # Logits in float32 whatever the compute dtype; zero-initialised, so
    # every map starts flat and every landmark at the image's centre.
    self.to_heatmaps = nnx.Conv(decoder_width, landmarks, (1, 1),
                                kernel_init=nnx.initializers.zeros,
                                rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout: bool | None = None, rngs: nnx.Rngs | None = None,
               offsets: Mapping[str, Any] | None = None,
               **unused: Any) -> dict[str, Any]:
    del dropout, rngs, unused  # no dropout; views may pass keypoints
    taps = siamese.Taps(offsets)
    maps = self.stage_maps(images, train=train, taps=taps, stages=self.stage)
    x = self.lateral[-1](maps[-1])
    for i in reversed(range(self.stage - 1)):
      # To the shallower map's size: x2, or one less where the input's size
      # was odd at that stride.
      n, _, _, c = x.shape
      x = jax.image.resize(x, (n, *maps[i].shape[1:3], c), 'nearest')
      x = x + self.lateral[i](maps[i])
      x = jax.nn.relu(self.smooth_bn[i](self.smooth[i](x),
                                        use_running_average=not train))
    logits = self.to_heatmaps(x.astype(jnp.float32))
    points, probs = heatmaps.soft_argmax(logits, stride=STRIDE)
    return {'logits': {}, 'landmarks': points,
            'features': {'heatmaps': probs, 'decoded': x, 'stages': maps,
                         **taps.features()}}


MODELS = {'landmark_net': LandmarkNet}
