"""koajax's promises about checkpoints and logs: a damaged latest checkpoint
is skipped and training ends as an uninterrupted run; a damaged or NaN
checkpoint is named in one line by evaluate and sweep (exit 2) and the run
is left byte-identical; metrics.jsonl holds each step once after a resume;
a damaged sweep part is computed again."""

import functools
import json
import logging
import os
from pathlib import Path
import shutil
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from config_loader import load_config
from file_hashes import file_hashes as tree_hashes
from koajax import cli
from koajax import config_lib
from koajax import evaluate
from koajax import metric_writers
from koajax import runtime
from koajax import tasks
from koajax import train
from koajax.active import sweep
from koajax.train import checkpoints as checkpoints_lib
from koajax.train import predictor as predictor_lib
from koajax.train import step as step_lib

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3  # one step each: latest keeps steps 2 and 3


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def smoke(data_root):
  config = load_config('supervised', 'smoke')
  config.data.root = data_root
  config.num_epochs = EPOCHS
  return config


@pytest.fixture(scope='module')
def reference(data_root, tmp_path_factory):
  """A finished supervised smoke run, never modified: its workdir."""
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(smoke(data_root), workdir)
  return workdir


def copy_run(reference, dest):
  shutil.copytree(reference, dest, ignore=shutil.ignore_patterns('eval',
                                                                 'sweep'))
  return dest


def truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def damage_data_file(step_dir):
  """Truncates the state's largest data file to half; returns its path."""
  path = max((step_dir / 'state' / 'd').iterdir(),
             key=lambda p: p.stat().st_size)
  truncate(path)
  return path


def damage_metadata(step_dir):
  path = step_dir / 'state' / '_METADATA'
  path.write_text('{"tree_metadata": garbage')
  return path


def damage_missing_files(step_dir):
  path = step_dir / 'labeled'
  shutil.rmtree(path)
  return path


DAMAGE = {'truncated_data_file': damage_data_file,
          'garbage_metadata_json': damage_metadata,
          'missing_files': damage_missing_files}


def latest_params(workdir):
  config = config_lib.load_run_config(workdir)
  member = predictor_lib.load_member(workdir, config, 'latest',
                                     runtime.data_mesh(8))
  return member.step, jax.tree.map(np.asarray, member.params)


def assert_ends_like(reference, workdir):
  """Same final weights, report and log as the uninterrupted run."""
  (step_a, a), (step_b, b) = latest_params(reference), latest_params(workdir)
  assert step_a == step_b == EPOCHS
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert json.loads((workdir / 'metrics.json').read_text())['metrics'] == \
      json.loads((reference / 'metrics.json').read_text())['metrics']
  log = (workdir / 'metrics.jsonl').read_text()
  steps = [json.loads(line)['step'] for line in log.splitlines()]
  # Each step once (a train and a val record per step), in order.
  assert steps == sorted(steps) and len(steps) == 2 * len(set(steps))
  assert log == (reference / 'metrics.jsonl').read_text()


def tensorboard_events(path):
  """The events of a TensorBoard file (TFRecord framing read by hand)."""
  from tensorboardX.proto import event_pb2
  data, events, at = Path(path).read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack('<Q', data[at:at + 8])
    events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return events


def koajax_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name.startswith('koajax') and r.levelno == logging.WARNING]


# -- damaged latest checkpoint: training goes on from the newest intact one --


@pytest.mark.parametrize('kind', list(DAMAGE))
def test_damaged_latest_resumes_from_the_newest_intact_step(
    kind, reference, data_root, tmp_path, caplog):
  run = copy_run(reference, tmp_path / 'run')
  damaged = DAMAGE[kind](run / 'checkpoints' / str(EPOCHS))
  # A save killed before Orbax renamed its folder: never listed as a step.
  unfinished = run / 'checkpoints' / '4.orbax-checkpoint-tmp-1796013999'
  (unfinished / 'state').mkdir(parents=True)
  (unfinished / 'state' / '_METADATA').write_text('{"cut')
  caplog.set_level(logging.INFO, logger='koajax')
  train.train_and_evaluate(smoke(data_root), run)

  (warning,) = [m for m in koajax_warnings(caplog) if 'damaged' in m]
  assert warning.startswith(f'checkpoint folder {run / "checkpoints" / "3"} '
                            f'({damaged.relative_to(run / "checkpoints/3")}')
  assert warning.endswith(f'is damaged and was removed; resuming from step '
                          f'{EPOCHS - 1} in {run / "checkpoints" / "2"}')
  assert_ends_like(reference, run)
  # TensorBoard hides the events of the steps logged again.
  newest = max((run / 'tensorboard').glob('events.out.tfevents.*'),
               key=lambda p: p.stat().st_mtime_ns)
  starts = [e.step for e in tensorboard_events(newest)
            if e.HasField('session_log')]
  assert starts == [EPOCHS]  # purge_step = resumed step + 1


def test_no_intact_checkpoint_starts_from_scratch(reference, data_root,
                                                  tmp_path, caplog):
  run = copy_run(reference, tmp_path / 'run')
  data_file = damage_data_file(run / 'checkpoints' / '3')
  damage_metadata(run / 'checkpoints' / '2')
  caplog.set_level(logging.INFO, logger='koajax')

  # Read-only, nothing is removed: the damaged folders stay as they are.
  before = tree_hashes(run)
  scratch = train.Trainer(smoke(data_root), tmp_path / 'scratch')
  fresh = scratch.streams['labeled'].get_state()
  readonly = checkpoints_lib.Checkpoints(run, scratch.ckpts.selection,
                                         read_only=True)
  state, step = readonly.restore_latest(
      checkpoints_lib.abstract_of(scratch.state), scratch.streams)
  scratch.close()
  assert (state, step) == (None, 0)
  assert scratch.streams['labeled'].get_state() == fresh
  assert tree_hashes(run) == before
  (warning,) = koajax_warnings(caplog)
  assert warning == (
      f'checkpoint folders {run}/checkpoints/3 (state/d/{data_file.name}: '
      f'cannot be read (OUT_OF_RANGE)), {run}/checkpoints/2 (state/_METADATA: not '
      'valid JSON (JSONDecodeError: Expecting value: line 1 column 19 (char '
      '18))) are damaged and left in place (read-only); no intact '
      'checkpoint is left: starting from step 0')

  # A training run removes them, says so, and trains from step 0.
  caplog.clear()
  train.train_and_evaluate(smoke(data_root), run)
  (warning,) = [m for m in koajax_warnings(caplog) if 'damaged' in m]
  assert 'are damaged and were removed; no intact checkpoint is left: ' \
      'starting from step 0' in warning
  assert_ends_like(reference, run)


# -- evaluate and sweep: one line, exit 2, the run left byte-identical -------


def run_command(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_evaluate_names_a_damaged_checkpoint_and_the_intact_ones(reference,
                                                                 tmp_path):
  run = copy_run(reference, tmp_path / 'run')
  damaged = damage_data_file(run / 'checkpoints' / '3')
  before = tree_hashes(run)
  done = run_command('-m', 'koajax.evaluate', f'--workdir={run}',
                     '--checkpoint=latest')
  assert done.returncode == cli.BAD_INPUT
  # One line: no traceback, no Orbax noise ("Event loop is closed").
  assert len(done.stderr.splitlines()) == 1, done.stderr[-3000:]
  (line,) = done.stderr.splitlines()
  best = {m: int(next((run / f'best_{m}').iterdir()).name)
          for m in ('balanced_accuracy', 'kappa')}
  assert line.startswith(
      f"koajax.evaluate: error: checkpoint 'latest' (step 3) of {run} is "
      f'damaged: {damaged}: cannot be read (OUT_OF_RANGE). Intact '
      f'checkpoints: best_balanced_accuracy (step '
      f'{best["balanced_accuracy"]}), best_kappa (step {best["kappa"]}) '
      '(choose one with --checkpoint)')
  assert tree_hashes(run) == before


def test_sweep_names_a_damaged_checkpoint(reference, tmp_path, capsys):
  run = copy_run(reference, tmp_path / 'run')
  step_dir = next((run / 'best_balanced_accuracy').iterdir())
  damaged = damage_metadata(step_dir)
  before = tree_hashes(run)
  code = cli.call('koajax.active.sweep', functools.partial(
      sweep.sweep, run, checkpoint='best', split='val', num_samples=2))
  assert code == cli.BAD_INPUT
  err = capsys.readouterr().err
  assert err.startswith(
      f"koajax.active.sweep: error: checkpoint 'best_balanced_accuracy' "
      f'(step {step_dir.name}) of {run} is damaged: {damaged}: not valid '
      'JSON (JSONDecodeError: ')
  assert 'Intact checkpoints: latest (step 3), best_kappa' in err
  assert len(err.splitlines()) == 1
  assert tree_hashes(run) == before


def nan_weights(run, metric='balanced_accuracy'):
  """Overwrites best_<metric> of `run` with its weights times NaN; returns
  its step folder."""
  config = config_lib.load_run_config(run)
  task = tasks.from_config(config)
  replicated = jax.NamedSharding(runtime.data_mesh(8), jax.P())
  ckpts = checkpoints_lib.Checkpoints(run, config.selection)
  state = ckpts.load(f'best_{metric}', step_lib.abstract_state(
      config, task, {}, replicated))
  state = state.replace(params=jax.tree.map(lambda x: x * np.nan,
                                            state.params))
  manager = ckpts.best[metric]
  step = manager.latest_step()
  manager.delete(step)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  return run / f'best_{metric}' / str(step)


def test_evaluate_and_sweep_name_a_checkpoint_with_nan_weights(
    reference, tmp_path, capsys):
  run = copy_run(reference, tmp_path / 'run')
  step_dir = nan_weights(run)
  before = tree_hashes(run)
  says = (f"error: checkpoint 'best_balanced_accuracy' (step "
          f'{step_dir.name}, {step_dir}) holds NaN or Inf weights (')
  for program, command in (
      ('koajax.evaluate', functools.partial(evaluate.evaluate, run)),
      ('koajax.active.sweep', functools.partial(
          sweep.sweep, run, split='val', num_samples=2))):
    assert cli.call(program, command) == cli.BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f'{program}: {says}')
    assert ('and cannot predict; choose another checkpoint with '
            '--checkpoint (latest, best_kappa) or train again') in err
    assert len(err.splitlines()) == 1
  assert tree_hashes(run) == before


def test_evaluate_and_sweep_refuse_what_is_not_a_run_in_one_line(
    reference, tmp_path, capsys):
  missing = tmp_path / 'nowhere'
  done = run_command('-m', 'koajax.evaluate', f'--workdir={missing}')
  assert done.returncode == cli.BAD_INPUT
  assert len(done.stderr.splitlines()) == 1, done.stderr[-3000:]
  assert done.stderr.startswith(
      f'koajax.evaluate: error: {missing}/config.json not found: {missing} '
      'is not a koajax training workdir')

  (tmp_path / 'empty').mkdir()
  done = run_command('-m', 'koajax.active.sweep',
                     f'--workdir={tmp_path / "empty"}')
  assert done.returncode == cli.BAD_INPUT
  assert len(done.stderr.splitlines()) == 1, done.stderr[-3000:]
  assert done.stderr.startswith(f'koajax.active.sweep: error: {tmp_path}/'
                                'empty/config.json not found')

  before = tree_hashes(reference)
  assert cli.call('koajax.evaluate', functools.partial(
      evaluate.evaluate, reference, checkpoint='best_loss')) == \
      cli.BAD_INPUT
  assert capsys.readouterr().err.startswith(
      "koajax.evaluate: error: unknown checkpoint 'best_loss'; choose one "
      'of best, latest, best_balanced_accuracy, best_kappa')
  assert tree_hashes(reference) == before


# -- sweep parts --------------------------------------------------------------


def test_sweep_recomputes_a_damaged_part_and_leaves_the_run_as_it_was(
    reference, tmp_path, caplog):
  before = tree_hashes(reference)
  out = tmp_path / 'sweep'
  command = functools.partial(sweep.sweep, reference, split='val',
                              num_samples=2, chunk_size=16, top_k=2, out=out)
  assert cli.call('koajax.active.sweep', command) == cli.OK
  scores = (out / 'scores.csv').read_bytes()
  part = out / 'parts' / 'chunk_00001.npz'
  truncate(part)  # killed mid-write, before the rename
  assert cli.call('koajax.active.sweep', command) == cli.OK
  (warning,) = [m for m in koajax_warnings(caplog) if 'sweep part' in m]
  assert warning.startswith(f'sweep part {part} is damaged (')
  assert (out / 'scores.csv').read_bytes() == scores
  assert tree_hashes(reference) == before



class _FakePredictor:
  """Three chunks of three, two and three knees; counts its calls."""

  calls = 0

  def chunks(self, cache, indices):
    del cache
    for chunk in np.array_split(np.asarray(indices), 3):
      yield np.zeros((len(chunk), 2, 4, 4), np.uint8)

  def __call__(self, params, extra, images, key):
    self.calls += 1
    logits = jax.random.normal(key, (4, len(images), 5))
    return np.asarray(jax.nn.softmax(logits))


def test_a_damaged_sweep_part_is_computed_again(tmp_path, caplog):
  state = types.SimpleNamespace(params=None, extra=None)
  fake, indices = _FakePredictor(), np.arange(8)
  score = functools.partial(sweep.score_pool, fake, state, None, indices,
                            key=jax.random.key(0), parts_dir=tmp_path,
                            settings={'samples': 4})
  first = score()
  assert fake.calls == 3
  truncate(tmp_path / 'chunk_00001.npz')  # as a kill mid-write would
  (tmp_path / 'chunk_00002.npz').write_bytes(b'not a zip')
  again = score()
  assert fake.calls == 5  # only the two damaged parts
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
  warned = [m for m in koajax_warnings(caplog) if 'sweep part' in m]
  assert [m.split(' is damaged')[0] for m in warned] == [
      f'sweep part {tmp_path / "chunk_00001.npz"}',
      f'sweep part {tmp_path / "chunk_00002.npz"}']
  assert all(m.endswith('; computing it again') for m in warned)
  # Rewritten whole: the next sweep reads every part.
  score()
  assert fake.calls == 5


# -- metrics.jsonl after a resume ---------------------------------------------


def test_metric_writer_drops_what_a_resumed_run_logs_again(tmp_path):
  lines = [json.dumps({'step': s, 'train/loss': 1.0 / s}) + '\n'
           for s in (1, 2, 2, 3, 4)]
  log = tmp_path / 'metrics.jsonl'
  # Steps 1-4 written, then a kill mid-line.
  log.write_text(''.join(lines) + '{"step": 5, "train/lo')
  writer = metric_writers.MetricWriter(tmp_path, start_step=2)
  # The kept lines are byte-identical; steps 3, 4 and the cut line are gone.
  assert log.read_text() == ''.join(lines[:3])
  writer.write_scalars(3, {'train/loss': 0.5})
  writer.close()
  assert [json.loads(line)['step'] for line in
          log.read_text().splitlines()] == [1, 2, 2, 3]
  assert not list(tmp_path.glob('*.tmp'))
  (events,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  starts = [e.step for e in tensorboard_events(events)
            if e.HasField('session_log')]
  assert starts == [3]  # TensorBoard purges the old steps >= 3

  # An unchanged log is not rewritten; a fresh run (start_step 0) in a
  # workdir with an old log starts it anew.
  stat = log.stat()
  metric_writers.MetricWriter(tmp_path, start_step=3).close()
  assert log.stat().st_mtime_ns == stat.st_mtime_ns
  metric_writers.MetricWriter(tmp_path, start_step=0).close()
  assert log.read_text() == ''
  assert os.path.getsize(log) == 0
