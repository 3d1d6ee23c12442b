"""The OAI and MOST TFDS builders, built and read back without TensorFlow."""

import logging

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from koajax.data import build
from koajax.data import manifest as manifest_lib
from koajax.data import schema
from koajax.data import synthetic
from koajax.datasets import knee_builder
from koajax.datasets.most import most_dataset_builder
from koajax.datasets.oai import oai_dataset_builder

ROI_PX = 64
CONFIG = knee_builder.KneeConfig(name='test64', roi_px=ROI_PX)


@pytest.fixture(scope='module')
def manual(tmp_path_factory):
  """A tiny synthetic study laid out as the manual folder expects."""
  root = tmp_path_factory.mktemp('manual')
  synthetic.generate(root, num_subjects=2, seed=0, workers=1)
  return root


@pytest.fixture(scope='module')
def expected(manual):
  """What koajax's own build makes of the same files, by knee id."""
  df = manifest_lib.read_manifest(manual / knee_builder.MANIFEST)
  points = manifest_lib.read_landmarks(manual / knee_builder.LANDMARKS)
  return {k.knee_id: k for k in build.iter_knees(
      df, points, roi_px=ROI_PX, workers=1) if not isinstance(k, build.Skipped)}


def _prepare(builder_cls, manual_dir, data_dir):
  builder = builder_cls(data_dir=data_dir, config=CONFIG, workers=1)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def test_registered_with_instructions():
  assert tfds.builder_cls('oai') is oai_dataset_builder.Builder
  assert tfds.builder_cls('most') is most_dataset_builder.Builder
  for cls in (oai_dataset_builder.Builder, most_dataset_builder.Builder):
    text = cls.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert 'manifest.csv' in text and 'landmarks.csv' in text
    assert 'python -m koajax.data.oai' in text
    assert cls.BUILDER_CONFIGS[0].name == cls.DEFAULT_BUILDER_CONFIG_NAME


def test_oai_builder_matches_the_koajax_build(manual, expected, tmp_path):
  builder = _prepare(oai_dataset_builder.Builder, manual, tmp_path)
  assert builder.info.file_format.value == 'array_record'
  assert list(builder.info.splits) == ['train']
  train = builder.as_data_source()['train']
  assert len(train) == len(expected) > 0
  for i in range(len(train)):
    ex = train[i]
    knee = expected[ex['knee_id'].decode()]
    assert ex['image'].shape == (ROI_PX, ROI_PX)
    assert ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['image'], knee.image)
    assert ex['keypoints'].shape == (schema.NUM_LANDMARKS, 2)
    np.testing.assert_allclose(ex['keypoints'], knee.keypoints)
    np.testing.assert_array_equal(ex['grades'], knee.grades)
    assert ex['kl'] == knee.grades[0]
    assert ex['subject_id'].decode() == knee.subject_id
    assert ex['side'].decode() == knee.side
    assert ex['site'].decode() == knee.site
    assert ex['visit'] == knee.visit


def test_most_builder_logs_and_skips_bad_knees(manual, expected, tmp_path,
                                               caplog):
  # A copy of the study with one knee's landmarks removed.
  copy = tmp_path / 'manual'
  copy.mkdir()
  df = pd.read_csv(manual / knee_builder.MANIFEST, dtype=str,
                   keep_default_na=False)
  df['path'] = [str(manual / p) for p in df['path']]
  df.to_csv(copy / knee_builder.MANIFEST, index=False)
  points = pd.read_csv(manual / knee_builder.LANDMARKS, dtype=str)
  points.iloc[1:].to_csv(copy / knee_builder.LANDMARKS, index=False)
  lost = schema.knee_id(points.subject_id[0], int(points.visit[0]),
                        points.side[0])

  with caplog.at_level(logging.WARNING):
    builder = _prepare(most_dataset_builder.Builder, copy, tmp_path / 'data')
  assert 'no landmarks' in caplog.text
  train = builder.as_data_source()['train']
  ids = {train[i]['knee_id'].decode() for i in range(len(train))}
  assert ids == set(expected) - {lost}


def test_missing_manual_files_say_what_to_do(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  (manual_dir / 'README').write_text('the grade tables are elsewhere')
  builder = oai_dataset_builder.Builder(data_dir=tmp_path, config=CONFIG)
  with pytest.raises(FileNotFoundError, match='manifest.csv not found'):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
