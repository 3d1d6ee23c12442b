"""koajax's promises about runs: one run per workdir, values checked when the
config is read, a diverged run never reports, errors as one line.

The data side (builds, manifests, paths) is in test_reliability_data.py and
damaged checkpoints in test_reliability_checkpoints.py.
"""

import json
import logging
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest

from config_loader import load_config
from config_loader import smoke_config
from file_hashes import file_hashes
from koajax import cli
from koajax import config_checks
from koajax import train
from koajax.train import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def tree_hashes(directory):
  """File hashes under `directory` but the lock's (which says who holds the
  workdir)."""
  return file_hashes(directory, skip=(workdir_lib.LOCK_FILE,))


def run_command(*args, env=None):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, **(env or {})})


# -- values checked when the config is read ---------------------------------

@pytest.mark.parametrize('field,value,says', [
    ('batch_size', 0, 'batch_size must be an integer >= 1; got 0'),
    ('batch_size', -8, 'batch_size must be an integer >= 1; got -8'),
    ('unlabeled_batch_size', -1, 'unlabeled_batch_size must be an integer'),
    ('eval_batch_size', 0, 'eval_batch_size must be an integer >= 1'),
    ('optimizer.learning_rate', math.nan,
     'optimizer.learning_rate must be a finite number > 0.0; got nan'),
    ('optimizer.learning_rate', 0.0, 'optimizer.learning_rate must be'),
    ('optimizer.learning_rate', math.inf, 'optimizer.learning_rate must be'),
    ('optimizer.b2', 1.0, 'optimizer.b2 must be a finite number >= 0.0 and '
     '< 1.0'),
    ('optimizer.warmup_epochs', -1.0, 'optimizer.warmup_epochs must be'),
    ('num_epochs', 0, 'num_epochs must be an integer >= 1; got 0'),
    ('eval_every_epochs', 0, 'eval_every_epochs must be a finite number > 0'),
    ('log_every_steps', 0, 'log_every_steps must be an integer >= 1'),
    ('view_size', 8, "view_size must be 0 (the view's own size) or >= 16"),
    ('view_size', -1, 'view_size must be an integer >= 0'),
    ('data.roi_mm', 0.0, 'data.roi_mm must be a finite number >= 20.0'),
    ('data.roi_mm', math.nan, 'data.roi_mm must be a finite number'),
    ('data.roi_px', 4, 'data.roi_px must be an integer in [32, 4096]'),
    ('data.synthetic.num_subjects', 0,
     'data.synthetic.num_subjects must be an integer >= 1'),
    ('data.source', 'oai', 'data.source must be one of synthetic, manifest'),
    ('split.labels_per_grade', 0, 'split.labels_per_grade must be an '
     'integer >= 1'),
    ('split.fold', 7, 'split.fold must be an integer in [0, '),
    ('split.labeled_fraction', 1.5, 'split.labeled_fraction'),
    ('predict.tta', 'ten_crop', "predict.tta must be 'none' or 'five_crop'"),
    ('predict.tta_crop', 400, 'predict.tta_crop must lie in 1..'),
    ('task', 'womac', "unknown task 'womac'"),
    ('method', 'semimix', "unknown method 'semimix'"),
])
def test_bad_values_are_named_when_the_config_is_read(field, value, says):
  config = load_config('semixup', 'smoke')
  node = config
  *path, leaf = field.split('.')
  for part in path:
    node = node[part]
  node[leaf] = value
  if field == 'predict.tta_crop':
    config.predict.tta = 'five_crop'
  with pytest.raises(cli.BadInput) as e:
    config_checks.check(config)
  assert says in str(e.value)
  assert field in str(e.value) or field in ('task', 'method')


def test_every_shipped_preset_passes_the_checks():
  for path in sorted((REPO / 'configs').glob('*.py')):
    module = path.stem
    for preset in ('default', 'quick', 'smoke'):
      try:
        config = load_config(module, preset)
      except ValueError as e:
        assert 'unknown preset' in str(e)
        continue
      config_checks.check(config)


def test_bad_value_on_the_command_line_is_one_line_and_exit_2(tmp_path):
  workdir = tmp_path / 'run'
  result = run_command('-m', 'koajax.main',
                       '--config=configs/supervised.py:smoke',
                       f'--workdir={workdir}', '--config.batch_size=0')
  assert result.returncode == cli.BAD_INPUT
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('koajax.main: error: config field batch_size '
                              'must be an integer >= 1; got 0')
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()  # refused before touching anything
  result = run_command('-m', 'koajax.main', '--config=configs/supervised.py:'
                       'smoke', f'--workdir={workdir}',
                       '--config.optimizer.learning_rate=nan', '--verbose')
  assert result.returncode == cli.BAD_INPUT
  assert 'Traceback' in result.stderr  # --verbose shows where
  assert 'optimizer.learning_rate must be a finite number' in result.stderr


def test_unknown_preset_and_field_are_one_line(tmp_path):
  for args, says in [
      (['--config=configs/semixup.py:fast'], "unknown preset 'fast'"),
      (['--config=configs/semixup.py:smoke', '--config.batchsize=3'],
       "the config has no field 'batchsize'"),
      (['--config=configs/nope.py'], "cannot load the config file"),
  ]:
    result = run_command('-m', 'koajax.main', *args,
                         f'--workdir={tmp_path / "w"}')
    assert result.returncode == cli.BAD_INPUT, result.stderr
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_switching_method_resets_its_options(caplog):
  config = load_config('semixup', 'smoke')
  config.method = 'supervised'
  with caplog.at_level(logging.WARNING, logger='koajax'):
    config_checks.check(config)
  assert dict(config.method_kwargs) == {}
  assert "reset to the defaults of method 'supervised'" in caplog.text
  config = load_config('supervised', 'smoke')
  config.method = 'mixup'
  config_checks.check(config)  # supervised has no options: mixup's kept
  assert set(config.method_kwargs) == set(
      load_config('mixup', 'smoke').method_kwargs)


def test_exit_codes_of_failures():
  assert cli.exit_code(KeyboardInterrupt()) == cli.INTERRUPTED
  assert cli.exit_code(cli.BadInput('x')) == cli.BAD_INPUT
  assert cli.exit_code(FileNotFoundError('x')) == cli.BAD_INPUT
  assert cli.exit_code(RuntimeError('x')) == cli.FAILED
  try:  # a ValueError from inside a library is a failure, not bad input
    json.loads('{')
  except ValueError as e:
    assert cli.exit_code(e) == cli.FAILED
  assert cli.call('x', lambda: 0) == cli.OK
  assert cli.call('x', lambda: (_ for _ in ()).throw(KeyboardInterrupt())) \
      == cli.INTERRUPTED


# -- a workdir holds one run ---------------------------------------------------

@pytest.fixture(scope='module')
def finished_run(data_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  train.train_and_evaluate(smoke_config('supervised', data_root), workdir)
  return workdir


@pytest.mark.parametrize('name,field,value,says', [
    ('supervised', 'model.width', 4, 'model.width: 2 in the run, 4 now'),
    ('supervised', 'optimizer.learning_rate', 1e-3,
     'optimizer.learning_rate: 0.0001 in the run, 0.001 now'),
    ('supervised', 'seed', 1, 'seed: 0 in the run, 1 now'),
    ('semixup', None, None, "method: 'supervised' in the run, 'semixup' now"),
])
def test_another_run_in_a_workdir_is_refused_untouched(
    finished_run, data_root, name, field, value, says):
  before = tree_hashes(finished_run)
  config = smoke_config(name, data_root, **({field: value} if field else {}))
  with pytest.raises(cli.BadInput) as e:
    train.train_and_evaluate(config, finished_run)
  assert f'{finished_run} holds another run' in str(e.value)
  assert says in str(e.value)
  assert 'give a new --workdir' in str(e.value)
  assert tree_hashes(finished_run) == before


def test_more_epochs_need_resume_changed(finished_run, data_root, tmp_path):
  before = tree_hashes(finished_run)
  config = smoke_config('supervised', data_root, num_epochs=3)
  with pytest.raises(cli.BadInput,
                     match='--config.resume_changed=num_epochs to go on'):
    train.Trainer(config, finished_run)
  assert tree_hashes(finished_run) == before
  config.resume_changed = 'model.width'
  with pytest.raises(cli.BadInput, match='model.width, which cannot change'):
    train.Trainer(config, finished_run)
  # Harmless fields never count: the same run resumes (and has nothing to do).
  same = smoke_config('supervised', data_root, log_every_steps=7, progress_bar=True)
  assert train.Trainer(same, finished_run).resuming


def test_resume_changed_goes_on_with_more_epochs(data_root, tmp_path):
  config = smoke_config('supervised', data_root)
  train.train_and_evaluate(config, tmp_path)
  steps = [json.loads(line)['step'] for line in
           (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  longer = smoke_config('supervised', data_root, num_epochs=4,
                 resume_changed='num_epochs')
  train.train_and_evaluate(longer, tmp_path)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['num_epochs'] == 4
  more = [json.loads(line)['step'] for line in
          (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert more[:len(steps)] == steps and max(more) == 2 * max(steps)


def test_a_folder_that_is_not_a_run_is_refused(data_root, tmp_path):
  (tmp_path / 'metrics.json').write_text('{"mine": 1}')
  with pytest.raises(cli.BadInput, match='not a koajax run'):
    train.Trainer(smoke_config('supervised', data_root), tmp_path)
  assert (tmp_path / 'metrics.json').read_text() == '{"mine": 1}'


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; '
       'from koajax.train import workdir; workdir.lock(sys.argv[1]); '
       'print("locked", flush=True); time.sleep(60)', str(tmp_path)],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(cli.BadInput,
                       match=f'in use by another koajax process \\(pid '
                       f'{holder.pid}'):
      workdir_lib.lock(tmp_path)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  deadline = time.time() + 10
  while True:  # the OS drops the lock with the process
    try:
      workdir_lib.lock(tmp_path)
      break
    except cli.BadInput:
      assert time.time() < deadline
      time.sleep(0.1)
  workdir_lib.release(tmp_path)


# -- a run that diverges never reports -------------------------------------------

def test_divergence_before_any_checkpoint_says_so(data_root, tmp_path):
  config = smoke_config('supervised', data_root, num_epochs=4, eval_every_epochs=4)
  config.optimizer.learning_rate = 1e6
  with pytest.raises(train.DivergedError) as e:
    train.train_and_evaluate(config, tmp_path)
  assert 'no checkpoint had been saved yet' in str(e.value)
  assert 'step None' not in str(e.value)
  assert not (tmp_path / 'metrics.json').exists()
  assert cli.exit_code(e.value) == cli.FAILED


# -- killed at any moment ----------------------------------------------------------

def _train_command(workdir, data_root):
  return [sys.executable, '-m', 'koajax.main',
          '--config=configs/supervised.py:smoke', f'--workdir={workdir}',
          f'--config.data.root={data_root}', '--config.num_epochs=4']


def test_kill_9_during_training_then_rerun(data_root, tmp_path):
  """kill -9 at seeded random moments after the first checkpoint, then the
  same command: the report equals an uninterrupted run's."""
  reference = tmp_path / 'reference'
  subprocess.run(_train_command(reference, data_root), cwd=REPO, check=True,
                 capture_output=True, timeout=600)
  workdir = tmp_path / 'killed'
  rng = __import__('numpy').random.default_rng(0)
  kills = 0
  for delay in rng.uniform(0.0, 4.0, size=2):
    proc = subprocess.Popen(_train_command(workdir, data_root), cwd=REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any((workdir / 'checkpoints').glob('[0-9]*')) \
        and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
  assert kills, 'the run ended before it could be killed'
  subprocess.run(_train_command(workdir, data_root), cwd=REPO, check=True,
                 capture_output=True, timeout=600)
  a = json.loads((reference / 'metrics.json').read_text())
  b = json.loads((workdir / 'metrics.json').read_text())
  assert a['metrics'] == b['metrics']
  steps = [json.loads(line)['step'] for line in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  ref_steps = [json.loads(line)['step'] for line in
               (reference / 'metrics.jsonl').read_text().splitlines()]
  assert steps == ref_steps  # each step logged once
