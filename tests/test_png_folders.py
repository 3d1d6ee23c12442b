"""Tests for the <split>/<KL>/*.png reader and cache builder."""

import json
import numpy as np
import pytest
from PIL import Image

from koajax.data import cache as cache_lib
from koajax.data import png_folders
from koajax.data import schema


def _png(path, value=0, size=224, mode='L'):
  path.parent.mkdir(parents=True, exist_ok=True)
  a = np.full((size, size), value, np.uint8)
  a[:, : size // 4] = 255  # a bright left strip shows mirroring
  img = Image.fromarray(a)
  if mode != 'L':
    img = img.convert(mode)
  img.save(path)


@pytest.fixture
def root(tmp_path):
  r = tmp_path / 'kneeKL224'
  _png(r / 'train' / '0' / '9003175R.png', 10)
  _png(r / 'train' / '0' / '9003175L.png', 20)
  _png(r / 'train' / '2' / '9011111L.png', 30, mode='RGB')
  _png(r / 'train' / '3' / '9011111L_1.png', 40)  # same knee again
  _png(r / 'train' / '4' / '0007.png', 50, size=100)  # no side, other size
  (r / 'train' / '4' / 'broken.png').write_bytes(b'not a png')
  _png(r / 'train' / '5' / '9022222R.png')  # not a KL grade
  (r / 'train' / '1' / 'notes.txt').parent.mkdir(parents=True)
  (r / 'train' / '1' / 'notes.txt').write_text('ignored')
  _png(r / 'test' / '1' / '9003175R.png', 60)  # subject also in train
  return r


@pytest.mark.parametrize('stem, expected', [
    ('9003175R', ('9003175', 'R')), ('9003175l', ('9003175', 'L')),
    ('9003175', ('9003175', 'R')), ('9003175L_1', ('9003175', 'L')),
    ('9003175_1', ('9003175', 'R')), ('knee_a', ('knee_a', 'R')),
])
def test_parse_name(stem, expected):
  assert png_folders.parse_name(stem) == expected


def test_read_png_folders(root):
  skipped = []
  df = png_folders.read_png_folders(root, skipped=skipped)
  assert list(df.columns) == list(png_folders.COLUMNS)
  assert df[['split', 'kl', 'knee', 'subject_id', 'side']].values.tolist() == [
      ['test', 1, '9003175R', '9003175', 'R'],
      ['train', 0, '9003175L', '9003175', 'L'],
      ['train', 0, '9003175R', '9003175', 'R'],
      ['train', 2, '9011111L', '9011111', 'L'],
      ['train', 4, '0007', '0007', 'R'],
      ['train', 4, 'broken', 'broken', 'R'],
  ]
  reasons = {s['where'].split('kneeKL224/')[1]: s['reason'] for s in skipped}
  assert set(reasons) == {'train/5', 'train/3/9011111L_1.png'}
  assert 'not a KL grade' in reasons['train/5']
  assert 'same knee' in reasons['train/3/9011111L_1.png']


def test_build_png_cache(root, tmp_path):
  out = tmp_path / 'caches'
  summary = png_folders.build_png_cache(root, out, roi_px=64, workers=2)
  train = cache_lib.open_cache(out / 'train')
  test = cache_lib.open_cache(out / 'test')
  assert len(train) == 4 and len(test) == 1
  assert train.meta['roi_px'] == 64 and train.meta['roi_mm_nominal']
  index = train.index.set_index('knee_id')
  assert index.loc['9003175_v00_L', 'kl'] == 0
  assert index.loc['9011111_v00_L', 'kl'] == 2
  assert index.loc['0007_v00_R', 'kl'] == 4
  assert (train.index[list(schema.OARSI_GRADES)] == schema.UNGRADED).all().all()
  for i, knee_id in enumerate(train.index['knee_id']):
    record = train[i]
    assert record['image'].shape == (64, 64)
    assert record['image'].dtype == np.uint8
    assert np.isnan(record['keypoints']).all()
    image = record['image']
    bright_on_left = image[:, :8].mean() > image[:, -8:].mean()
    # Left knees are mirrored: the bright strip moves to the right.
    assert bright_on_left == knee_id.endswith('_R'), knee_id
  split = summary['splits']['train']
  assert split['knees'] == 4 and split['kl_counts'] == {0: 2, 1: 0, 2: 1,
                                                         3: 0, 4: 1}
  reasons = sorted(s['reason'].split(':')[0] for s in split['skipped'])
  assert reasons == ['folder name is not a KL grade 0-4 (1 images)',
                     'same knee as ' + str(root / 'train/2/9011111L.png') +
                     ' (9011111_v00_L)', 'unreadable image']
  assert summary['subjects_in_several_splits'] == 1
  on_disk = json.loads((out / 'summary.json').read_text())
  assert on_disk['splits']['test']['knees'] == 1
  assert len(on_disk['skipped']) == 3


def test_cli(root, tmp_path, capsys):
  out = tmp_path / 'cli'
  assert png_folders.main([f'--root={root}', f'--out={out}', '--roi_px=32',
                           '--splits=test', '--no_flip_left']) == 0
  assert 'test: 1 knees' in capsys.readouterr().out
  assert cache_lib.open_cache(out / 'test').meta['roi_px'] == 32
  assert not (out / 'train').exists()
