"""Landmarks for radiographs that come without them: the trained localiser.

A localiser is a folder holding two runs of configs/localizer.py:

  DIR/coarse  the `coarse*` presets: one knee's side of a film at about
              1 mm/px (`preprocess.extract_side`: its half of a bilateral
              film, or a whole single-knee film)
  DIR/fine    the other presets: the knee's ROI as the cache cuts it
              (`preprocess.extract_roi`, 140 mm)

For each knee of a film, as KNEEL does it: the coarse run's 16 points on the
side view, mapped back to the film, place and level an ROI; the fine run's
points on that ROI, mapped back to the film, are the knee's landmarks. Each
view is made exactly as the run's training cache made it (the same
extraction at the cache's roi_mm / roi_px, then the resize to the run's view
size), so the networks see what they were trained on.

The fine stage looks twice: on the ROI the coarse points place and on that
ROI moved by `probe_mm` (along the plateau). A network that sees a knee
finds the same anatomy in both, so the two answers agree on the film to
about its error; one that sees no knee answers from where its view is, and
its two answers lie the probe apart. The landmarks are the mean of the two.

A knee is refused, with a reason a user can act on, when
  - the two looks disagree by more than `max_disagreement_mm` (mean over the
    landmarks; the fine run's `localize.max_disagreement_mm`, 2.5 mm unless
    its preset says otherwise): there is no knee there (a chest, a hand);
  - a coarse stage trained with mirrored knees (`method_kwargs.mirror`) puts
    the lateral points on the medial side: the image shows the other knee
    than the manifest says (or a film stored mirrored);
  - the knee's tibial plateau (landmark 0 to 8) is implausibly narrow or
    wide for an adult knee (`plateau_mm`);
  - the fine stage moves the joint centre more than `max_move_mm` from
    where the coarse stage put it (the two stages do not see the same knee).

Heatmap spread is no test: trained on point distances, the soft-argmax maps
stay broad (tens of mm) on knees too; only their means are sharp.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koajax import cli
from koajax import config_lib
from koajax.data import preprocess
from koajax.data import schema
from koajax.data import views
from koajax.train import checkpoints as checkpoints_lib
from koajax.train import predictor as predictor_lib
from koajax.train import step as step_lib

STAGES = ('coarse', 'fine')
LATERAL = (0, 1, 2, 3, 9, 10, 11)
MEDIAL = (5, 6, 7, 8, 13, 14, 15)


@dataclasses.dataclass(frozen=True)
class Found:
  """A knee the localiser found.

  Attributes:
    landmarks: (16, 2) float64 (x, y) film pixels, `schema` order.
    coarse: (16, 2) the coarse stage's points, film pixels.
    disagreement_mm: mean distance between the fine stage's two looks.
    move_mm: how far the fine stage moved the joint centre from the coarse
      stage's.
  """
  landmarks: np.ndarray
  coarse: np.ndarray
  disagreement_mm: float
  move_mm: float


@dataclasses.dataclass(frozen=True)
class Refused:
  """A knee the localiser would not place; `kind` for counting."""
  reason: str
  kind: str = 'not_found'


def _forward(params, extra, input_norm, images, *, graphdef):
  """Points (B, K, 2) in view pixels."""
  model = nnx.merge(graphdef, params, extra, copy=True)
  x = step_lib.normalise(images)
  if input_norm is not None:
    x = (x - input_norm['mean']) / input_norm['std']
  return model(x, train=False)['landmarks'].astype(jnp.float32)


@dataclasses.dataclass
class Stage:
  """One trained stage: its network and the geometry of its views."""
  workdir: Path
  roi_mm: float  # the training cache's
  roi_px: int
  size: int  # the network's view
  crop: str  # 'side' or 'knee'
  mirror: float  # the share of mirrored knees it was trained with
  fn: Any
  member: predictor_lib.Member
  # Views per call, padded to it: one compiled program (the coarse stage
  # sees the two knees of a film, the fine stage each twice).
  batch: int = 2
  # The run's `localize` config: the Localizer's limits it sets (the fine
  # stage's max_disagreement_mm, which its precision decides).
  limits: dict[str, float] = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, workdir: Path, want: str, batch: int) -> Stage:
    try:
      config = config_lib.load_run_config(workdir)
    except FileNotFoundError as e:
      raise cli.BadInput(f'--localizer: {e}') from None
    crop = config.data.get('crop', 'knee')
    if config.get('task') != 'landmarks' or crop != want:
      raise cli.BadInput(
          f'--localizer: {workdir} is not the localiser\'s {want} stage '
          f"(task {config.get('task')!r}, data.crop {crop!r}); train it with "
          f'configs/localizer.py:{"coarse_quick" if want == "side" else "quick"}')
    devices = np.array(jax.devices()[:1])
    mesh = jax.sharding.Mesh(devices, ('data',))
    member = predictor_lib.load_member(workdir, config,
                                       checkpoints_lib.BEST, mesh)
    size = config.view_size or views.VIEW_PX[config.view]
    return cls(workdir=workdir, roi_mm=float(config.data.roi_mm),
               roi_px=int(config.data.roi_px), size=int(size), crop=crop,
               mirror=float(config.method_kwargs.get('mirror', 0.0)),
               fn=jax.jit(functools.partial(_forward,
                                            graphdef=member.graphdef)),
               member=member, batch=batch,
               limits={k: float(v) for k, v in
                       dict(config.get('localize', {})).items()})

  def __call__(self, rois: list[np.ndarray]) -> np.ndarray:
    """Points (n, K, 2) in the pixels of n <= `batch` ROIs (roi_px^2
    uint8)."""
    images = np.stack([views.whole_knee(r, self.size) for r in rois])
    n = len(images)
    padded = np.concatenate([images,
                             np.repeat(images[-1:], self.batch - n, 0)])
    points = jax.device_get(self.fn(
        self.member.params, self.member.extra, self.member.input_norm,
        padded))
    return views.rescale_keypoints(points[:n], self.size,
                                   self.roi_px).astype(np.float64)


@dataclasses.dataclass
class Localizer:
  """The two stages and the limits of what counts as a knee found."""
  coarse: Stage
  fine: Stage
  probe_mm: float = 10.0
  max_disagreement_mm: float = 2.5
  max_move_mm: float = 25.0
  plateau_mm: tuple[float, float] = (45.0, 120.0)

  @classmethod
  def load(cls, path: str | Path, **limits: Any) -> Localizer:
    root = Path(path).expanduser()
    missing = [s for s in STAGES if not (root / s).is_dir()]
    if missing:
      raise cli.BadInput(
          f'--localizer={path}: expected the runs {root}/coarse and '
          f'{root}/fine (configs/localizer.py), {" and ".join(missing)} '
          'missing')
    fine = Stage.load(root / 'fine', 'knee', batch=4)
    return cls(Stage.load(root / 'coarse', 'side', batch=2), fine,
               **{**fine.limits, **limits})

  def locate(self, image: np.ndarray, spacing: tuple[float, float],
             sides: list[str], *, bilateral: bool,
             background: float | None = None) -> list[Found | Refused]:
    """Each knee of `sides` (the patient's) on one film (bone bright)."""
    if background is None:
      background = preprocess.background_level(image)
    mm = np.array([spacing[1], spacing[0]])  # (x, y) per film pixel
    side_views, geometries = zip(*preprocess.extract_sides(
        image, spacing, sides, bilateral=bilateral,
        view_mm=self.coarse.roi_mm, view_px=self.coarse.roi_px,
        background=background))
    coarse = self.coarse(list(side_views))
    results: list[Found | Refused | None] = [None] * len(sides)
    rois, looks = [], []
    for i, side in enumerate(sides):
      points = geometries[i].to_image(coarse[i])
      try:
        geometry = preprocess.roi_geometry(
            points, spacing, side, roi_mm=self.fine.roi_mm,
            roi_px=self.fine.roi_px)
        # The second look: the ROI moved by the probe along the plateau.
        probe = geometry.matrix @ [self.probe_mm * self.fine.roi_px /
                                   self.fine.roi_mm, 0.0]
        rois += [roi for roi, _ in preprocess.extract_rois(
            image, spacing, [points, points + probe], side,
            roi_mm=self.fine.roi_mm, roi_px=self.fine.roi_px,
            background=background)]
      except ValueError as e:
        results[i] = Refused(f'the localiser finds no knee: {e}')
        continue
      looks.append((i, points, geometry,
                    preprocess.RoiGeometry(geometry.matrix,
                                           geometry.offset + probe,
                                           geometry.roi_px)))
    fine = self.fine(rois) if rois else []
    for n, (i, points, first, second) in enumerate(looks):
      a, b = first.to_image(fine[2 * n]), second.to_image(fine[2 * n + 1])
      results[i] = self._judge(sides[i], a, b, points, coarse[i], mm)
    return results

  def _judge(self, side: str, first: np.ndarray, second: np.ndarray,
             coarse: np.ndarray, coarse_view: np.ndarray,
             mm: np.ndarray) -> Found | Refused:
    """The knee from the fine stage's two looks (film pixels), or why not."""
    landmarks = (first + second) / 2
    disagreement = float(np.mean(np.linalg.norm((first - second) * mm,
                                                axis=1)))
    centre = schema.JOINT_CENTRE
    move = float(np.linalg.norm((landmarks[centre] - coarse[centre]) * mm))
    plateau = float(np.linalg.norm((landmarks[0] - landmarks[8]) * mm))
    where = f'on the {"right" if side == "R" else "left"} knee\'s side'
    if disagreement > self.max_disagreement_mm:
      return Refused(
          f'the localiser finds no knee {where} of this film (two looks '
          f'{self.probe_mm:g} mm apart disagree by {disagreement:.1f} mm, '
          f'over the {self.max_disagreement_mm:g} mm of a knee); check that '
          'it is a knee radiograph')
    if self.coarse.mirror and _mirrored(coarse_view):
      other = {'R': 'left', 'L': 'right'}[side]
      return Refused(
          f'the image shows a {other} knee where the manifest says {side}; '
          'correct the side in the manifest (or the film is stored '
          'mirrored)', 'laterality')
    low, high = self.plateau_mm
    if not low <= plateau <= high:
      return Refused(
          f'the localiser finds no knee {where}: a tibial plateau of '
          f'{plateau:.0f} mm is not a knee\'s ({low:g}-{high:g} mm)')
    if move > self.max_move_mm:
      return Refused(
          f'the localiser\'s two stages disagree {where} (joint centre '
          f'{move:.0f} mm apart); check that the film shows this knee')
    return Found(landmarks=landmarks, coarse=coarse,
                 disagreement_mm=disagreement, move_mm=move)


def _mirrored(points: np.ndarray) -> bool:
  """Whether the lateral points lie right of the medial ones in a view
  where, as the cache stores knees, lateral is on the left."""
  return float(np.mean(points[list(LATERAL), 0])) > float(
      np.mean(points[list(MEDIAL), 0]))


@functools.cache
def load(path: str) -> Localizer:
  """The localiser at `path`, loaded once per process (build workers)."""
  # Orbax warns about every read-only checkpoint folder it opens, and JAX
  # says which accelerators it did not find: noise in a build's log.
  logging.getLogger('absl').setLevel(logging.ERROR)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  return Localizer.load(path)
