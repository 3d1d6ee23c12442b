"""The web page end to end in a real headless Chromium: `koajax.serve` started
as a user starts it, a generated DICOM uploaded through the page's file
input, and the grades read off the page equal to the service's JSON.

Needs Chromium and its ChromeDriver (Debian: chromium, chromium-driver;
.ci/run installs them and sets KOAJAX_REQUIRE_BROWSER=1, which turns a
missing browser from a skip into a failure)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from koajax import serve

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, map(shutil.which, (
    'chromium', 'chromium-browser', 'google-chrome'))), None)
CHROMEDRIVER = shutil.which('chromedriver')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(smoke_grading_run, smoke_localizer, tmp_path_factory):
  if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get('KOAJAX_REQUIRE_BROWSER'):
      pytest.fail('KOAJAX_REQUIRE_BROWSER is set but Chromium or '
                  'chromedriver is not installed')
    pytest.skip('no Chromium and chromedriver (apt install chromium '
                'chromium-driver)')
  workdir = smoke_grading_run
  port = _free_port()
  log = open(tmp_path_factory.mktemp('log') / 'serve.log', 'w+')
  process = subprocess.Popen(
      [sys.executable, '-m', 'koajax.serve', f'--runs={workdir}',
       f'--localizer={smoke_localizer}', f'--port={port}'],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 300
  while True:
    try:
      with urllib.request.urlopen(f'{url}/health', timeout=2) as r:
        if json.load(r) == {'status': 'ok'}:
          break
    except OSError:
      pass
    if process.poll() is not None or time.time() > deadline:
      log.seek(0)
      pytest.fail(f'koajax.serve did not start: {log.read()[-3000:]}')
    time.sleep(0.5)
  yield url
  process.terminate()
  process.wait(timeout=30)
  log.close()


def test_a_radiograph_dropped_on_the_page_shows_its_grades(server,
                                                           smoke_root):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions
  from selenium.webdriver.support.ui import WebDriverWait

  # A film of the held-out site E whose knees the smoke localiser finds.
  raw = Path(smoke_root) / 'synthetic-n40-s0' / 'raw'
  frame = pd.read_csv(raw / 'manifest.csv', dtype={'subject_id': str})
  for name in dict.fromkeys(frame.loc[frame['site'] == 'E', 'path']):
    film = raw / name
    _, want = serve.post(server, [film])
    if want['knees']:
      break
  assert want['knees'], want
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ('--headless=new', '--no-sandbox', '--disable-gpu',
              '--disable-dev-shm-usage', '--window-size=1200,900'):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    driver.get(server)
    WebDriverWait(driver, 30).until(
        lambda d: 'koajax' in d.find_element(By.ID, 'model').text)
    assert 'task kl' in driver.find_element(By.ID, 'model').text
    driver.find_element(By.ID, 'files').send_keys(str(film))
    WebDriverWait(driver, 120).until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, 'article.knee')))
    cards = driver.find_elements(By.CSS_SELECTOR, 'article.knee')
    shown = {}
    for card in cards:
      grade = card.find_element(By.CSS_SELECTOR, 'tr.head[data-head="kl"] .grade')
      bars = [float(b.get_attribute('data-p'))
              for b in card.find_elements(By.CSS_SELECTOR, '.bar')]
      image = card.find_element(By.TAG_NAME, 'img')
      assert driver.execute_script(
          'return arguments[0].complete && arguments[0].naturalWidth', image) > 0
      shown[card.get_attribute('data-knee')] = (int(grade.text), bars)
    assert set(shown) == {k['knee'] for k in want['knees']}
    for knee in want['knees']:
      grade, bars = shown[knee['knee']]
      assert grade == knee['heads']['kl']['grade']
      assert bars == pytest.approx(knee['heads']['kl']['probabilities'],
                                   abs=1e-4)
    status = driver.find_element(By.ID, 'status').text
    assert status.startswith(f'{len(want["knees"])} knee(s) graded')
    assert not driver.find_element(By.ID, 'download').get_attribute('disabled')
  finally:
    driver.quit()
