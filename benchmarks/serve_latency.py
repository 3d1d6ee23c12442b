"""Latency and throughput of grading radiographs: the command line and the
service, on the same films, in one invocation.

  python benchmarks/serve_latency.py --runs=/tmp/koajax-sl \\
      --localizer=/tmp/koajax-localizer --films=/tmp/new-films/images \\
      [--count=40] [--out=benchmarks/results/serve_cpu.json] \\
      [--screenshot=docs/predict_page.png]

Measures, for bilateral DICOMs without landmarks (both stages of the
localiser, every head, MC-dropout uncertainty, Grad-CAM):
  cli_one_film_s      `python -m koajax.predict` on one film, process start to
                      exit (cold: imports, loading, compiling)
  cli_films_per_s     the same command on `count` films, after subtracting
                      its one-film time (the warm rate of a long run)
  serve_start_s       `koajax.serve` from process start to answering /health
                      (loading and compiling included)
  first_request_s     the first POST /predict of one film after that
  warm_request_s      median of 10 more requests of one film each
  serve_films_per_s   `count` films sent one per request, one at a time
  batched_films_per_s the same films as 4 clients at once (requests arriving
                      together are graded together)
Each request is timed from sending the upload to the parsed JSON answer.
With --screenshot, a headless Chromium (selenium) drops a film on the page
and saves what it shows.
"""

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from koajax import serve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (benchmarks/machine.py)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _post(url: str, path: Path) -> dict:
  status, answer = serve.post(url, [path])
  if status != 200:
    raise SystemExit(f'{path}: HTTP {status}: {answer.get("detail")}')
  return answer


def _timed(fn, *args) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - start, out


def _cli(runs: str, localizer: str, films: list[Path]) -> float:
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, '-m', 'koajax.predict', f'--runs={runs}',
         f'--localizer={localizer}', '--input', *map(str, films),
         f'--out={out}', '--no_progress'],
        cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def _screenshot(url: str, film: Path, path: Path) -> None:
  import shutil  # pylint: disable=g-import-not-at-top
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which('chromium')
  for arg in ('--headless=new', '--no-sandbox', '--disable-gpu',
              '--window-size=1100,1000'):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(shutil.which('chromedriver')),
                            options=options)
  try:
    driver.get(url)
    driver.find_element(By.ID, 'files').send_keys(str(film))
    WebDriverWait(driver, 120).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, 'article.knee'))
    time.sleep(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
  finally:
    driver.quit()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True)
  parser.add_argument('--localizer', required=True)
  parser.add_argument('--films', required=True, type=Path,
                      help='folder of bilateral DICOMs (searched recursively)')
  parser.add_argument('--count', type=int, default=40)
  parser.add_argument('--out', type=Path, default=None)
  parser.add_argument('--screenshot', type=Path, default=None)
  args = parser.parse_args()
  films = sorted(args.films.rglob('*.dcm'))[:args.count]
  result = {'cpu': machine.cpu_name(), 'cores': os.cpu_count(),
            'films': len(films), 'date': time.strftime('%Y-%m-%d')}

  one = _cli(args.runs, args.localizer, films[:1])
  many = _cli(args.runs, args.localizer, films)
  result['cli_one_film_s'] = round(one, 2)
  result['cli_films_per_s'] = round((len(films) - 1) / (many - one), 2)

  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  start = time.perf_counter()
  server = subprocess.Popen(
      [sys.executable, '-m', 'koajax.serve', f'--runs={args.runs}',
       f'--localizer={args.localizer}', f'--port={port}'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    while True:
      try:
        with urllib.request.urlopen(f'{url}/health', timeout=1):
          break
      except OSError:
        if server.poll() is not None:
          raise SystemExit('koajax.serve stopped') from None
        time.sleep(0.2)
    result['serve_start_s'] = round(time.perf_counter() - start, 2)
    first, answer = _timed(_post, url, films[0])
    result['first_request_s'] = round(first, 3)
    result['knees_of_first_film'] = len(answer['knees'])
    warm = [_timed(_post, url, films[0])[0] for _ in range(10)]
    result['warm_request_s'] = round(statistics.median(warm), 3)
    total, _ = _timed(lambda: [_post(url, f) for f in films])
    result['serve_films_per_s'] = round(len(films) / total, 2)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      total, _ = _timed(lambda: list(pool.map(lambda f: _post(url, f),
                                              films)))
    result['batched_films_per_s'] = round(len(films) / total, 2)
    if args.screenshot:
      _screenshot(url, films[0], args.screenshot)
  finally:
    server.terminate()
    server.wait(timeout=30)
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + '\n')


if __name__ == '__main__':
  main()
