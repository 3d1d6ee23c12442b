"""The localiser's chain from film to landmarks and back (`koajax.localize`),
with stand-in stages whose answers are known, and the build that uses it.

A stand-in stage finds the bright disc that marks a joint centre on the test
films in whatever view it is given and answers the phantom's right-knee
landmarks around it, so where each point lands on the film follows by hand;
without a disc it answers from its view's centre, as a network that sees no
knee. The trained networks run in test_localizer_run.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from koajax import cli
from koajax import localize
from koajax.data import build
from koajax.data import cache as cache_lib
from koajax.data import preprocess

import test_build as films
import test_preprocess as phantom


@dataclasses.dataclass
class Standin:
  """A stage: the phantom's right-knee landmarks, `scale` times their size,
  `mirrored` left-right, around the brightest (clipped) part of each view,
  moved by `shift_mm`."""
  roi_mm: float
  roi_px: int
  size: int = 32
  mirror: float = 0.0  # as trained (the laterality check)
  scale: float = 1.0
  mirrored: bool = False
  shift_mm: tuple[float, float] = (0.0, 0.0)
  seen: list = dataclasses.field(default_factory=list)

  def __call__(self, rois):
    self.seen.extend(rois)
    frame = phantom.RIGHT_FRAME_LANDMARKS * self.scale * [
        -1.0 if self.mirrored else 1.0, 1.0] + self.shift_mm
    out = []
    for roi in rois:
      rows, cols = np.nonzero(roi == 255)
      out.append(np.array([cols.mean(), rows.mean()]) +
                 frame * self.roi_px / self.roi_mm)
    return np.stack(out)


def _localizer(coarse=None, fine=None, **limits) -> localize.Localizer:
  return localize.Localizer(Standin(256.0, 128, **(coarse or {})),
                            Standin(140.0, 64, **(fine or {})), **limits)


SPACING = (0.5, 0.5)
DISCS = {'R': (60.0, 50.0), 'L': (180.0, 50.0)}  # joint centres, (x, y) mm


def _film(discs=DISCS) -> np.ndarray:
  """100 x 240 mm (bilateral) at 0.5 mm: a faint ramp down the rows and a
  bright 30 mm disc on each joint centre."""
  rows, cols = np.mgrid[0:200, 0:480] * 0.5
  film = rows.astype(np.float32)  # 0..100
  for x, y in discs.values():
    film[np.hypot(cols - x, rows - y) < 30.0] = 1000.0
  return film


@pytest.mark.parametrize('side', ['R', 'L'])
def test_landmarks_land_where_the_views_put_them(side):
  [found] = _localizer().locate(_film(), SPACING, [side], bilateral=True)
  assert isinstance(found, localize.Found), found
  # By hand: the landmarks are the disc's centre plus the knee-frame
  # offsets in mm over 0.5 mm, mirrored for a left knee.
  mirror = np.array([1.0 if side == 'R' else -1.0, 1.0])
  want = (np.array(DISCS[side]) + phantom.RIGHT_FRAME_LANDMARKS * mirror) / 0.5
  np.testing.assert_allclose(found.landmarks, want, atol=0.3)
  np.testing.assert_allclose(found.coarse, want, atol=0.6)
  assert found.disagreement_mm < 0.2 and found.move_mm < 0.3


def test_each_stage_sees_its_views_at_its_size():
  loc = _localizer()
  film = _film()
  results = loc.locate(film, SPACING, ['R', 'L'], bilateral=True)
  assert all(isinstance(r, localize.Found) for r in results)
  assert [r.shape for r in loc.coarse.seen] == [(128, 128)] * 2
  # Two looks per knee: the ROI as the cache cuts it from the coarse
  # points, and that ROI moved by the probe.
  assert [r.shape for r in loc.fine.seen] == [(64, 64)] * 4
  roi, _ = preprocess.extract_roi(film, SPACING, results[0].coarse, 'R',
                                  roi_mm=140.0, roi_px=64)
  np.testing.assert_array_equal(loc.fine.seen[0], roi)
  cols = np.nonzero(loc.fine.seen[1] == 255)[1].mean() - np.nonzero(
      loc.fine.seen[0] == 255)[1].mean()
  assert cols == pytest.approx(-10.0 * 64 / 140, abs=0.2)  # 10 mm along x


def test_a_knee_of_the_other_side_is_refused_when_the_coarse_stage_knows():
  [refused] = _localizer({'mirror': 0.5, 'mirrored': True}).locate(
      _film(), SPACING, ['R'], bilateral=True)
  assert refused.kind == 'laterality'
  assert 'shows a left knee where the manifest says R' in refused.reason
  # A stage trained without mirrored knees cannot tell: no check.
  [found] = _localizer({'mirrored': True}).locate(_film(), SPACING, ['R'],
                                                  bilateral=True)
  assert isinstance(found, localize.Found)


@pytest.mark.parametrize('film, fine, limits, says', [
    # No disc: the stand-in answers from its view, the two looks 10 mm apart.
    ({}, {}, {}, 'two looks 10 mm apart disagree by'),
    (DISCS, {'scale': 2.0}, {}, 'a tibial plateau of 152 mm'),
    (DISCS, {'shift_mm': (0.0, 10.0)}, {'max_move_mm': 5.0},
     'joint centre 10 mm apart'),
])
def test_what_is_not_a_knee_is_refused_with_the_reason(film, fine, limits,
                                                        says):
  [refused] = _localizer(fine=fine, **limits).locate(
      _film(film), SPACING, ['L'], bilateral=True)
  assert isinstance(refused, localize.Refused), refused
  assert refused.kind == 'not_found' and says in refused.reason
  assert "left knee's side" in refused.reason
  if not film:
    assert 'over the 2.5 mm of a knee' in refused.reason


def test_a_folder_that_is_not_a_localiser_is_one_line(tmp_path):
  with pytest.raises(cli.BadInput, match='expected the runs .*coarse and '
                     '.*fine .*coarse and fine missing'):
    localize.Localizer.load(tmp_path)
  for stage in ('coarse', 'fine'):
    (tmp_path / stage).mkdir()
  with pytest.raises(cli.BadInput, match='not a koajax training workdir'):
    localize.Localizer.load(tmp_path)


@pytest.fixture
def standin(monkeypatch):
  """Builds find `_localizer()` behind any --localizer path."""
  loc = _localizer()
  monkeypatch.setattr(localize, 'load', lambda path: loc)
  return loc


def _manifest(folder: Path, with_landmarks: set[str]) -> Path:
  """Two bilateral phantom films; landmarks only for the named knees."""
  rows, marks = [], []
  for subject in ('S01', 'S02'):
    points = films._film(folder / f'{subject}.dcm')
    for side in ('R', 'L'):
      rows.append(films._row(subject, side, f'{subject}.dcm'))
      if f'{subject}_{side}' in with_landmarks:
        marks.append(films._landmark_row(subject, side, points[side]))
  return films._write(folder, rows, marks)


def test_the_build_localises_knees_without_landmarks(tmp_path, standin):
  manifest = _manifest(tmp_path, {'S01_R', 'S01_L'})
  summary = build.build_cache(manifest, tmp_path / 'cache', workers=1,
                              localizer='LOC', **films.ROI)
  c = cache_lib.open_cache(tmp_path / 'cache')
  assert c.index['knee_id'].tolist() == [
      'S01_v00_R', 'S01_v00_L', 'S02_v00_R', 'S02_v00_L']
  assert c.index['landmarks_from'].tolist() == ['file', 'file', 'localizer',
                                                'localizer']
  assert summary['knees_localised'] == 2 and summary['localizer'] == 'LOC'
  assert summary['knees_skipped'] == 0
  # Knees with their landmarks are built as without a localiser.
  build.build_cache(manifest, tmp_path / 'plain', workers=1, **films.ROI)
  p = cache_lib.open_cache(tmp_path / 'plain')
  assert 'landmarks_from' not in p.index.columns and len(p) == 2
  for i in range(2):
    np.testing.assert_array_equal(c[i]['image'], p[i]['image'])
  # A localised knee is cut where the stand-in put its joint centre, the
  # middle of its half of the film, so its keypoints are the stand-in's.
  want = (films.ROI['roi_px'] - 1) / 2 + (
      phantom.RIGHT_FRAME_LANDMARKS * films.ROI['roi_px'] /
      films.ROI['roi_mm'])
  for i in (2, 3):
    np.testing.assert_allclose(c[i]['keypoints'], want, atol=1e-3)


def test_the_build_without_any_landmarks_file_localises_every_knee(
    tmp_path, standin):
  manifest = _manifest(tmp_path, set())
  (tmp_path / 'landmarks.csv').unlink()
  summary = build.build_cache(manifest, tmp_path / 'cache', workers=1,
                              localizer='LOC', **films.ROI)
  assert summary['knees_localised'] == 4
  # Without a localiser the missing file is still an error.
  with pytest.raises(cli.BadInput, match='landmarks'):
    build.build_cache(manifest, tmp_path / 'other', workers=1, **films.ROI)


def test_build_workers_do_not_take_the_whole_gpu(tmp_path, monkeypatch):
  # Each build worker loads the localiser; JAX must not preallocate most
  # of a GPU's memory in each (the workers inherit the environment).
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE', raising=False)
  seen = []

  def load(path):
    seen.append(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'))
    return _localizer()

  monkeypatch.setattr(localize, 'load', load)
  manifest = _manifest(tmp_path, set())
  (tmp_path / 'landmarks.csv').unlink()
  build.build_cache(manifest, tmp_path / 'cache', workers=1, localizer='LOC',
                    **films.ROI)
  assert seen and set(seen) == {'false'}


def test_refused_knees_are_skipped_and_the_rest_built(tmp_path, monkeypatch):
  # Every knee looks like the other side.
  loc = _localizer({'mirror': 0.5, 'mirrored': True})
  monkeypatch.setattr(localize, 'load', lambda path: loc)
  manifest = _manifest(tmp_path, {'S01_R', 'S01_L', 'S02_R'})
  summary = build.build_cache(manifest, tmp_path / 'cache', workers=1,
                              localizer='LOC', **films.ROI)
  assert summary['knees_built'] == 3
  assert summary['skipped_by_reason'] == {'laterality': 1}
  [skip] = summary['skipped']
  assert skip['where'].startswith('manifest row 5 (S02, 0, L)')
  assert 'shows a right knee where the manifest says L' in skip['reason']
  assert 'S02.dcm' in skip['reason']


def test_side_crop_builds_the_coarse_views(tmp_path):
  manifest = _manifest(tmp_path, {'S01_R', 'S01_L', 'S02_R', 'S02_L'})
  build.build_cache(manifest, tmp_path / 'side', workers=1, crop='side',
                    roi_mm=256.0, roi_px=64)
  c = cache_lib.open_cache(tmp_path / 'side')
  assert c.meta['crop'] == 'side' and len(c) == 4
  points = pd.read_csv(tmp_path / 'landmarks.csv')
  film_shape = films.SHAPE
  for i, row in enumerate(points.itertuples(index=False)):
    truth = np.array([[getattr(row, f'x{k}'), getattr(row, f'y{k}')]
                      for k in range(16)])
    g = preprocess.side_geometry(film_shape, films.SPACING, row.side,
                                 bilateral=True, view_mm=256.0, view_px=64)
    np.testing.assert_allclose(c[i]['keypoints'], g.to_roi(truth),
                               rtol=1e-5, atol=1e-4)
  with pytest.raises(cli.BadInput, match='--crop=middle'):
    build.build_cache(manifest, tmp_path / 'x', crop='middle')


def test_a_config_with_a_localizer_builds_its_own_cache(tmp_path, standin):
  """data.localizer (what `koajax.active.sweep --localizer` sets): the
  manifest's knees without landmarks are localised into a cache of its own
  beside the manifest, apart from the one built with landmarks only."""
  from koajax import config_lib
  from koajax.data import sources
  manifest = _manifest(tmp_path, {'S01_R'})
  data = config_lib.data_config(roi_px=48)
  data.update({'source': 'manifest', 'manifest': str(manifest),
               'roi_mm': 100.0, 'localizer': 'LOC', 'workers': 1})
  cache = sources.resolve_cache(data)
  assert cache.dir == tmp_path / 'koajax-cache-roi48-localised'
  assert cache.index['landmarks_from'].tolist() == ['file'] + [
      'localizer'] * 3
  data.localizer = ''
  assert len(sources.resolve_cache(data)) == 1  # koajax-cache-roi48


def test_a_localiser_failing_on_a_film_costs_its_knees_only(tmp_path,
                                                          monkeypatch):
  class Broken:
    def locate(self, image, *args, **kwargs):
      if image.shape:  # every film
        raise FloatingPointError('the network diverged')

  monkeypatch.setattr(localize, 'load', lambda path: Broken())
  manifest = _manifest(tmp_path, {'S01_R', 'S01_L'})
  summary = build.build_cache(manifest, tmp_path / 'cache', workers=1,
                              localizer='LOC', **films.ROI)
  assert summary['knees_built'] == 2
  assert summary['skipped_by_reason'] == {'unexpected': 2}
  assert ('unexpected error localising: FloatingPointError: the network '
          'diverged (S02.dcm)') in summary['skipped'][0]['reason']
