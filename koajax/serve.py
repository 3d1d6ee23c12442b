"""Grading over HTTP, and a web page to drop radiographs on.

  python -m koajax.serve --runs=RUN[,RUN...] [--host=127.0.0.1] [--port=8000]
      [--localizer=DIR] [--keep=DIR] [--max_upload_mb=64] [--checkpoint=best]
      [--mc_samples=20] [--batch_size=8]

  GET  /          the page: drop DICOMs or knee PNGs, see each knee's heatmap,
                  the grade of every head and its probabilities; download
                  the JSON (no internet needed: everything is served here)
  GET  /health    {"status": "ok"}
  GET  /model     the runs, heads, uncertainty, localiser, koajax version
  POST /predict   multipart files (field `files`, one or several): the
                  knees as `koajax.predict` writes them in predictions.json,
                  each with its Grad-CAM overlay as a base64 PNG data URL

The models are loaded and compiled once, at start. Knees of requests that
arrive together are graded in one call (`Batcher`). Every upload is written
to a temporary folder to be read and deleted when its answer is sent, unless
--keep names a folder to copy it to. An upload that is empty, over the size
limit, not a DICOM or a knee PNG, or without a knee the model can grade is
named in the answer's `skipped` with its reason; when no knee of the request
could be graded the answer is HTTP 4xx with those reasons (413 when the
uploads were all too large, 400 otherwise).
"""


import argparse
import base64
import concurrent.futures
import importlib.util
import io
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from koajax import cli

PROGRAM = 'koajax.serve'
WEB_DIR = Path(__file__).resolve().parent / 'web'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
log = logging.getLogger(PROGRAM)


class Batcher:
  """Grades the knees of concurrent requests together, in one thread.

  A request hands its knees to `grade` and waits; the thread takes every
  request waiting (after `window_s` for more to arrive) and grades their
  knees in one `Grader.grade` call, so several requests share the batches
  of one compiled program.
  """

  def __init__(self, grader, window_s: float = 0.01):
    self.grader = grader
    self.window_s = window_s
    self._queue: queue.Queue = queue.Queue()
    self.calls = 0  # grading calls made (the tests count them)
    threading.Thread(target=self._loop, daemon=True,
                     name='koajax-grader').start()

  def grade(self, knees: list) -> list:
    if not knees:
      return []
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((knees, future))
    return future.result()

  def _loop(self) -> None:
    while True:
      waiting = [self._queue.get()]
      time.sleep(self.window_s)
      while True:
        try:
          waiting.append(self._queue.get_nowait())
        except queue.Empty:
          break
      knees = [k for ks, _ in waiting for k in ks]
      try:
        results = self.grader.grade(knees)
        self.calls += 1
      except Exception as e:  # pylint: disable=broad-except
        for _, future in waiting:
          future.set_exception(e)
        continue
      start = 0
      for ks, future in waiting:
        future.set_result(results[start:start + len(ks)])
        start += len(ks)


def post(url: str, paths: Sequence[str | Path], timeout: float = 600.0
         ) -> tuple[int, dict]:
  """(HTTP status, JSON answer) of POST `url`/predict with the files at
  `paths`: a client of the service with the standard library only."""
  import json  # pylint: disable=g-import-not-at-top
  import urllib.error  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  boundary = f'koajax{time.time_ns()}'
  body = b''
  for path in map(Path, paths):
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="files";'
             f' filename="{path.name}"\r\nContent-Type: '
             'application/octet-stream\r\n\r\n').encode()
    body += path.read_bytes() + b'\r\n'
  body += f'--{boundary}--\r\n'.encode()
  request = urllib.request.Request(
      f'{url}/predict', data=body, headers={
          'Content-Type': f'multipart/form-data; boundary={boundary}'})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as answer:
      return answer.status, json.load(answer)
  except urllib.error.HTTPError as e:  # 4xx: the reasons are in the body
    return e.code, json.load(e)


def png_data_url(rgb: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format='png')
  return 'data:image/png;base64,' + base64.b64encode(
      buffer.getvalue()).decode('ascii')


def _safe_name(name: str | None, index: int) -> str:
  """An upload's name without folders (it names the knees in answers)."""
  base = Path((name or '').replace('\\', '/')).name.strip()
  return base if base and base not in ('.', '..') else f'upload-{index}'


def create_app(grader, *, max_upload_bytes: int = 64 << 20,
               keep: str | Path | None = None, window_s: float = 0.01):
  """The FastAPI application around a loaded `koajax.grader.Grader`."""
  from fastapi import FastAPI, File, UploadFile  # pylint: disable=g-import-not-at-top
  from fastapi.responses import FileResponse, JSONResponse  # pylint: disable=g-import-not-at-top
  from fastapi.staticfiles import StaticFiles  # pylint: disable=g-import-not-at-top
  from koajax.data import inputs as inputs_lib  # pylint: disable=g-import-not-at-top

  batcher = Batcher(grader, window_s)
  info = grader.info()
  keep_dir = Path(keep).expanduser() if keep else None
  app = FastAPI(title='koajax', version=info['koajax'])
  app.state.batcher = batcher
  app.mount('/static', StaticFiles(directory=WEB_DIR), name='static')

  @app.get('/', include_in_schema=False)
  def page():
    return FileResponse(WEB_DIR / 'index.html')

  @app.get('/health')
  def health():
    return {'status': 'ok'}

  @app.get('/model')
  def model():
    return info

  @app.post('/predict')
  def predict(files: list[UploadFile] = File(default=[])):
    if not files:
      return JSONResponse({'detail': 'no file uploaded: send one or more '
                           'DICOMs or knee PNGs as multipart field "files"',
                           'knees': [], 'skipped': []}, status_code=400)
    skipped: list[inputs_lib.Skipped] = []
    knees = []
    too_large = 0
    with tempfile.TemporaryDirectory(prefix='koajax-upload-') as tmp:
      for i, upload in enumerate(files):
        name = _safe_name(upload.filename, i)
        data = upload.file.read(max_upload_bytes + 1)
        if not data:
          skipped.append(inputs_lib.Skipped(name, 'empty upload', 'empty'))
          continue
        if len(data) > max_upload_bytes:
          too_large += 1
          skipped.append(inputs_lib.Skipped(
              name, f'over the upload limit of {max_upload_bytes >> 20} MB',
              'too_large'))
          continue
        is_png = data.startswith(PNG_SIGNATURE)
        path = Path(tmp) / f'{i}{".png" if is_png else ".dcm"}'
        path.write_bytes(data)
        if keep_dir is not None:
          keep_dir.mkdir(parents=True, exist_ok=True)
          shutil.copyfile(path, keep_dir / f'{time.time_ns()}-{name}')
        source = inputs_lib.Source(path, name, 'png' if is_png else 'dicom')
        more, bad = grader.knees(source)
        knees += more
        skipped += bad
      results = batcher.grade(knees)
    answer = []
    for result in results:
      record = grader.record(result)
      record['gradcam_png'] = png_data_url(grader.overlay(result))
      answer.append(record)
    body = {'knees': answer, 'skipped': [s.as_dict() for s in skipped]}
    if answer:
      return body
    status = 413 if too_large == len(files) else 400
    reasons = '; '.join(f'{s.input}: {s.reason}' for s in skipped)
    return JSONResponse({'detail': f'no knee could be graded ({reasons})',
                         **body}, status_code=status)

  return app


def warm_up(grader) -> float:
  """Compiles the grading programs before the first request; seconds."""
  start = time.perf_counter()
  from koajax import grader as grader_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  roi = rng.integers(0, 256, (grader.roi_px, grader.roi_px), np.uint8)
  centre = (grader.roi_px - 1) / 2
  keypoints = np.full((16, 2), centre, np.float32)
  grader.grade([grader_lib.Knee('warm-up', 'warm-up', 'R', roi, keypoints,
                                'file')])
  return time.perf_counter() - start


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=f'python -m {PROGRAM}', description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True,
                      help='training run folder(s), comma-separated')
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--localizer', default=None)
  parser.add_argument('--keep', default=None,
                      help='copy every upload into this folder')
  parser.add_argument('--max_upload_mb', type=float, default=64.0)
  parser.add_argument('--checkpoint', default='best')
  parser.add_argument('--mc_samples', type=int, default=20)
  parser.add_argument('--batch_size', type=int, default=8)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  logging.getLogger('absl').setLevel(logging.ERROR)
  missing = [m for m in ('fastapi', 'uvicorn', 'multipart')
             if importlib.util.find_spec(m) is None]
  if missing:
    raise cli.BadInput(f'the service needs {", ".join(missing)}: pip '
                       'install -e \'.[serve]\'')
  import uvicorn  # pylint: disable=g-import-not-at-top
  from koajax import grader as grader_lib  # pylint: disable=g-import-not-at-top
  grader = grader_lib.Grader.load(
      [r for r in args.runs.split(',') if r], checkpoint=args.checkpoint,
      localizer=args.localizer, batch_size=args.batch_size,
      mc_samples=args.mc_samples)
  log.info('compiled in %.1f s', warm_up(grader))
  app = create_app(grader, max_upload_bytes=int(args.max_upload_mb * 2**20),
                   keep=args.keep)
  log.info('koajax serves %s on http://%s:%d/', ', '.join(grader.runs),
           args.host, args.port)
  uvicorn.run(app, host=args.host, port=args.port, log_level='warning')
  return cli.OK


if __name__ == '__main__':
  cli.run(PROGRAM, main)
