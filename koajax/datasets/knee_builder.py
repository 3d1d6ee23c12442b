"""What the OAI and MOST TFDS builders share: features, configs, generation.

Both datasets need registration, so their builders are manual-download
builders over files the user prepares: a koajax manifest, a landmarks CSV and
the DICOM radiographs. Every knee is preprocessed by `koajax.data.build`
exactly as for a koajax cache, and stored with `tfds.features.Tensor` and
`Text` features so that building and reading need no TensorFlow:

  image       (roi_px, roi_px) uint8, the ROI (left knees mirrored)
  keypoints   (16, 2) float32, landmarks (x, y) in ROI pixels
  grades      (7,) int8 in `schema.GRADES` order, -1 = not graded
  kl          int8, the KL grade (-1 = not graded); the supervised label
  knee_id, subject_id, side, site   text (bytes when read back)
  visit       int32, months since baseline

There is one split, 'train', holding every knee: koajax makes its own
subject-grouped splits (`koajax.data.splits`), and a fixed split here would
only be one more to keep in step. Knees that cannot be built are logged and
left out; the build fails only when none can be built.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from koajax.data import schema

log = logging.getLogger(__name__)

MANIFEST = 'manifest.csv'
LANDMARKS = 'landmarks.csv'


@dataclasses.dataclass(eq=False)
class KneeConfig(tfds.core.BuilderConfig):
  """ROI geometry; knees are cropped to roi_mm and resampled to roi_px."""
  roi_mm: float = 140.0
  roi_px: int = 400


DEFAULT_CONFIGS = (
    KneeConfig(name='roi400', description='140 mm ROI at 400 px (default).'),
    KneeConfig(name='roi300', roi_px=300,
               description='140 mm ROI at 300 px (about half the bytes).'),
)


def manual_instructions(study: str, tables: str) -> str:
  """MANUAL_DOWNLOAD_INSTRUCTIONS for a study whose grades are in `tables`."""
  return textwrap.dedent(f"""\
      {study} cannot be downloaded automatically (it needs registration).
      Put these files in the manual folder (by default
      ~/tensorflow_datasets/downloads/manual/, or the folder you pass as
      `tfds.download.DownloadConfig(manual_dir=...)`):

        {MANIFEST}    the koajax manifest (koajax/data/schema.py), made from
                      the {study} grade tables ({tables}) with
                        python -m koajax.data.oai --grades=... \\
                            --images=images.csv --out=MANUAL/{MANIFEST}
        {LANDMARKS}   16 landmarks per knee in pixels of its radiograph
                      (columns subject_id, visit, side, x0, y0, ..., x15, y15)
        the radiographs: the DICOM files at the paths the manifest names,
                      relative to the manual folder (or absolute).

      Knees without landmarks, unreadable files and bad rows are logged and
      left out.
      """)


def features(roi_px: int) -> tfds.features.FeaturesDict:
  tensor = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      'image': tensor(shape=(roi_px, roi_px), dtype=np.uint8),
      'keypoints': tensor(shape=(schema.NUM_LANDMARKS, 2), dtype=np.float32),
      'grades': tensor(shape=(len(schema.GRADES),), dtype=np.int8),
      'kl': tensor(shape=(), dtype=np.int8),
      'knee_id': tfds.features.Text(),
      'subject_id': tfds.features.Text(),
      'side': tfds.features.Text(),
      'site': tfds.features.Text(),
      'visit': tensor(shape=(), dtype=np.int32),
  })


def example(knee: Any) -> dict[str, Any]:
  """A `cache.Knee` as a feature dict."""
  grades = np.asarray(knee.grades, np.int8)
  return {
      'image': np.asarray(knee.image, np.uint8),
      'keypoints': np.asarray(knee.keypoints, np.float32),
      'grades': grades,
      'kl': grades[schema.GRADES.index('kl')],
      'knee_id': knee.knee_id,
      'subject_id': knee.subject_id,
      'side': knee.side,
      'site': knee.site,
      'visit': np.int32(knee.visit),
  }


class KneeBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Manual-download builder of preprocessed knees; subclass per study.

  Subclasses set MANUAL_DOWNLOAD_INSTRUCTIONS and `_DESCRIPTION`/`_HOMEPAGE`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = list(DEFAULT_CONFIGS)
  DEFAULT_BUILDER_CONFIG_NAME = 'roi400'
  _DESCRIPTION = ''
  _HOMEPAGE = ''
  _CITATION = ''

  def __init__(self, *, workers: int | None = None,
               file_format: str | None = None, **kwargs):
    """Creates the builder.

    Args:
      workers: preprocessing processes (None = all cores, 1 = in-process).
      file_format: 'array_record' (random access, no TensorFlow) by default.
      **kwargs: `tfds.core.DatasetBuilder` arguments (data_dir, config, ...).
    """
    self._workers = workers
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self._DESCRIPTION,
        features=features(self.builder_config.roi_px),
        supervised_keys=('image', 'kl'),
        homepage=self._HOMEPAGE or None,
        citation=self._CITATION or None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager
                        ) -> dict[str, Any]:
    manual = Path(dl_manager.manual_dir)
    for name in (MANIFEST, LANDMARKS):
      if not (manual / name).is_file():
        raise FileNotFoundError(
            f'{manual / name} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return {'train': self._generate_examples(manual)}

  def _generate_examples(self, manual: Path):
    from koajax.data import build
    from koajax.data import manifest as manifest_lib
    config = self.builder_config
    df = manifest_lib.read_manifest(manual / MANIFEST)
    landmarks = manifest_lib.read_landmarks(manual / LANDMARKS)
    built, skipped = 0, collections.Counter()
    for item in build.iter_knees(df, landmarks, roi_mm=config.roi_mm,
                                 roi_px=config.roi_px, workers=self._workers,
                                 landmarks_name=LANDMARKS):
      if isinstance(item, build.Skipped):
        log.warning('%s', item)
        skipped[item.kind] += item.num_knees
        continue
      built += 1
      yield item.knee_id, example(item)
    log.info('%s: %d knees built, %d skipped %s', self.name, built,
             sum(skipped.values()), dict(skipped))
    if not built:
      raise ValueError(
          f'no knee of {manual / MANIFEST} could be built '
          f'(skipped: {dict(skipped)}); see the warnings above')
