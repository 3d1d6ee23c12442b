"""Grading new radiographs with trained koajax runs: every head, per knee.

    grader = Grader.load(['RUN_A', 'RUN_B'], localizer='LOCALIZER')
    sources, skipped = inputs.find_inputs(['films/', 'knee.png'])
    knees, more_skipped = grader.knees(sources[0])   # read, localise, cut
    results = grader.grade(knees)                    # list of KneeResult

A source is a DICOM radiograph (bilateral: both knees; otherwise the one
knee its laterality, or the manifest row, names), a row group of a manifest
(the knees it lists, with their ids and, given a landmarks file, their
landmarks), or a pre-cropped knee PNG. Each knee is cut as the first run's
training cache cut it (`preprocess.extract_roi` at its roi_mm / roi_px) from
its landmarks: the landmarks file's, else the localiser's (`--localizer`, or
the run's `data.localizer`). A PNG is the knee's ROI already, resized to
roi_px as `koajax.data.png_folders` does; its side comes from its name
('9003175L.png': left), right when the name does not say.

Per knee a result holds every head's class probabilities (the runs'
`koajax.train.predictor.Predictor`, ensemble mean), one uncertainty per
head, the landmarks used and a Grad-CAM heatmap over the ROI. The
uncertainty is the mutual information between the predictions (BALD) of the
ensemble's members when there are several, else of `mc_samples` MC-dropout
passes when the model has dropout, else the entropy of the prediction;
`uncertainty_kind` says which. The heatmap explains the first head's
predicted class (`koajax.evaluation.gradcam`), averaged over the members.

Nothing is read from a DICOM header but the pixel data, the spacing and the
laterality (`koajax.data.dicom_io.read_film`); a knee is named by the input
file's name and its side, or by its manifest row.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from koajax import cli
from koajax import config_lib
from koajax import tasks as tasks_lib
from koajax.active import uncertainty
from koajax.data import dicom_io
from koajax.data import inputs as inputs_lib
from koajax.data import png_folders
from koajax.data import preprocess
from koajax.data import schema
from koajax.data import views
from koajax.evaluation import gradcam
from koajax.train import checkpoints as checkpoints_lib
from koajax.train import predictor as predictor_lib

UNCERTAINTY_KINDS = {
    'ensemble_bald': 'mutual information between the ensemble members\' '
                     'predictions (BALD over the members)',
    'mc_dropout_bald': 'mutual information between MC-dropout passes (BALD)',
    'entropy': 'entropy of the prediction (one model without dropout)',
}


@dataclasses.dataclass
class Knee:
  """A knee ready to grade: its ROI as the runs' cache would hold it."""
  input: str
  knee: str
  side: str
  roi: np.ndarray  # (roi_px, roi_px) uint8, left knees mirrored
  keypoints: np.ndarray  # (16, 2) ROI pixels (NaN for a PNG)
  landmarks_from: str  # 'file', 'localizer' or 'png'
  landmarks: np.ndarray | None = None  # (16, 2) film pixels
  spacing: tuple[float, float] | None = None
  disagreement_mm: float | None = None  # the localiser's two looks


@dataclasses.dataclass
class KneeResult:
  """A graded knee."""
  knee: Knee
  probs: dict[str, np.ndarray]  # {head: (classes,)}
  uncertainty: dict[str, float]  # {head: value}
  heatmap: np.ndarray  # (roi_px, roi_px) in [0, 1] over `knee.roi`
  gradcam_class: int


def _class_grades(head: tasks_lib.Head) -> list[int]:
  """The grade each class of `head` stands for (KL-0 vs KL-2: [0, 2])."""
  if head.label_map is None:
    return list(range(head.num_classes))
  grades = dict((label, grade) for grade, label in head.label_map)
  return [grades[k] for k in range(head.num_classes)]


class Grader:
  """One trained run, or an ensemble, with what it needs to cut knees."""

  def __init__(self, predictor: predictor_lib.Predictor, config,
               runs: Sequence[str], *, localizer=None,
               mc_samples: int = 20, seed: int = 0):
    self.predictor = predictor
    self.config = config
    self.task = predictor.task
    if not self.task.heads:
      raise cli.BadInput(f'--runs: {runs[0]} is a landmark model (task '
                         f'{self.task.name!r}); give a grading run')
    self.runs = [str(r) for r in runs]
    self.localizer = localizer
    self.roi_mm = float(config.data.roi_mm)
    self.roi_px = int(config.data.roi_px)
    self.view = views.get_view(self.task.view, self.task.view_size)
    self.crop = int(config.get('predict', {}).get('crop', 0))
    self.batch_size = predictor.batch_size
    first = predictor.members[0]
    if len(predictor.members) > 1:
      self.uncertainty_kind = 'ensemble_bald'
    elif mc_samples > 0 and predictor_lib.has_dropout(
        nnx.merge(first.graphdef, first.params, first.extra)):
      self.uncertainty_kind = 'mc_dropout_bald'
    else:
      self.uncertainty_kind = 'entropy'
    self.mc_samples = mc_samples
    # Raw uint32 keys: they are padded and sharded like the images.
    self._key = jax.random.PRNGKey(seed)
    self.gradcam_head = self.task.heads[0]

  @classmethod
  def load(cls, runs: Sequence[str | Path], *,
           checkpoint: str = checkpoints_lib.BEST,
           localizer: str | Path | None = None, batch_size: int = 8,
           mc_samples: int = 20) -> Grader:
    """The runs' `checkpoint`, read-only, on one device; the localiser
    given, else the first run's `data.localizer` (none: knees need a
    landmarks file or come as PNGs)."""
    runs = [str(Path(r).expanduser()) for r in runs]
    if not runs:
      raise cli.BadInput('--runs: give at least one training run folder')
    configs = []
    for run in runs:
      try:
        configs.append(config_lib.load_run_config(run))
      except FileNotFoundError as e:
        raise cli.BadInput(f'--runs: {e}') from None
    first = configs[0]
    names = [tasks_lib.from_config(c).head_names for c in configs]
    for run, heads in zip(runs[1:], names[1:]):
      if heads != names[0]:
        raise cli.BadInput(
            f'--runs: {run} predicts {", ".join(heads) or "landmarks"}, '
            f'{runs[0]} {", ".join(names[0]) or "landmarks"}: an ensemble '
            'needs runs with the same heads')
    for run, c in zip(runs[1:], configs[1:]):
      if (float(c.data.roi_mm), int(c.data.roi_px)) != (
          float(first.data.roi_mm), int(first.data.roi_px)):
        raise cli.BadInput(f'--runs: {run} was trained on other ROIs than '
                           f'{runs[0]} (data.roi_mm / roi_px)')
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
    try:
      predictor = predictor_lib.Predictor.from_runs(
          runs, checkpoint=checkpoint, mesh=mesh, batch_size=batch_size)
    except (KeyError, ValueError, FileNotFoundError) as e:
      if isinstance(e, cli.BadInput):
        raise
      raise cli.BadInput(f'--runs: {cli.message(e)}') from None
    where = localizer or first.data.get('localizer', '')
    found = None
    if where:
      from koajax import localize  # pylint: disable=g-import-not-at-top
      found = localize.load(str(Path(where).expanduser()))
    return cls(predictor, first, runs, localizer=found,
               mc_samples=mc_samples)

  # -- what the service's GET /model says ------------------------------------
  def info(self) -> dict[str, Any]:
    plans = []
    for run in self.runs:
      path = Path(run) / 'plan.json'
      plans.append(json.loads(path.read_text()) if path.is_file() else {})
    return {
        # plan.json's `config`: the file and preset a run was trained with.
        'runs': [{'run': run, 'preset': plan.get('config'),
                  'method': self.config.get('method'),
                  'model': self.config.model.get('name'),
                  'step': member.step}
                 for run, plan, member in zip(self.runs, plans,
                                              self.predictor.members)],
        'task': self.task.name,
        'heads': [{'name': h.name, 'classes': _class_grades(h)}
                  for h in self.task.heads],
        'view': self.task.view,
        'roi': {'mm': self.roi_mm, 'px': self.roi_px},
        'uncertainty': {'kind': self.uncertainty_kind,
                        'meaning': UNCERTAINTY_KINDS[self.uncertainty_kind],
                        **({'samples': self.mc_samples}
                           if self.uncertainty_kind == 'mc_dropout_bald'
                           else {})},
        'gradcam': {'head': self.gradcam_head.name,
                    'class': 'the predicted class'},
        'localizer': (str(self.localizer.fine.workdir.parent)
                      if self.localizer else None),
        'koajax': importlib.metadata.version('koajax'),
    }

  # -- reading and cutting ---------------------------------------------------
  def knees(self, source: inputs_lib.Source
            ) -> tuple[list[Knee], list[inputs_lib.Skipped]]:
    """The source's knees, cut, and the knees (or the file) that could not
    be."""
    if source.kind == 'png':
      return self._png_knee(source)
    try:
      image, spacing, laterality = dicom_io.read_film(source.path)
    except dicom_io.InputError as e:
      return [], [inputs_lib.Skipped(source.shown, e.reason, e.kind)]
    sides = list(source.knees)
    bilateral = (len(sides) > 1 or laterality == 'B' or
                 preprocess.is_bilateral(image.shape, spacing))
    if not sides:
      if bilateral:
        sides = ['R', 'L']
      elif laterality in ('R', 'L'):
        sides = [laterality]
      else:
        return [], [inputs_lib.Skipped(
            source.shown, 'a single-knee film whose header gives no '
            'laterality (ImageLaterality or Laterality): list it in a '
            'manifest with its side', 'no_laterality')]
    names = {s: source.knees.get(s) or
             inputs_lib.knee_name(source.shown, s)
             for s in sides}
    background = preprocess.background_level(image)
    found = self._landmarks(source, image, spacing, sides, bilateral,
                            background)
    knees, skipped = [], []
    for side in sides:
      where = found[side]
      if isinstance(where, str):
        skipped.append(inputs_lib.Skipped(source.shown, where, 'not_found',
                                          names[side]))
        continue
      landmarks, origin, disagreement = where
      try:
        roi, keypoints = preprocess.extract_roi(
            image, spacing, landmarks, side, roi_mm=self.roi_mm,
            roi_px=self.roi_px, background=background)
      except ValueError as e:
        skipped.append(inputs_lib.Skipped(source.shown, str(e),
                                          'preprocessing',
                               names[side]))
        continue
      knees.append(Knee(source.shown, names[side], side, roi, keypoints,
                        origin, landmarks, spacing, disagreement))
    return knees, skipped

  def _landmarks(self, source: inputs_lib.Source, image, spacing, sides,
                 bilateral, background) -> dict[str, tuple | str]:
    """{side: (landmarks, where from, disagreement mm) or why none}."""
    out: dict[str, tuple | str] = {
        s: (source.landmarks[s], 'file', None)
        for s in sides if s in source.landmarks}
    wanted = [s for s in sides if s not in out]
    if wanted and self.localizer is None:
      for s in wanted:
        out[s] = ('no landmarks for this knee and no localiser: give '
                  '--localizer=DIR (configs/localizer.py) or a landmarks '
                  'file with a manifest')
    elif wanted:
      from koajax import localize  # pylint: disable=g-import-not-at-top
      try:
        results = self.localizer.locate(image, spacing, wanted,
                                        bilateral=bilateral,
                                        background=background)
      except Exception as e:  # pylint: disable=broad-except
        # One odd film costs its knees, not the other inputs.
        results = [localize.Refused(
            f'unexpected error localising: {type(e).__name__}: {e}')
                   ] * len(wanted)
      for s, result in zip(wanted, results):
        out[s] = ((result.landmarks, 'localizer', result.disagreement_mm)
                  if isinstance(result, localize.Found) else result.reason)
    return out

  def _png_knee(self, source: inputs_lib.Source
                ) -> tuple[list[Knee], list[inputs_lib.Skipped]]:
    side = (next(iter(source.knees)) if source.knees
            else png_folders.parse_name(source.path.stem)[1])
    name = (source.knees.get(side) or
            inputs_lib.knee_name(source.shown, side))
    if self.task.view in views.KEYPOINT_VIEWS:
      return [], [inputs_lib.Skipped(
          source.shown, f'the runs\' {self.task.view!r} view needs the '
          'knee\'s landmarks, which a PNG does not have: give the DICOM',
          'needs_landmarks', name)]
    try:
      roi = inputs_lib.read_knee_png(source.path, self.roi_px,
                                     flip=side == 'L')
    except ValueError as e:
      return [], [inputs_lib.Skipped(source.shown, str(e), 'bad_png', name)]
    nan = np.full((schema.NUM_LANDMARKS, 2), np.nan, np.float32)
    return [Knee(source.shown, name, side, roi, nan, 'png')], []

  # -- grading ---------------------------------------------------------------
  def grade(self, knees: Sequence[Knee]) -> list[KneeResult]:
    """Every head, the uncertainty and the heatmap of each knee, in
    batches of the predictor's batch size (one compiled program)."""
    results = []
    for start in range(0, len(knees), self.batch_size):
      results += self._grade_batch(knees[start:start + self.batch_size])
    return results

  def _grade_batch(self, knees: Sequence[Knee]) -> list[KneeResult]:
    made = [self.view({'image': k.roi, 'keypoints': k.keypoints},
                      self.roi_mm) for k in knees]
    images = np.stack([m['image'] for m in made])
    keypoints = (np.stack([m['keypoints'] for m in made])
                 if 'keypoints' in made[0] else None)
    members = self.predictor.member_outputs(images, keypoints)
    probs = self._combine(members)
    heads = self.task.head_names
    if self.uncertainty_kind == 'ensemble_bald':
      spread = {h: uncertainty.scores(np.stack([m[h] for m in members])
                                      )['bald'] for h in heads}
    elif self.uncertainty_kind == 'mc_dropout_bald':
      # A knee's dropout key comes from its view's pixels: the same knee
      # gets the same samples in any batch, by command line or service.
      keys = np.asarray(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
          self._key, np.array([zlib.crc32(m['image'].tobytes())
                               for m in made], np.uint32)))
      samples = self.predictor.dropout_samples(
          images, keypoints, keys, num_samples=self.mc_samples)
      spread = {h: uncertainty.scores(samples[h])['bald'] for h in heads}
    else:
      spread = {h: uncertainty.scores(probs[h][None])['entropy']
                for h in heads}
    head = self.gradcam_head.name
    target = np.argmax(probs[head], axis=1)
    heat = self._heatmaps(images, keypoints, target)
    return [KneeResult(knee, {h: probs[h][i] for h in heads},
                       {h: float(spread[h][i]) for h in heads}, heat[i],
                       int(target[i]))
            for i, knee in enumerate(knees)]

  def _combine(self, members: list[dict[str, np.ndarray]]
               ) -> dict[str, np.ndarray]:
    """The ensemble's probabilities (`Predictor.predict_images`)."""
    heads = self.task.head_names
    mean = {h: np.mean([m[h] for m in members], axis=0) for h in heads}
    if self.predictor.ensemble == 'logits':
      return {h: np.asarray(jax.nn.softmax(z)) for h, z in mean.items()}
    return mean

  def _heatmaps(self, images: np.ndarray, keypoints: np.ndarray | None,
                target: np.ndarray) -> np.ndarray:
    """(n, roi_px, roi_px) Grad-CAM of `target` classes, the members' mean,
    each knee's map divided by its maximum."""
    n = len(images)
    pad = self.batch_size - n  # one compiled program for any batch

    def padded(a):
      return None if a is None else np.concatenate(
          [a, np.repeat(a[-1:], pad, 0)])

    maps = []
    for member in self.predictor.members:
      out = gradcam.explain(
          member, padded(images), head=self.gradcam_head.name,
          view=self.task.view, view_size=self.task.view_size,
          roi_px=self.roi_px, roi_mm=self.roi_mm, crop=self.crop,
          target=padded(target), keypoints=padded(keypoints))
      maps.append(np.asarray(jax.device_get(out['roi']))[:n])
    heat = np.mean(maps, axis=0)
    top = heat.reshape(n, -1).max(axis=1)
    return np.where(top[:, None, None] > 0,
                    heat / np.maximum(top, 1e-12)[:, None, None], 0.0
                    ).astype(np.float32)

  # -- what a result says ----------------------------------------------------
  def record(self, result: KneeResult) -> dict[str, Any]:
    """A result as JSON-ready values (the command line's predictions.json
    and the service's answer)."""
    knee = result.knee
    heads = {}
    for head in self.task.heads:
      p = result.probs[head.name]
      grades = _class_grades(head)
      heads[head.name] = {
          'grade': grades[int(np.argmax(p))],
          'probabilities': [round(float(v), 6) for v in p],
          'classes': grades,
          'uncertainty': round(result.uncertainty[head.name], 6)}
    where = {'from': knee.landmarks_from}
    if knee.landmarks is not None:
      where.update(
          landmarks=np.round(knee.landmarks, 2).tolist(),
          joint_centre=np.round(knee.landmarks[schema.JOINT_CENTRE],
                                2).tolist(),
          spacing_mm=list(knee.spacing))
    if knee.disagreement_mm is not None:
      where['disagreement_mm'] = round(knee.disagreement_mm, 3)
    classes = _class_grades(self.gradcam_head)
    return {'input': knee.input, 'knee': knee.knee, 'side': knee.side,
            'heads': heads, 'uncertainty_kind': self.uncertainty_kind,
            'localisation': where,
            'gradcam': {'head': self.gradcam_head.name,
                        'grade': classes[result.gradcam_class]}}

  def overlay(self, result: KneeResult) -> np.ndarray:
    """(roi_px, roi_px, 3) uint8: the knee as acquired (left knees
    un-mirrored) under its heatmap."""
    side = result.knee.side
    return gradcam.overlay_rgb(gradcam.as_acquired(result.knee.roi, side),
                       gradcam.as_acquired(result.heatmap, side))
