"""Landmark regression: the localiser's method.

Each knee of the labeled stream is jittered on the device by one random
similarity (`augment.jitter_augment`: translation, rotation, scale about
the view's centre), its 16 landmarks moved with it, and the network's
points (`outputs['landmarks']`, (B, 16, 2) view pixels, from the heatmaps'
soft-argmax) are pulled to them by their mean Euclidean distance in view
pixels. The distance is KNEEL's choice of loss on soft-argmax points: it
trains the coordinates themselves, so no target heatmap and no heatmap
width is tuned; the report converts pixels to mm (`Task.landmarks`).

Jitter is what makes the localiser find a knee that is not where the
training ROIs put it: the translation (`max_translation`, view pixels)
should cover how far from the ROI's centre a knee may sit when the ROI
comes from a coarse localisation rather than from the truth.

`mirror` is the share of knees also flipped left-right with their points
flipped but not renumbered: lateral points stay on the lateral bone, now on
the other side of the view. A network so trained reads the knee's side from
its anatomy (the fibula is lateral), which is how the localiser checks a
manifest's side against the image (`koajax.localize`). The coarse stage
uses it; the fine stage sees every knee as the cache stores it, as a right
knee.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from koajax import cli
from koajax import methods
from koajax.data import augment
from koajax.data import views
from koajax.evaluation import landmarks as landmarks_lib


@dataclasses.dataclass(frozen=True)
class Landmarks(methods.Method):
  max_translation: float = 16.0  # view pixels, per axis
  max_rotation_deg: float = 10.0
  scale_range: tuple[float, float] = (0.9, 1.1)
  mirror: float = 0.0  # share of knees flipped left-right, points unnumbered

  def loss(self, forward, batch, key, *, epoch, state):
    del epoch, state
    labeled = batch['labeled']
    k_aug, k_fwd = jax.random.split(key)
    images, points = augment.augment_batch(
        augment.jitter_augment, k_aug, labeled['image'],
        labeled['keypoints'], max_translation=self.max_translation,
        max_rotation_deg=self.max_rotation_deg,
        scale_range=tuple(self.scale_range))
    if self.mirror:
      # A key of its own: runs without mirroring draw as before.
      flip = jax.random.bernoulli(jax.random.fold_in(key, 1), self.mirror,
                                  (images.shape[0],))
      images = jnp.where(flip[:, None, None], images[:, :, ::-1], images)
      width = images.shape[-1]
      mirrored = points.at[..., 0].set(width - 1 - points[..., 0])
      points = jnp.where(flip[:, None, None], mirrored, points)
    pred = forward(augment.normalise(images), k_fwd)['landmarks']
    # The epsilon keeps the gradient finite at a perfect point.
    distance = jnp.sqrt(jnp.sum((pred - points) ** 2, axis=-1) + 1e-6)
    loss = jnp.mean(distance)
    return loss, {'distance_px': loss,
                  'centre_px': jnp.mean(distance[:, landmarks_lib.CENTRE])}


def _create(task, **options) -> Landmarks:
  if not task.landmarks:
    raise cli.BadInput(
        f"method landmarks trains a localiser; task {task.name!r} grades "
        "knees. Use task 'landmarks' (configs/localizer.py)")
  if task.view not in views.KEYPOINT_VIEWS:
    raise cli.BadInput(
        "method landmarks reads the knees' landmarks: set view='keypoints' "
        f'(the {task.view!r} view has none)')
  if not 0.0 <= options.get('mirror', 0.0) <= 1.0:
    raise cli.BadInput(f"method_kwargs.mirror={options['mirror']}: give the "
                       'share of knees to flip, 0..1')
  if 'scale_range' in options:
    options['scale_range'] = tuple(options['scale_range'])
  return Landmarks(**options)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Landmarks)}

METHODS = {'landmarks': methods.Spec(_create, _DEFAULTS)}
