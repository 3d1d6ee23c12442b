"""Tests for building the knee cache from manifests with good and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from koajax import cli
from koajax.data import build
from koajax.data import cache
from koajax.data import manifest as manifest_lib
from koajax.data import preprocess
from koajax.data import schema

import test_preprocess as phantom

SPACING = (0.5, 0.5)  # coarse films keep the tests fast
SHAPE = (320, 560)  # 160 x 280 mm
ROI = {'roi_mm': 100.0, 'roi_px': 48}
REPO = Path(__file__).resolve().parents[1]


def _film(path: Path, **dicom_kwargs):
  """A bilateral film: the right knee on the image's left, as in a PA view."""
  film, landmarks = phantom.render_film(
      SHAPE, SPACING, [((70, 80), 4.0, 'R'), ((210, 80), -3.0, 'L')])
  if dicom_kwargs.get('photometric') == 'MONOCHROME1':
    film = np.iinfo(np.uint16).max - film  # stored dark-on-bright
  dicom_kwargs.setdefault('spacing', SPACING)
  phantom.write_dicom(path, film, **dicom_kwargs)
  return landmarks


def _row(subject, side, path, kl='2', visit='0', **grades):
  return {'subject_id': subject, 'visit': visit, 'side': side, 'site': 'A',
          'path': path, 'kl': kl, 'ost_fl': '1', 'ost_fm': '', 'ost_tl': '0',
          'ost_tm': '3', 'jsn_l': '', 'jsn_m': '1', **grades}


def _landmark_row(subject, side, points, visit='0'):
  row = {'subject_id': subject, 'visit': visit, 'side': side}
  row.update({f'{a}{i}': f'{points[i, j]:.3f}' for i in range(16)
              for j, a in enumerate('xy')})
  return row


def _write(folder: Path, rows, landmark_rows) -> Path:
  pd.DataFrame(rows, columns=schema.MANIFEST_COLUMNS).to_csv(
      folder / 'manifest.csv', index=False)
  pd.DataFrame(landmark_rows, columns=schema.LANDMARK_COLUMNS).to_csv(
      folder / 'landmarks.csv', index=False)
  return folder / 'manifest.csv'


@pytest.fixture(scope='module')
def mixed(tmp_path_factory) -> Path:
  """Two good films plus one of each kind of bad input."""
  d = tmp_path_factory.mktemp('mixed')
  rows, marks = [], []

  def add(subject, filename, *, landmarks=True, r_kl='2', l_kl='3',
          **dicom_kwargs):
    points = _film(d / filename, **dicom_kwargs)
    rows.extend([_row(subject, 'R', filename, kl=r_kl),
                 _row(subject, 'L', filename, kl=l_kl)])
    for side in ('R', 'L'):
      if landmarks is True or side in landmarks:
        marks.append(_landmark_row(subject, side, points[side]))
    return points

  add('S01', 'good1.dcm')
  add('S02', 'good2.dcm', photometric='MONOCHROME1')
  add('S03', 'nolandmarks.dcm', landmarks=('R',))  # S03 L has none
  add('S04', 'badgrade.dcm', l_kl='7')  # S04 L: KL out of range
  add('S05', 'trunc.dcm')
  (d / 'trunc.dcm').write_bytes((d / 'trunc.dcm').read_bytes()[:-5000])
  points = add('S06', 'notdicom.dcm')
  (d / 'notdicom.dcm').write_text('subject_id,kl\n')
  add('S07', 'nospacing.dcm', spacing=None)
  add('S08', 'j2k.dcm')
  phantom.relabel_compressed(d / 'j2k.dcm')
  # S09: listed, no file.
  rows.extend([_row('S09', side, 'missing.dcm') for side in ('R', 'L')])
  marks.extend([_landmark_row('S09', s, points[s]) for s in ('R', 'L')])
  # S01 visit 12 R twice (both skipped), L once (built, same film as S01 v0).
  rows.extend([_row('S01', 'R', 'good1.dcm', visit='12'),
               _row('S01', 'R', 'good1.dcm', visit='12', kl='1'),
               _row('S01', 'L', 'good1.dcm', visit='12'),
               _row('S10', 'X', 'good1.dcm')])  # bad side
  marks.extend([_landmark_row('S01', s, points[s], visit='12')
                for s in ('R', 'L')])
  # S11: landmarks in another image's pixels (R) and with a hole (L).
  rows.extend([_row('S11', side, 'good2.dcm') for side in ('R', 'L')])
  holed = points['L'].copy()
  holed[5, 1] = np.nan
  marks.extend([_landmark_row('S11', 'R', points['R'] * 4),
                _landmark_row('S11', 'L', holed)])
  return _write(d, rows, marks)


# Files in order of first appearance, each file's knees in manifest order:
# good1.dcm also serves S01 visit 12.
GOOD = ['S01_v00_R', 'S01_v00_L', 'S01_v12_L', 'S02_v00_R', 'S02_v00_L',
        'S03_v00_R', 'S04_v00_R']
BAD = {  # where (substring) -> (kind, reason substring)
    'row 7 (S03, 0, L)': ('no_landmarks', 'no landmarks for this knee'),
    'row 9 (S04, 0, L)': ('bad_grade', "kl='7' out of range 0-4"),
    'trunc.dcm': ('truncated', 'truncated'),
    'notdicom.dcm': ('not_dicom', 'not a DICOM file'),
    'nospacing.dcm': ('no_spacing', 'no pixel spacing'),
    'j2k.dcm': ('unsupported_syntax', 'JPEG 2000'),
    'missing.dcm': ('missing_file', 'file not found'),
    'row 20 (S01, 12, R)': ('duplicate', 'duplicate knee S01_v12_R'),
    'row 21 (S01, 12, R)': ('duplicate', 'duplicate knee S01_v12_R'),
    'row 23 (S10, 0, X)': ('bad_side', "side 'X'"),
    'row 24 (S11, 0, R)': ('bad_landmarks', 'outside the 560x320 image'),
    'row 25 (S11, 0, L)': ('bad_landmarks', 'non-numeric'),
}


def _leaks(data: bytes) -> list[str]:
  return [v for v in phantom.PHI.values() if v.encode() in data]


def test_manifest_validation(mixed):
  df = manifest_lib.read_manifest(mixed)
  problems = df[df.problem != '']
  assert problems.row.tolist() == [9, 20, 21, 23]
  assert problems.problem_kind.tolist() == [
      'bad_grade', 'duplicate', 'duplicate', 'bad_side']
  assert 'also on row(s) 21' in problems.problem.iloc[1]
  good = df[df.row == 2].iloc[0]
  assert good.kl == 2 and good.ost_fm == schema.UNGRADED
  assert Path(good.path) == mixed.parent / 'good1.dcm'
  assert good.path_in_manifest == 'good1.dcm'  # as written, for messages


def test_missing_columns_are_fatal(tmp_path):
  path = tmp_path / 'm.csv'
  pd.DataFrame({'subject_id': ['a'], 'visit': [0], 'side': ['R'],
                'path': ['x.dcm']}).to_csv(path, index=False)
  with pytest.raises(manifest_lib.ManifestError) as e:
    manifest_lib.read_manifest(path)
  assert str(path) in str(e.value)
  assert 'site, kl, ost_fl' in str(e.value)


def test_read_landmarks(mixed):
  marks = manifest_lib.read_landmarks(mixed.parent / 'landmarks.csv')
  assert ('S03', 0, 'R') in marks and ('S03', 0, 'L') not in marks
  assert marks[('S01', 12, 'L')].shape == (16, 2)


def test_cli_builds_good_knees_and_reports_bad(mixed, tmp_path):
  out = tmp_path / 'cache'
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  result = subprocess.run(
      [sys.executable, '-m', 'koajax.data.build', f'--manifest={mixed}',
       f'--out={out}', '--roi_mm=100', '--roi_px=48', '--workers=2'],
      capture_output=True, env=env, timeout=120, check=False)
  logs = result.stdout + result.stderr
  assert result.returncode == 0, logs.decode()

  c = cache.open_cache(out)
  assert c.index.knee_id.tolist() == GOOD
  assert c.index.kl.tolist() == [2, 3, 2, 2, 3, 2, 2]
  assert c.index.ost_fm.tolist() == [schema.UNGRADED] * 7
  assert c[0]['image'].shape == (48, 48)

  summary = json.loads((out / cache.SUMMARY).read_text())
  assert summary['knees_built'] == 7
  skipped = summary['skipped']
  for where, (kind, reason) in BAD.items():
    hits = [s for s in skipped if where in s['where']]
    assert len(hits) == 1, (where, skipped)
    assert hits[0]['kind'] == kind and reason in hits[0]['reason'], hits[0]
    # Each skip is one log line naming it and its reason.
    assert f'{hits[0]["where"]}: {hits[0]["reason"]}'.encode() in logs
  assert len(skipped) == len(BAD)
  assert summary['knees_skipped'] == 17  # 5 whole films and 7 single rows
  assert summary['skipped_by_reason'] == {
      'bad_grade': 1, 'bad_landmarks': 2, 'bad_side': 1, 'duplicate': 2, 'missing_file': 2,
      'no_landmarks': 1, 'no_spacing': 2, 'not_dicom': 2, 'truncated': 2,
      'unsupported_syntax': 2}

  # No header value of any input reaches the outputs or the logs.
  for path in out.iterdir():
    assert not _leaks(path.read_bytes()), path
  assert not _leaks(logs)
  assert _leaks((mixed.parent / 'good1.dcm').read_bytes())  # the check works


def test_keypoints_and_flip(mixed, tmp_path):
  summary = build.build_cache(mixed, tmp_path / 'c', workers=1, **ROI)
  c = cache.open_cache(tmp_path / 'c')
  centre = (ROI['roi_px'] - 1) / 2
  for i in range(len(c)):
    kp = c[i]['keypoints']
    np.testing.assert_allclose(kp[schema.JOINT_CENTRE], [centre, centre],
                               atol=1e-3)
    lateral, medial = kp[phantom.LATERAL, 0], kp[phantom.MEDIAL, 0]
    assert lateral.max() < medial.min()
  # Right and left knees of a film are mirror images: their patches agree.
  right, left = c[0]['image'].astype(int), c[1]['image'].astype(int)
  assert np.mean(np.abs(right - left) > 64) < 0.05
  # MONOCHROME1 (S02) comes out like MONOCHROME2 (S01) of the same film.
  np.testing.assert_array_equal(c[0]['image'], c[3]['image'])
  assert summary['knees_built'] == len(c)


def test_parallel_matches_serial(mixed, tmp_path):
  df = manifest_lib.read_manifest(mixed)
  marks = manifest_lib.read_landmarks(mixed.parent / 'landmarks.csv')
  runs = [list(build.iter_knees(df, marks, workers=w, **ROI)) for w in (1, 2)]
  assert [type(x) for x in runs[0]] == [type(x) for x in runs[1]]
  for a, b in zip(*runs):
    if isinstance(a, cache.Knee):
      assert a.knee_id == b.knee_id
      np.testing.assert_array_equal(a.image, b.image)
    else:
      assert a == b


def test_strict_and_nothing_built(mixed, tmp_path, capsys):
  out = tmp_path / 'strict'
  args = [f'--manifest={mixed}', f'--out={out}', '--roi_mm=100',
          '--roi_px=48', '--workers=1']
  assert build.main(args + ['--strict']) == cli.FAILED
  assert not cache.is_complete(out)
  assert json.loads((out / cache.SUMMARY).read_text())['knees_built'] == 7
  err = capsys.readouterr().err
  assert ('koajax.data.build: failed: knees were skipped and --strict is '
          'set (7 built, 17 skipped: bad_grade 1,') in err
  assert f'listed in summary.json in {out}\n' in err

  # Only bad rows: nothing to build, non-zero exit, no cache.
  df = pd.read_csv(mixed, dtype=str, keep_default_na=False)
  bad = mixed.parent / 'bad_only.csv'
  df[df.subject_id.isin(['S05', 'S06', 'S09'])].to_csv(bad, index=False)
  out2 = tmp_path / 'none'
  assert build.main([f'--manifest={bad}', f'--out={out2}',
                     f'--landmarks={mixed.parent / "landmarks.csv"}',
                     '--workers=1']) == cli.FAILED
  assert not cache.is_complete(out2)
  assert 'failed: no knee could be built (0 built, 6 skipped' in (
      capsys.readouterr().err)

  # A failed rebuild leaves a complete cache as it was and says where its
  # summary went.
  assert build.main(args) == cli.OK
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  assert build.main(args + ['--strict']) == cli.FAILED
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  err = capsys.readouterr().err
  assert f'the cache in {out} is as it was' in err
  elsewhere = Path(err.split('listed in ')[1].split(';')[0])
  assert json.loads(elsewhere.read_text())['knees_skipped'] == 17
  elsewhere.unlink()

  # An unreadable manifest is fatal before anything is touched: one line,
  # exit 2 through koajax.cli.
  nope = tmp_path / 'nope.csv'
  assert cli.call('koajax.data.build', build.main,
                  [f'--manifest={nope}', f'--out={out2}']) == cli.BAD_INPUT
  err = capsys.readouterr().err
  assert err == f'koajax.data.build: error: manifest file not found: {nope}\n'
  assert len(err.splitlines()) == 1 and not _leaks(err.encode())


def test_missing_landmarks_file_is_fatal(mixed, tmp_path):
  with pytest.raises(manifest_lib.ManifestError, match='landmarks file'):
    build.build_cache(mixed, tmp_path / 'c', landmarks=tmp_path / 'x.csv',
                      workers=1, **ROI)
  assert not (tmp_path / 'c').exists()
  assert not list(tmp_path.iterdir())


def _tree(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def test_interrupted_build_leaves_the_old_cache(mixed, tmp_path, monkeypatch):
  out = tmp_path / 'cache'
  build.build_cache(mixed, out, workers=1, **ROI)
  assert len(cache.open_cache(out)) == 7
  before = _tree(out)

  calls = []
  real = preprocess.extract_roi

  def crash_on_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # as if the user pressed Ctrl-C
    return real(*args, **kwargs)

  monkeypatch.setattr(preprocess, 'extract_roi', crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    build.build_cache(mixed, out, workers=1, **{**ROI, 'roi_px': 32})
  # The old cache is still there, byte for byte, and nothing half-written
  # is left beside it.
  assert _tree(out) == before
  assert cache.open_cache(out).meta['roi_px'] == ROI['roi_px']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['cache']

  monkeypatch.setattr(preprocess, 'extract_roi', real)
  build.build_cache(mixed, out, workers=1, **{**ROI, 'roi_px': 32})
  c = cache.open_cache(out)
  assert c.meta['roi_px'] == 32 and c[0]['image'].shape == (32, 32)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['cache']


def test_synthetic_dataset(tmp_path):
  synthetic = pytest.importorskip('koajax.data.synthetic')
  raw = tmp_path / 'raw'
  synthetic.generate(raw, num_subjects=2, seed=0, workers=1)
  roi_mm, roi_px = 140.0, 128
  summary = build.build_cache(raw / 'manifest.csv', tmp_path / 'c',
                              roi_mm=roi_mm, roi_px=roi_px, workers=1)
  c = cache.open_cache(tmp_path / 'c')
  assert summary['knees_built'] == len(c) > 0
  assert summary['knees_skipped'] == 0
  centre = (roi_px - 1) / 2
  mm_per_px = roi_mm / roi_px
  for i in range(len(c)):
    record = c[i]
    kp, image = record['keypoints'], record['image'].astype(np.float64)
    offset = np.hypot(*(kp[schema.JOINT_CENTRE] - centre)) * mm_per_px
    assert offset < 2.0
    # Left knees flipped: lateral points on the left for every knee.
    lateral, medial = kp[phantom.LATERAL, 0], kp[phantom.MEDIAL, 0]
    assert lateral.mean() < centre < medial.mean(), c.index.knee_id[i]
    # The pixels agree: in each compartment the darkest row near the joint
    # (the joint space) lies between the condyle and the plateau landmarks.
    for condyle, plateau in [(10, 1), (14, 7)]:
      x = int(round(kp[plateau, 0]))
      top, bottom = kp[condyle, 1], kp[plateau, 1]
      profile = image[:, x - 2:x + 3].mean(axis=1)
      lo, hi = int(top) - 8, int(bottom) + 9
      darkest = lo + np.argmin(profile[lo:hi])
      assert top - 2 / mm_per_px <= darkest <= bottom + 2 / mm_per_px

  # The generator's fake patient names, ids and dates stay in the DICOMs.
  identities = set()
  for path in raw.glob('images/*/*.dcm'):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    identities |= {str(ds[k].value) for k in (
        'PatientName', 'PatientID', 'PatientBirthDate', 'StudyDate',
        'AccessionNumber') if k in ds}
  assert identities
  for path in (tmp_path / 'c').iterdir():
    data = path.read_bytes()
    assert not [v for v in identities if v.encode() in data], path
