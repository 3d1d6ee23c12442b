"""What the data commands promise when things go wrong.

Every error a user can cause is one line `<program>: error: <message>` with
exit status 2; nothing good is destroyed (folders koajax did not write are
refused, outputs replace what was there in one step, kill -9 and Ctrl-C at
any moment leave it as it was, the next run cleans up after dead processes);
file paths appear as the manifest writes them, or not at all with
--redact_paths; DICOM header values never reach logs or outputs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from file_hashes import file_hashes
from koajax import cli
from koajax.data import atomic
from koajax.data import build
from koajax.data import cache
from koajax.data import gallery
from koajax.data import oai
from koajax.data import png_folders
from koajax.data import synthetic
from koajax.evaluation import compare
from koajax.evaluation import predictions as predictions_lib

REPO = Path(__file__).resolve().parents[1]
SYNTH = {'num_subjects': 2, 'seed': 1}  # 6 bilateral films, 12 knees
ROI_PX = 48


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
  """A tiny synthetic dataset (raw/) and its cache (cache/), both made
  without interruption: what every interrupted run must end up equal to."""
  root = tmp_path_factory.mktemp('data')
  synthetic.generate(root / 'raw', workers=1, show_progress=False, **SYNTH)
  build.build_cache(root / 'raw' / 'manifest.csv', root / 'cache',
                    roi_px=ROI_PX, workers=1)
  return root


@pytest.fixture(scope='module')
def identities(data) -> set[str]:
  """Patient names, ids and dates in the generated DICOM headers."""
  found = set()
  for path in (data / 'raw').glob('images/*/*.dcm'):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    found |= {str(ds[k].value) for k in (
        'PatientName', 'PatientID', 'PatientBirthDate', 'StudyDate',
        'AccessionNumber') if k in ds}
  assert len(found) > 5
  return found


@pytest.fixture(autouse=True)
def _private_tmp(tmp_path, monkeypatch):
  """koajax.cli's traceback files (and failed builds' summaries) go to this
  test's folder, not the machine's temporary folder."""
  folder = tmp_path / 'tmp'
  folder.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(folder))
  return folder


def _leftovers(target: Path) -> list[str]:
  """Partial, replaced or temporary siblings of `target`."""
  pattern = re.compile(rf'^(\.?){re.escape(target.name)}\.(partial|replaced|'
                       r'tmp)-\d+$')
  return sorted(p.name for p in target.parent.iterdir()
                if pattern.match(p.name))


def _call(program: str, main, argv, capsys) -> tuple[int, str]:
  """Exit status and stderr of a command run as `cli.run` runs it."""
  capsys.readouterr()
  code = cli.call(program, main, [str(a) for a in argv])
  return code, capsys.readouterr().err


def _one_error_line(program: str, err: str) -> str:
  """The message of koajax's one error line, checked to be alone."""
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  prefix = f'{program}: error: '
  assert lines[0].startswith(prefix), err
  return lines[0][len(prefix):]


# ---------------------------------------------------------- manifests ----


def _manifest_folder(data: Path, folder: Path) -> Path:
  """A copy of the tiny dataset's manifest and landmarks whose paths
  point at its images."""
  folder.mkdir(parents=True)
  df = pd.read_csv(data / 'raw' / 'manifest.csv', dtype=str,
                   keep_default_na=False)
  df['path'] = [os.path.relpath(data / 'raw' / p, folder) for p in df.path]
  df.to_csv(folder / 'manifest.csv', index=False)
  shutil.copy(data / 'raw' / 'landmarks.csv', folder / 'landmarks.csv')
  return folder / 'manifest.csv'


def _manifest_cases(text: str) -> dict[str, tuple[bytes, str]]:
  """Broken versions of a manifest's `text`: bytes and the message (with
  {path} for the file)."""
  header, first = text.splitlines()[:2]
  latin = (header + '\n' + first.replace(first.split(',')[3], 'Genève', 1)
           ).encode('latin-1')
  offset = latin.index('è'.encode('latin-1'))
  ragged = header + '\n' + first + ',extra,cells\n'
  columns = len(header.split(','))
  missing = ','.join(c for c in header.split(',')
                     if c not in ('site', 'kl')) + '\n'
  return {
      'empty': (b'', '{path} is empty; a manifest file has a header line of '
                'column names and one row per line'),
      'blank lines': (b'\n \n\n', '{path} is empty;'),
      'latin-1': (latin, f'{{path}} is not UTF-8 text (byte 0xe8 at offset '
                  f'{offset}, line 2): save it as UTF-8'),
      'utf-16': (text.encode('utf-16'), '{path} is UTF-16 text ("Unicode '
                 'text" in spreadsheets): save it as CSV UTF-8'),
      'semicolons': (text.replace(',', ';').encode(), "{path} uses ';' as "
                     'its delimiter; koajax reads comma-separated files: '
                     'save it with commas'),
      'tabs': (text.replace(',', '\t').encode(), '{path} uses tabs as its '
               'delimiter; koajax reads comma-separated files'),
      'header only': ((header + '\n').encode(), '{path} has a header but no '
                      'rows; a manifest file lists one knee per row'),
      'extra cells': (ragged.encode(), f'{{path}} line 2 has {columns + 2} '
                      f'fields, the header {columns}: every row needs as '
                      'many comma-separated fields as the header'),
      'missing columns': (missing.encode(), '{path}: missing column(s) '
                          'site, kl; a manifest file has columns subject_id'),
  }


def test_bad_manifests_are_one_line_exit_2_and_touch_nothing(
    data, tmp_path, capsys):
  manifest = _manifest_folder(data, tmp_path / 'study')
  text = manifest.read_text()
  out = tmp_path / 'cache'
  shutil.copytree(data / 'cache', out)  # a cache the failures must keep
  before = file_hashes(out)
  for name, (content, message) in _manifest_cases(text).items():
    bad = tmp_path / 'study' / 'bad.csv'
    bad.write_bytes(content)
    code, err = _call('koajax.data.build', build.main, [
        f'--manifest={bad}', f'--out={out}', f'--roi_px={ROI_PX}',
        f'--landmarks={manifest.with_name("landmarks.csv")}', '--workers=1'],
                      capsys)
    assert code == cli.BAD_INPUT, (name, err)
    assert _one_error_line('koajax.data.build', err).startswith(
        message.format(path=bad)), (name, err)
    assert file_hashes(out) == before, name
    assert not _leftovers(out), name

  # The landmarks file is checked the same way.
  marks = manifest.with_name('landmarks.csv')
  marks.write_text(marks.read_text().replace(',', ';'))
  code, err = _call('koajax.data.build', build.main, [
      f'--manifest={manifest}', f'--out={out}', '--workers=1'], capsys)
  assert code == cli.BAD_INPUT
  assert _one_error_line('koajax.data.build', err).startswith(
      f"{marks} uses ';' as its delimiter")
  assert file_hashes(out) == before


# --------------------------------------------------- refused folders ----


def test_build_refuses_a_folder_that_is_not_a_cache(data, tmp_path, capsys):
  manifest = data / 'raw' / 'manifest.csv'
  cases = {
      # The user's own index and summary: the names of cache files.
      'own files': ({'index.csv': 'knee_id,kl\nmine,3\n',
                     'summary.json': '{"study": "mine"}\n'},
                    'index.csv, summary.json'),
      'a cache and a note': ({'notes.txt': 'keep me'}, 'notes.txt'),
      'another meta.json': ({'meta.json': '{"owner": "me"}',
                             'index.csv': 'a\n'}, 'meta.json'),
  }
  for name, (files, shown) in cases.items():
    out = tmp_path / name.replace(' ', '_')
    if name == 'a cache and a note':
      shutil.copytree(data / 'cache', out)
    out.mkdir(exist_ok=True)
    for file, content in files.items():
      (out / file).write_text(content)
    before = file_hashes(out)
    code, err = _call('koajax.data.build', build.main, [
        f'--manifest={manifest}', f'--out={out}', '--workers=1'], capsys)
    assert code == cli.BAD_INPUT, (name, err)
    assert _one_error_line('koajax.data.build', err).startswith(
        f'{out} holds files that are not a koajax cache ({shown}); koajax '
        'replaces only its own caches: give a new or empty folder for the '
        'cache'), (name, err)
    assert file_hashes(out) == before, name
    assert not _leftovers(out), name

  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  code, err = _call('koajax.data.build', build.main, [
      f'--manifest={manifest}', f'--out={a_file}'], capsys)
  assert code == cli.BAD_INPUT
  assert _one_error_line('koajax.data.build', err).startswith(
      f'{a_file} is a file, not a folder')
  assert a_file.read_text() == 'mine'


def test_generation_refuses_a_folder_it_did_not_write(tmp_path, capsys):
  out = tmp_path / 'study'
  (out / 'images').mkdir(parents=True)
  (out / 'images' / 'knee.dcm').write_bytes(b'DICM' * 10)
  (out / 'manifest.csv').write_text('subject_id\n1\n')
  before = file_hashes(out)
  code, err = _call('koajax.data.synthetic', synthetic.main, [
      f'--out={out}', '--num_subjects=1', '--workers=1'], capsys)
  assert code == cli.BAD_INPUT
  assert _one_error_line('koajax.data.synthetic', err).startswith(
      f'{out} holds files that are not a koajax synthetic dataset (images, '
      'manifest.csv); koajax replaces only datasets it generated')
  assert file_hashes(out) == before and not _leftovers(out)


def test_png_folders_refuse_split_folders_they_did_not_write(tmp_path, capsys):
  from PIL import Image
  root = tmp_path / 'pngs'
  (root / 'test' / '2').mkdir(parents=True)
  Image.new('L', (16, 16), 90).save(root / 'test' / '2' / '9000001R.png')
  out = tmp_path / 'out'
  (out / 'test').mkdir(parents=True)
  (out / 'test' / 'mine.txt').write_text('keep')
  before = file_hashes(out)
  code, err = _call('koajax.data.png_folders', png_folders.main, [
      f'--root={root}', f'--out={out}', '--roi_px=16'], capsys)
  assert code == cli.BAD_INPUT
  assert _one_error_line('koajax.data.png_folders', err).startswith(
      f'{out / "test"} holds files that are not a koajax cache (mine.txt)')
  assert file_hashes(out) == before

  (out / 'test' / 'mine.txt').unlink()
  assert png_folders.main([f'--root={root}', f'--out={out}',
                           '--roi_px=16']) == cli.OK
  assert len(cache.open_cache(out / 'test')) == 1
  # A second run replaces its own caches and summary.
  assert png_folders.main([f'--root={root}', f'--out={out}',
                           '--roi_px=8']) == cli.OK
  assert cache.open_cache(out / 'test').meta['roi_px'] == 8
  assert not _leftovers(out / 'test')


# ------------------------------------------------- stale partial folders --


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_partial_folders_of_stopped_processes_are_removed(data, tmp_path):
  out = tmp_path / 'cache'
  dead = _dead_pid()
  stale = atomic.partial_path(out, dead)
  stale.mkdir()
  (stale / 'knees.array_record').write_bytes(b'\0' * (1 << 20))
  stale_tmp = tmp_path / f'.cache.tmp-{dead}'
  stale_tmp.write_text('half a file')
  sleeper = subprocess.Popen(
      [sys.executable, '-c', 'import time; time.sleep(120)'])
  try:
    time.sleep(0.05)
    live = atomic.partial_path(out, sleeper.pid)  # made by a running process
    live.mkdir()
    (live / 'knees.array_record').write_bytes(b'\1')
    unrelated = tmp_path / f'cache.partial-{dead}.bak'
    unrelated.mkdir()

    build.build_cache(data / 'raw' / 'manifest.csv', out, roi_px=ROI_PX,
                      workers=1)
    assert len(cache.open_cache(out)) == 12
    assert not stale.exists() and not stale_tmp.exists()
    assert (live / 'knees.array_record').read_bytes() == b'\1'
    assert unrelated.is_dir()

    # The same pid on a folder last changed before that process started is
    # someone else's leftover (pids are reused).
    hour_ago = time.time() - 3600
    os.utime(live, (hour_ago, hour_ago))
    assert not atomic.owner_alive(sleeper.pid, hour_ago)
    assert atomic.owner_alive(sleeper.pid, time.time())
    assert atomic.clean_stale(out) == [live.name]
    assert not live.exists()
  finally:
    sleeper.kill()
    sleeper.wait()

  # A zombie (exited, not yet reaped) owns nothing.
  zombie = subprocess.Popen([sys.executable, '-c', 'pass'])
  deadline = time.time() + 30
  while Path(f'/proc/{zombie.pid}/stat').read_text().split(')')[1].split()[0] \
      != 'Z':
    assert time.time() < deadline
    time.sleep(0.01)
  assert not atomic.owner_alive(zombie.pid, time.time())
  zombie.wait()


def test_a_folder_being_replaced_by_a_stopped_process_comes_back(tmp_path):
  target = tmp_path / 'raw'
  dead = _dead_pid()
  replaced = atomic.partial_path(target, dead, kind='replaced')
  replaced.mkdir()
  (replaced / 'manifest.csv').write_text('old')
  newer = atomic.partial_path(target, dead)
  newer.mkdir()
  assert sorted(atomic.clean_stale(target)) == sorted([replaced.name,
                                                      newer.name])
  assert (target / 'manifest.csv').read_text() == 'old'
  assert not _leftovers(target)
  # When the new folder made it into place, the old one is removed.
  replaced.mkdir()
  assert atomic.clean_stale(target) == [replaced.name]
  assert (target / 'manifest.csv').read_text() == 'old'
  assert not _leftovers(target)


# ----------------------------------------------- kill -9 and Ctrl-C ----


def _env(tmp: Path) -> dict[str, str]:
  return {**os.environ, 'PYTHONPATH': str(REPO), 'TMPDIR': str(tmp)}


def _stop_when(proc: subprocess.Popen, when, sig=signal.SIGKILL,
               timeout: float = 60.0) -> bool:
  """Sends `sig` when `when(pid)` is true, or after `when` seconds; False if
  the process ended first, including in the instant between the moment
  coming and the signal (it then exits 0; a signalled one does not)."""
  deadline = time.monotonic() + timeout
  start = time.monotonic()
  while proc.poll() is None:
    due = (time.monotonic() - start >= when if isinstance(when, float)
           else when(proc.pid))
    if due:
      proc.send_signal(sig)
      proc.wait()
      return proc.returncode != 0
    assert time.monotonic() < deadline, 'the moment never came'
    time.sleep(0.001)
  return False


def _kill_and_rerun(cmd, out: Path, moments, *, old: Path | None,
                    reference: dict[str, str], skip: tuple[str, ...],
                    tmp: Path, identities: set[str]) -> list[str]:
  """Kills `cmd` at each moment, with `out` absent or holding a copy of
  `old` (alternately); checks that `out` is as it was or, if the run got
  that far, the complete new output, never anything between; that a rerun
  makes `reference` and leaves nothing beside it. Returns the moments at
  which runs were killed before their output replaced the old one."""
  killed = []
  for i, (name, when) in enumerate(moments):
    if old is not None and i % 2:
      shutil.copytree(old, out)
    before = file_hashes(out)
    assert before != reference
    with open(tmp / 'killed.log', 'wb') as log:
      proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=_env(tmp))
      stopped = _stop_when(proc, when)
    assert proc.returncode == (-signal.SIGKILL if stopped else 0), (
        (tmp / 'killed.log').read_text())
    if file_hashes(out) == before:
      killed.append(name)
    else:  # killed after the new output took the old one's place
      assert file_hashes(out, skip) == reference, f'killed {name}: {out} changed'

    rerun = subprocess.run(cmd, capture_output=True, env=_env(tmp),
                           timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert file_hashes(out, skip) == reference, f'rerun after {name}'
    assert not _leftovers(out), f'rerun after {name}'
    logs = rerun.stdout + rerun.stderr + (tmp / 'killed.log').read_bytes()
    assert not [v for v in identities if v.encode() in logs]
    if i < len(moments) - 1:
      shutil.rmtree(out)  # the last rerun's output stays for the caller
  return killed


def test_kill_9_during_generation_then_rerun(data, tmp_path, identities):
  out = tmp_path / 'work' / 'raw'
  out.parent.mkdir()
  old = tmp_path / 'old'  # another dataset, there before the killed runs
  synthetic.generate(old, num_subjects=1, seed=7, workers=1,
                     show_progress=False)
  cmd = [sys.executable, '-m', 'koajax.data.synthetic', f'--out={out}',
         f'--num_subjects={SYNTH["num_subjects"]}', f'--seed={SYNTH["seed"]}',
         '--workers=1']
  partial = lambda pid: atomic.partial_path(out, pid)
  rng = np.random.default_rng(0)
  moments = [
      ('when its folder appears', lambda pid: partial(pid).is_dir()),
      ('after its second image', lambda pid: len(list(
          partial(pid).glob('images/*/*.dcm'))) >= 2),
      ('once the manifest is written',
       lambda pid: (partial(pid) / synthetic.MANIFEST).exists()),
      *[(f'after {t:.2f} s', float(t)) for t in rng.uniform(0.3, 1.5, 2)],
  ]
  killed = _kill_and_rerun(cmd, out, moments, old=old,
                           reference=file_hashes(data / 'raw'), skip=(),
                           tmp=tmp_path, identities=identities)
  # Those two are long before the dataset is complete.
  assert {'when its folder appears', 'after its second image'} <= set(killed)


def test_kill_9_during_build_then_rerun(data, tmp_path, identities):
  out = tmp_path / 'work' / 'cache'
  out.parent.mkdir()
  manifest = data / 'raw' / 'manifest.csv'
  old = tmp_path / 'old'  # a cache of other knees' size, there before
  build.build_cache(manifest, old, roi_px=32, workers=1)
  cmd = [sys.executable, '-m', 'koajax.data.build', f'--manifest={manifest}',
         f'--out={out}', f'--roi_px={ROI_PX}', '--workers=1']
  partial = lambda pid: atomic.partial_path(out, pid)
  rng = np.random.default_rng(1)
  moments = [
      ('when its folder appears', lambda pid: partial(pid).is_dir()),
      ('when its index is written',
       lambda pid: (partial(pid) / cache.INDEX).exists()),
      *[(f'after {t:.2f} s', float(t)) for t in rng.uniform(0.3, 1.5, 2)],
  ]
  # summary.json holds the build's duration; everything else is compared.
  reference = file_hashes(data / 'cache', skip=(cache.SUMMARY,))
  killed = _kill_and_rerun(cmd, out, moments, old=old, reference=reference,
                           skip=(cache.SUMMARY,), tmp=tmp_path,
                           identities=identities)
  assert 'when its folder appears' in killed
  # The rebuilt knees are the reference's, record by record.
  a, b = cache.open_cache(out), cache.open_cache(data / 'cache')
  pd.testing.assert_frame_equal(a.index, b.index)
  for i in range(len(a)):
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    np.testing.assert_array_equal(a[i]['keypoints'], b[i]['keypoints'])


def _ctrl_c_as_at_a_terminal():
  """Ctrl-C's default action in the child. A process started in the
  background of a non-interactive shell (`pytest ... &`) ignores SIGINT, and
  so would every command it starts: koajax keeps a disposition it finds, as
  a background job should."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize('program', ['koajax.data.build',
                                     'koajax.data.synthetic'])
def test_ctrl_c_leaves_the_folder_as_it_was(program, data, tmp_path):
  out = tmp_path / 'out'
  old = data / ('cache' if program == 'koajax.data.build' else 'raw')
  if program == 'koajax.data.build':
    args = [f'--manifest={data / "raw" / "manifest.csv"}', '--roi_px=32',
            '--workers=1']
  else:
    args = ['--num_subjects=2', '--seed=5', '--workers=1']
  # The command takes under a second; on a busy machine this test may not
  # get the CPU back before it is done, and a finished command has nothing
  # left to interrupt. Such an attempt must leave nothing partial behind;
  # the next one starts from the old folder again.
  for _ in range(3):
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(old, out)
    before = file_hashes(out)
    proc = subprocess.Popen([sys.executable, '-m', program, f'--out={out}',
                             *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=_env(tmp_path),
                            preexec_fn=_ctrl_c_as_at_a_terminal)
    stopped = _stop_when(proc,
                         lambda pid: atomic.partial_path(out, pid).is_dir(),
                         sig=signal.SIGINT)
    err = proc.stderr.read().decode()
    if not stopped:  # done before the signal: no partial left
      assert not _leftovers(out), err
      continue
    assert proc.returncode == cli.INTERRUPTED, err
    assert err.strip().splitlines()[-1] == f'{program}: interrupted'
    assert file_hashes(out) == before
    assert not _leftovers(out)  # removed on the way out, not left for later
    return
  pytest.fail(f'{program} finished before Ctrl-C reached it, 3 times')


@pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_ctrl_c_python_drops_still_keeps_the_folder(tmp_path, capsys):
  """Python drops a KeyboardInterrupt raised inside a weakref callback (the
  import system runs some), so a command can run on after Ctrl-C; what it
  would write must not replace the old output."""
  target = tmp_path / 'out'
  target.mkdir()
  (target / 'old.txt').write_text('old')

  def main():
    class Thing:
      pass
    thing = Thing()
    ref = weakref.ref(thing, lambda _: cli._on_interrupt(signal.SIGINT, None))
    del thing  # the callback's KeyboardInterrupt is printed and dropped
    assert ref() is None
    partial = atomic.new_partial(target)
    (partial / 'new.txt').write_text('new')
    atomic.publish(partial, target)

  assert cli.call('koajax.test', main) == cli.INTERRUPTED
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      'koajax.test: interrupted')
  assert [p.name for p in target.iterdir()] == ['old.txt']
  atomic.discard_own(target)
  assert cli.call('koajax.test', lambda: atomic.write_text(
      target / 'old.txt', 'new')) == cli.OK
  assert (target / 'old.txt').read_text() == 'new'  # the next command runs
  assert not _leftovers(target)


# --------------------------------------------------- paths as given ----


def _study(data: Path, tmp_path: Path) -> tuple[Path, str]:
  """A manifest in a folder named like a patient, with a missing file and
  a knee whose landmarks lie outside its image; returns it and the path of
  that image as the manifest writes it."""
  manifest = _manifest_folder(data, tmp_path / 'DOE_JANE_19500101' / 'study')
  df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
  marks = pd.read_csv(manifest.with_name('landmarks.csv'), dtype=str,
                      keep_default_na=False)
  written = df.path.iloc[0]
  extra = [{**df.iloc[0].to_dict(), 'subject_id': 'S99', 'side': side,
            'path': 'images/missing.dcm'} for side in ('R', 'L')]
  extra.append({**df.iloc[0].to_dict(), 'subject_id': 'S98'})
  pd.concat([df, pd.DataFrame(extra)]).to_csv(manifest, index=False)
  far = marks.iloc[0].copy()
  far['subject_id'] = 'S98'
  far.iloc[3:] = [str(float(v) * 10) for v in far.iloc[3:]]
  near = [{**marks.iloc[0].to_dict(), 'subject_id': 'S99', 'side': side}
          for side in ('R', 'L')]
  pd.concat([marks, pd.DataFrame([far.to_dict(), *near])]).to_csv(
      manifest.with_name('landmarks.csv'), index=False)
  return manifest, written


def test_paths_as_the_manifest_writes_them(data, tmp_path, capsys, caplog,
                                           identities):
  caplog.set_level(logging.INFO)
  manifest, written = _study(data, tmp_path)
  assert 'DOE_JANE' not in written
  out = tmp_path / 'cache'
  assert build.main([f'--manifest={manifest}', f'--out={out}',
                     f'--roi_px={ROI_PX}', '--workers=1']) == cli.OK
  summary = json.loads((out / cache.SUMMARY).read_text())
  skipped = {s['kind']: s for s in summary['skipped']}
  assert skipped['missing_file']['where'] == 'images/missing.dcm'
  assert skipped['missing_file']['knees'] == ['S99_v00_R', 'S99_v00_L']
  assert skipped['bad_landmarks']['reason'].endswith(f'({written})')
  assert 'skipped images/missing.dcm: file not found' in caplog.text
  # No folder above the manifest shows, in the skips or in the logs.
  assert 'DOE_JANE' not in json.dumps(summary['skipped'])
  assert 'DOE_JANE' not in caplog.text + capsys.readouterr().err
  assert summary['manifest'] == str(manifest)  # as given on the command line
  text = caplog.text + (out / cache.SUMMARY).read_text()
  assert not [v for v in identities if v in text]


def test_redact_paths_names_knees_by_id_only(data, tmp_path, capsys, caplog,
                                             identities):
  caplog.set_level(logging.INFO)
  manifest, _ = _study(data, tmp_path)
  out = tmp_path / 'cache'
  assert build.main([f'--manifest={manifest}', f'--out={out}', '--workers=1',
                     f'--roi_px={ROI_PX}', '--redact_paths']) == cli.OK
  summary = json.loads((out / cache.SUMMARY).read_text())
  assert summary['paths_redacted'] is True and 'manifest' not in summary
  skipped = {s['kind']: s for s in summary['skipped']}
  assert skipped['missing_file']['where'] == 'knees S99_v00_R, S99_v00_L'
  assert skipped['bad_landmarks']['where'] == 'manifest row 16 (S98, 0, R)'
  assert 'skipped knees S99_v00_R, S99_v00_L: file not found' in caplog.text
  assert len(cache.open_cache(out)) == 12

  # A failed build says so without paths too.
  code = build.main([f'--manifest={manifest}', f'--out={tmp_path / "c2"}',
                     '--workers=1', f'--roi_px={ROI_PX}', '--redact_paths',
                     '--strict'])
  assert code == cli.FAILED
  texts = caplog.text + capsys.readouterr().err + ''.join(
      p.read_text() for d in (out, tmp_path / 'c2') for p in d.iterdir()
      if p.suffix in ('.json', '.csv'))
  assert 'listed in summary.json in the cache folder' in texts
  for leak in ('DOE_JANE', str(tmp_path), '.dcm', 'images/', 'study',
               *identities):
    assert leak not in texts, leak


# -------------------------------------------- predictions and others ----


def _predictions(path: Path, n: int = 40, seed: int = 0) -> pd.DataFrame:
  """Predictions of one run: the same knees and grades whatever the seed."""
  grades = np.random.default_rng(0).integers(0, 5, n)
  probs = np.random.default_rng(seed).dirichlet(np.ones(5), n)
  frame = predictions_lib.predictions_frame(
      knee_ids=[f'9{i:06d}_v00_R' for i in range(n)], sides=['R'] * n,
      y_true=grades, probs=probs)
  frame.to_csv(path, index=False)
  return frame


def test_compare_names_the_file_that_is_not_predictions(data, tmp_path,
                                                        capsys):
  a, b = tmp_path / 'a.csv', tmp_path / 'b.csv'
  frame = _predictions(a)
  result = tmp_path / 'result.json'
  result.write_text('{"earlier": true}\n')

  def check(b_frame_or_bytes, message):
    if isinstance(b_frame_or_bytes, bytes):
      b.write_bytes(b_frame_or_bytes)
    else:
      b_frame_or_bytes.to_csv(b, index=False)
    code, err = _call('koajax.evaluation.compare', compare.main,
                      [f'--a={a}', f'--b={b}', f'--out={result}'], capsys)
    assert code == cli.BAD_INPUT, err
    assert _one_error_line('koajax.evaluation.compare', err).startswith(
        message), err
    assert result.read_text() == '{"earlier": true}\n'

  nan = frame.copy()
  nan.loc[[3, 7, 8], 'p2'] = np.nan
  check(nan, f'{b}: 3 of 40 rows hold NaN or infinite probabilities (first: '
        'line 5, knee 9000003_v00_R); evaluate the run again')
  inf = frame.copy()
  inf.loc[39, 'p0'] = np.inf
  check(inf, f'{b}: 1 of 40 rows hold NaN or infinite probabilities (first: '
        'line 41, knee 9000039_v00_R)')
  check((data / 'raw' / 'manifest.csv').read_bytes(),
        f'{b} is not a koajax predictions CSV: it lacks knee_id, p0..p<C-1> '
        '(class probabilities); koajax writes knee_id, side')
  check(frame.drop(columns=['kl']),
        f'{b} is not a koajax predictions CSV: it lacks a true-grade column '
        'such as kl')
  check(frame.to_csv(index=False, sep=';').encode(),
        f"{b} uses ';' as its delimiter")
  check(b'', f'{b} is empty')

  # Too few subjects for the chunks: say how many chunks would do.
  _predictions(b, seed=1)
  code, err = _call('koajax.evaluation.compare', compare.main,
                    [f'--a={a}', f'--b={b}', '--n_chunks=41'], capsys)
  assert code == cli.BAD_INPUT
  assert _one_error_line('koajax.evaluation.compare', err).startswith(
      f'{a} and {b} hold 40 subjects, too few for 41 subject-disjoint chunks; '
      'pass --n_chunks=40 or fewer')

  # Good files still compare, and the result replaces the earlier one.
  assert compare.main([f'--a={a}', f'--b={b}', f'--out={result}',
                       '--n_chunks=5'])['n_knees'] == 40
  assert json.loads(result.read_text())['n_knees'] == 40
  assert not _leftovers(result)


def test_other_commands_name_bad_input(data, tmp_path, capsys):
  # OAI: an images file with semicolons, a table that is no grade table; an
  # earlier manifest stays.
  out = tmp_path / 'manifest.csv'
  out.write_text('earlier\n')
  images = tmp_path / 'images.csv'
  images.write_text('subject_id;visit;path\n9000001;0;a.dcm\n')
  table = data / 'raw' / 'truth.csv'
  code, err = _call('koajax.data.oai', oai.main, [
      f'--grades={table}', f'--images={images}', f'--out={out}'], capsys)
  assert code == cli.BAD_INPUT
  assert _one_error_line('koajax.data.oai', err).startswith(
      f'{table} is not an OAI reading table (ID, SIDE, VxxXRKL, ...) nor a '
      'MOST x-ray table')
  assert out.read_text() == 'earlier\n'
  with pytest.raises(cli.BadInput, match=f"{images} uses ';' as its "
                     'delimiter'):
    oai.read_images(images, kind='oai', issues=[])

  # Gallery: a folder that is no cache; an earlier picture stays.
  png = tmp_path / 'grid.png'
  png.write_bytes(b'earlier')
  code, err = _call('koajax.data.gallery', gallery.main, [
      f'--cache={data / "raw"}', f'--out={png}'], capsys)
  assert code == cli.BAD_INPUT
  assert _one_error_line('koajax.data.gallery', err).startswith(
      f'{data / "raw"} is not a complete koajax cache (no meta.json)')
  assert png.read_bytes() == b'earlier'
  assert gallery.main([f'--cache={data / "cache"}', f'--out={png}',
                       '--per_grade=2']) == cli.OK
  assert png.read_bytes().startswith(b'\x89PNG') and not _leftovers(png)

  # Learning curves: no runs, metrics that are not JSON.
  from koajax.active import curves
  with pytest.raises(cli.BadInput, match='--runs names no run'):
    curves.overlay([])
  bad = tmp_path / 'metrics.json'
  bad.write_text('{not json')
  with pytest.raises(cli.BadInput, match=f'--full_data: {bad} is not the '
                     'metrics.json of a koajax run'):
    curves._full_data(bad)  # pylint: disable=protected-access


# Each command, run as users run it, with input it cannot use: exit 2 and
# one line naming the input as given, nothing written.
COMMANDS = {
    'koajax.data.build': (['--manifest=nope.csv', '--out=cache'],
                          'manifest file not found: nope.csv'),
    'koajax.data.synthetic': (['--out=raw', '--num_subjects=0'],
                              '--num_subjects=0: give 1 or more'),
    'koajax.data.oai': (['--grades=nope.txt', '--images=i.csv',
                         '--out=m.csv'], 'table not found: nope.txt'),
    'koajax.data.png_folders': (['--root=nope', '--out=out'],
                                '--root nope is not a folder'),
    'koajax.data.gallery': (['--cache=nope', '--out=g.png'],
                            'nope is not a complete koajax cache'),
    'koajax.evaluation.compare': (['--a=nope.csv', '--b=nope.csv'],
                                  'predictions file not found: nope.csv'),
    'koajax.active.curves': (['--runs=nope'], 'nope/curve.csv not found: '
                             'nope is not a finished active-learning run'),
}


@pytest.mark.parametrize('program', sorted(COMMANDS))
def test_commands_exit_2_with_one_line(program, tmp_path):
  args, message = COMMANDS[program]
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  result = subprocess.run([sys.executable, '-m', program, *args], cwd=cwd,
                          capture_output=True, env=_env(tmp_path / 'tmp'),
                          timeout=120, check=False)
  err = result.stderr.decode()
  assert result.returncode == cli.BAD_INPUT, err
  text = _one_error_line(program, err)
  assert text.startswith(message), err
  assert 'Traceback' not in err
  assert not list(cwd.iterdir())
