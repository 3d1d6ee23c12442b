"""Grading new radiographs (`koajax.predict`, `koajax.grader`): the command
line on generated DICOMs (bilateral, single-knee, without landmarks) and
knee PNGs against the predictor called directly, its bad inputs, and the
service (`koajax.serve`) through FastAPI's in-process client."""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from koajax import grader as grader_lib
from koajax import predict
from koajax.data import cache as cache_lib
from koajax.data import dicom_io
from koajax.train import predictor as predictor_lib
import test_preprocess as phantom

REPO = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def sl_run(smoke_grading_run):
  return smoke_grading_run


@pytest.fixture(scope='module')
def raw(smoke_root, sl_run):
  return Path(smoke_root) / 'synthetic-n40-s0' / 'raw'


@pytest.fixture(scope='module')
def films(raw, smoke_localizer, tmp_path_factory):
  """Three bilateral films of the held-out site E whose knees the smoke
  localiser finds (most: tests/test_localizer_run.py), copied into a folder
  without their manifest or landmarks file, and their manifest rows."""
  from koajax import localize
  frame = pd.read_csv(raw / 'manifest.csv', dtype={'subject_id': str})
  frame = frame[frame['site'] == 'E']
  loc = localize.load(str(smoke_localizer))
  paths = []
  for p in dict.fromkeys(frame['path']):
    image, spacing = dicom_io.read_radiograph(raw / p)
    found = loc.locate(image, spacing, ['R', 'L'], bilateral=True)
    if all(isinstance(f, localize.Found) for f in found):
      paths.append(p)
    if len(paths) == 3:
      break
  assert len(paths) == 3
  folder = tmp_path_factory.mktemp('films')
  for p in paths:
    shutil.copy(raw / p, folder / p.replace('/', '-'))
  return folder, frame[frame['path'].isin(paths)]


@pytest.fixture(scope='module')
def cli_with_landmarks(raw, films, sl_run, tmp_path_factory):
  """The command line on a manifest of the films with their landmarks."""
  _, rows = films
  manifest = raw / 'three.csv'
  rows.to_csv(manifest, index=False)
  out = tmp_path_factory.mktemp('pred-landmarks')
  result = _run('-m', 'koajax.predict', f'--runs={sl_run}',
                f'--input={manifest}', f'--landmarks={raw / "landmarks.csv"}',
                f'--out={out}', '--no_progress')
  assert result.returncode == 0, result.stderr[-3000:]
  return out, json.loads((out / 'predictions.json').read_text())


def test_the_command_line_gives_the_predictors_probabilities(
    cli_with_landmarks, sl_run, films):
  """Knees cut from the films with their landmarks are the training cache's
  knees: the probabilities equal the predictor's on the cached rows."""
  out, result = cli_with_landmarks
  _, rows = films
  frame = pd.read_csv(out / 'predictions.csv')
  assert len(frame) == len(rows) == 6 and not result['skipped']
  config = json.loads((sl_run / 'config.json').read_text())
  cache = cache_lib.open_cache(
      Path(config['data']['root']) / 'synthetic-n40-s0' /
      f'cache-roi{config["data"]["roi_px"]}')
  ids = list(cache.index['knee_id'])
  indices = np.array([ids.index(k) for k in frame['knee']])
  predictor = predictor_lib.Predictor.from_runs([sl_run])
  want = predictor.predict(cache, indices)['kl']
  got = frame[[f'kl_p{k}' for k in range(5)]].to_numpy()
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_array_equal(frame['kl'], want.argmax(1))
  assert (frame['landmarks_from'] == 'file').all()
  # MC dropout of a network with dropout: BALD, between 0 and the entropy.
  assert (frame['uncertainty_kind'] == 'mc_dropout_bald').all()
  entropy = stats.entropy(got, axis=1)
  assert (frame['kl_uncertainty'] > 0).all()
  assert (frame['kl_uncertainty'] <= entropy + 1e-6).all()
  knee = result['knees'][0]
  assert knee['heads']['kl']['classes'] == [0, 1, 2, 3, 4]
  assert len(knee['localisation']['landmarks']) == 16
  assert result['model']['heads'] == [{'name': 'kl',
                                       'classes': [0, 1, 2, 3, 4]}]
  for name in frame['gradcam']:
    png = Image.open(out / name)
    assert png.size == (160, 160) and png.mode == 'RGB'


def test_without_dropout_samples_the_uncertainty_is_the_entropy(
    raw, films, sl_run, tmp_path):
  _, rows = films
  manifest = tmp_path / 'one.csv'
  rows.iloc[:2].to_csv(manifest, index=False)
  manifest_text = manifest.read_text().replace(
      'images/', str(raw / 'images') + '/')
  manifest.write_text(manifest_text)
  result = predict.predict([str(sl_run)], [str(manifest)], str(tmp_path / 'o'),
                           landmarks=str(raw / 'landmarks.csv'),
                           mc_samples=0, progress=False)
  for knee in result['knees']:
    p = np.array(knee['heads']['kl']['probabilities'])
    assert knee['uncertainty_kind'] == 'entropy'
    assert knee['heads']['kl']['uncertainty'] == pytest.approx(
        stats.entropy(p), abs=1e-5)


@pytest.fixture(scope='module')
def localised(films, sl_run, smoke_localizer, tmp_path_factory):
  """The command line on the folder of films (no landmarks anywhere) with
  the localiser, beside a single-knee film with and without laterality, a
  file that is not a DICOM and a real chest CR."""
  import test_dicom_codecs as real  # pydicom-data's files
  folder, rows = films
  extra = tmp_path_factory.mktemp('extra')
  first = sorted(folder.iterdir())[0]
  image, spacing = dicom_io.read_radiograph(first)
  # The right knee alone: the left half of the film as acquired.
  half = image[:, :image.shape[1] // 2]
  stored = np.round((half - half.min()) / np.ptp(half) * 4095)
  single = phantom.write_dicom(extra / 'single-right.dcm', stored,
                               spacing=spacing)
  import pydicom
  ds = pydicom.dcmread(single)
  ds.ImageLaterality = 'R'
  ds.save_as(single)
  phantom.write_dicom(extra / 'no-side.dcm', stored, spacing=spacing)
  phantom.write_dicom(extra / 'no-spacing.dcm', stored, spacing=None)
  (extra / 'notes.dcm').write_text('not an image')
  chest = real.with_spacing(real.DATA / 'RG1_J2KR.dcm', extra / 'chest.dcm')
  ds = pydicom.dcmread(chest)
  ds.ImageLaterality = 'R'  # as if it were a knee's film
  ds.save_as(chest)
  out = tmp_path_factory.mktemp('pred-localised')
  result = _run('-m', 'koajax.predict', f'--runs={sl_run}',
                f'--input={folder}', f'--input={extra}',
                f'--localizer={smoke_localizer}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  return out, json.loads((out / 'predictions.json').read_text()), result


def test_films_without_landmarks_are_localised(localised, films):
  out, result, process = localised
  folder, rows = films
  graded = {k['knee']: k for k in result['knees']}
  by_film = [k for k in graded if Path(k).parent.name.startswith('films')]
  # Both knees of (nearly) every film: the smoke localiser finds most.
  assert len(by_film) >= 4
  for knee in by_film:
    assert graded[knee]['localisation']['from'] == 'localizer'
    assert graded[knee]['localisation']['disagreement_mm'] >= 0
  assert 'radiographs' in process.stderr  # the progress bar
  summary = result['summary']
  assert (f'{summary["knees"]} knees graded from {summary["inputs"]} inputs; '
          f'{summary["skipped"]} skipped (') in process.stdout


def test_single_knee_films_and_bad_inputs_are_reported(localised):
  out, result, _ = localised
  skipped = {Path(s['input']).name: s for s in result['skipped']}
  assert skipped['no-side.dcm']['kind'] == 'no_laterality'
  assert 'laterality' in skipped['no-side.dcm']['reason']
  assert skipped['notes.dcm']['kind'] == 'not_dicom'
  assert skipped['no-spacing.dcm']['kind'] == 'no_spacing'
  assert skipped['chest.dcm']['kind'] == 'not_found'
  assert 'finds no knee' in skipped['chest.dcm']['reason']
  single = [k for k in result['knees'] if 'single-right' in k['knee']]
  assert [k['side'] for k in single] == ['R']
  assert single[0]['knee'].endswith('single-right_R')
  # Nothing of the header but pixels, spacing and laterality is written.
  text = (out / 'predictions.json').read_text() + (
      out / 'predictions.csv').read_text()
  for value in phantom.PHI.values():
    assert str(value) not in text


def test_knee_pngs_are_graded_and_bad_ones_named(
    cli_with_landmarks, sl_run, tmp_path):
  """PNGs of cached ROIs (as acquired: left knees un-mirrored) get the
  cache's probabilities; a non-square, a colour and a 1-bit PNG are skipped
  with their reasons, in the same call."""
  out, result = cli_with_landmarks
  config = json.loads((sl_run / 'config.json').read_text())
  cache = cache_lib.open_cache(
      Path(config['data']['root']) / 'synthetic-n40-s0' /
      f'cache-roi{config["data"]["roi_px"]}')
  ids = list(cache.index['knee_id'])
  want = {}
  for knee in result['knees'][:2]:
    subject, _, side = knee['knee'].split('_')
    roi = cache[ids.index(knee['knee'])]['image']
    Image.fromarray(roi[:, ::-1] if side == 'L' else roi).save(
        tmp_path / f'{subject}{side}.png')
    want[f'{subject}{side}'] = knee['heads']['kl']['probabilities']
  Image.new('L', (160, 120)).save(tmp_path / 'wide.png')
  Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (160, 160, 3), np.uint8)).save(tmp_path / 'colour.png')
  Image.new('1', (160, 160)).save(tmp_path / 'bits.png')
  got = predict.predict([str(sl_run)], [str(tmp_path)], str(tmp_path / 'o'),
                        progress=False)
  by_name = {Path(k['input']).stem: k for k in got['knees']}
  assert set(by_name) == set(want)
  for name, probs in want.items():
    np.testing.assert_allclose(by_name[name]['heads']['kl']['probabilities'],
                               probs, atol=2e-5)
    assert by_name[name]['localisation'] == {'from': 'png'}
  reasons = {Path(s['input']).name: s['reason'] for s in got['skipped']}
  assert 'square' in reasons['wide.png']
  assert 'colour' in reasons['colour.png']
  assert 'mode 1' in reasons['bits.png']


def test_runs_that_cannot_grade_are_one_line_errors(sl_run, smoke_localizer,
                                                    films, tmp_path):
  folder, _ = films
  for runs, words in (
      (str(tmp_path), 'is not a koajax training workdir'),
      (f'{sl_run},{smoke_localizer / "fine"}', 'needs runs with the same '
       'heads'),
      (str(smoke_localizer / 'fine'), 'is a landmark model')):
    result = _run('-m', 'koajax.predict', f'--runs={runs}',
                  f'--input={folder}', f'--out={tmp_path / "o"}')
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith('koajax.predict: error: ')
    assert words in lines[-1]


# --- the service ---------------------------------------------------------


@pytest.fixture(scope='module')
def service(sl_run, smoke_localizer, tmp_path_factory):
  from fastapi.testclient import TestClient
  from koajax import serve
  grader = grader_lib.Grader.load([sl_run], localizer=smoke_localizer)
  keep = tmp_path_factory.mktemp('kept')
  app = serve.create_app(grader, max_upload_bytes=8 << 20, keep=keep,
                         window_s=0.5)
  return TestClient(app), app, keep


def test_the_service_answers_as_the_command_line(service, localised, films):
  client, _, keep = service
  _, result, _ = localised
  folder, _ = films
  film = sorted(folder.iterdir())[0]
  assert client.get('/health').json() == {'status': 'ok'}
  model = client.get('/model').json()
  assert model['heads'][0]['name'] == 'kl'
  assert model['uncertainty']['kind'] == 'mc_dropout_bald'
  assert model['runs'][0]['preset'] == 'configs/supervised.py:smoke'
  with open(film, 'rb') as f:
    answer = client.post('/predict', files=[('files', (film.name, f))])
  assert answer.status_code == 200, answer.text
  body = answer.json()
  cli = {k['knee']: k for k in result['knees']}
  for knee in body['knees']:
    want = cli[str(film.parent / knee['knee'])]
    assert knee['localisation']['landmarks'] == want['localisation'][
        'landmarks']
    np.testing.assert_allclose(knee['heads']['kl']['probabilities'],
                               want['heads']['kl']['probabilities'],
                               atol=2e-5)
    # MC-dropout samples are drawn per knee: the same in any batch.
    assert knee['heads']['kl']['uncertainty'] == pytest.approx(
        want['heads']['kl']['uncertainty'], abs=1e-5)
    assert knee['gradcam_png'].startswith('data:image/png;base64,')
  assert len(list(keep.iterdir())) == 1  # --keep keeps the upload


def test_bad_uploads_get_4xx_and_the_good_ones_answers(service, films,
                                                       monkeypatch, tmp_path):
  client, _, _ = service
  folder, _ = films
  film = sorted(folder.iterdir())[0]
  assert client.post('/predict').status_code == 400
  empty = client.post('/predict', files=[('files', ('e.dcm', b''))])
  assert empty.status_code == 400 and 'empty upload' in empty.json()['detail']
  big = client.post('/predict', files=[('files', ('big.dcm',
                                                  b'x' * (9 << 20)))])
  assert big.status_code == 413 and 'limit' in big.json()['detail']
  junk = client.post('/predict', files=[('files', ('junk.dcm', b'hello'))])
  assert junk.status_code == 400
  assert junk.json()['skipped'][0]['input'] == 'junk.dcm'
  # Uploads are read from a temporary folder that is gone after the answer.
  import tempfile
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  mixed = client.post('/predict', files=[
      ('files', ('junk.dcm', b'hello')),
      ('files', (film.name, film.read_bytes()))])
  assert mixed.status_code == 200
  assert [s['input'] for s in mixed.json()['skipped']] == ['junk.dcm']
  assert len(mixed.json()['knees']) >= 1
  assert not list(tmp_path.iterdir())


def test_concurrent_requests_are_graded_together(service, films):
  client, app, _ = service
  folder, _ = films
  files = sorted(folder.iterdir())[:2]
  before = app.state.batcher.calls
  answers = [None, None]

  def send(i):
    answers[i] = client.post('/predict', files=[
        ('files', (files[i].name, files[i].read_bytes()))])

  threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(a.status_code == 200 for a in answers)
  assert app.state.batcher.calls == before + 1
