"""The trainer end to end on the smoke presets: every method, resume, devices."""

import copy
import functools
import json
import os
from pathlib import Path
import socket
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
import pytest
from sklearn import metrics as skm

from koajax import config_lib
from koajax import evaluate
from koajax import methods
from koajax import train
from koajax.data import split_recipes
from koajax.train import step as step_lib
from config_loader import smoke_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


@pytest.mark.parametrize('method', ['supervised', 'mixup', 'pi_model', 'ict',
                                    'mixmatch', 'semixup'])
def test_every_method_trains_and_reports(method, data_root, tmp_path):
  config = smoke_config(method, data_root)
  result = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(result['metrics']['kappa']['estimate'])
  # metrics.json agrees with scikit-learn recomputed from predictions.csv.
  predictions = pd.read_csv(tmp_path / 'predictions.csv')
  probs = predictions[[f'p{k}' for k in range(5)]].to_numpy()
  written = json.loads((tmp_path / 'metrics.json').read_text())['metrics']
  np.testing.assert_allclose(
      written['balanced_accuracy']['estimate'],
      skm.balanced_accuracy_score(predictions['kl'], probs.argmax(1)))
  np.testing.assert_allclose(
      written['kappa']['estimate'],
      skm.cohen_kappa_score(predictions['kl'], probs.argmax(1),
                            weights='quadratic'))
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  log = [json.loads(line) for line in
         (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(r['train/loss']) for r in log if 'train/loss' in r)
  for name in ('confusion_matrix.png', 'roc.png', 'pr.png'):
    assert (tmp_path / name).stat().st_size > 1000
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))


def _params(workdir, config):
  trainer = train.Trainer(config, workdir)
  trainer.restore()
  return jax.tree.map(np.asarray, trainer.state.params)


@pytest.fixture(scope='module')
def supervised_run(data_root, tmp_path_factory):
  """A 3-epoch supervised smoke run: (config, workdir)."""
  config = smoke_config('supervised', data_root, num_epochs=3)
  workdir = tmp_path_factory.mktemp('supervised_run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_resumed_run_ends_like_an_uninterrupted_one(supervised_run, data_root,
                                                    tmp_path):
  """Stopping after epoch 1 and rerunning gives the same weights and metrics."""
  # (Restoring both Grain streams mid-epoch is tested in test_pipeline.)
  full, full_dir = supervised_run

  # The same command in one workdir, first cut short after one epoch (as a
  # kill after the first checkpoint would), then run to the end.
  train.train_and_evaluate(smoke_config('supervised', data_root, num_epochs=1),
                           tmp_path / 'resumed')
  longer = copy.deepcopy(full)
  longer.resume_changed = 'num_epochs'
  train.train_and_evaluate(longer, tmp_path / 'resumed')

  a, b = _params(full_dir, full), _params(tmp_path / 'resumed', full)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ma = json.loads((full_dir / 'metrics.json').read_text())
  mb = json.loads((tmp_path / 'resumed' / 'metrics.json').read_text())
  assert ma['metrics'] == mb['metrics']


def test_worker_processes_train_like_the_main_process(supervised_run,
                                                     data_root, tmp_path):
  """Reading in worker processes (an accelerator's default) gives the run
  the same batches: the same weights as reading in the main process."""
  config, one_dir = supervised_run
  assert json.loads((one_dir / 'plan.json').read_text())['data_workers'] == 0
  config = copy.deepcopy(config)
  config.data_workers = 1
  train.train_and_evaluate(config, tmp_path)
  assert json.loads((tmp_path / 'plan.json').read_text())['data_workers'] == 1
  jax.tree.map(np.testing.assert_array_equal, _params(one_dir, config),
               _params(tmp_path, config))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(supervised_run, data_root, tmp_path):
  """`--coordinator_address` runs: 2 processes x 2 CPU devices, Gloo
  all-reduce, each process reading its share of every batch."""
  _, one_dir = supervised_run
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  address = f'127.0.0.1:{_free_port()}'
  command = [sys.executable, '-m', 'koajax.main',
             '--config=configs/supervised.py:smoke', f'--workdir={tmp_path}',
             f'--config.data.root={data_root}', '--config.num_epochs=3',
             '--config.cpu_devices=2', f'--coordinator_address={address}',
             '--num_processes=2']
  procs = [subprocess.Popen(command + [f'--process_id={i}'], cwd=REPO,
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'supervised test:' in outputs[0]
  assert 'supervised test:' not in outputs[1]  # only process 0 reports
  # The processes' shares make up the batches a single process reads, so
  # the run ends where the 1-process, 8-device run did, up to the order of
  # floating-point sums.
  two = pd.read_csv(tmp_path / 'predictions.csv')
  one = pd.read_csv(one_dir / 'predictions.csv')
  pd.testing.assert_frame_equal(two, one, atol=2e-4, check_exact=False)
  # One log, written once (by process 0), with the same losses.
  logs = [[json.loads(line) for line in
           (d / 'metrics.jsonl').read_text().splitlines()]
          for d in (tmp_path, one_dir)]
  assert [r.keys() for r in logs[0]] == [r.keys() for r in logs[1]]
  for a, b in zip(*logs):
    np.testing.assert_allclose(a.get('train/loss', 0), b.get('train/loss', 0),
                               rtol=1e-4)


def test_saved_checkpoints_evaluate_on_any_split(supervised_run, tmp_path):
  _, workdir = supervised_run
  # The run's own test report comes from its best-by-BA checkpoint.
  again = evaluate.evaluate(workdir, split='test', out=tmp_path / 'test')
  ours = pd.read_csv(tmp_path / 'test' / 'predictions.csv')
  theirs = pd.read_csv(workdir / 'predictions.csv')
  pd.testing.assert_frame_equal(ours, theirs, atol=1e-6)
  assert again['metrics'] == json.loads(
      (workdir / 'metrics.json').read_text())['metrics']

  result = evaluate.evaluate(workdir, split='labeled', checkpoint='latest')
  predictions = pd.read_csv(
      workdir / 'eval' / 'latest-labeled' / 'predictions.csv')
  assert len(predictions) == len(train.Trainer(
      config_lib.load_run_config(workdir), workdir).split_indices('labeled'))
  probs = predictions[[f'p{k}' for k in range(5)]].to_numpy()
  np.testing.assert_allclose(
      result['metrics']['balanced_accuracy']['estimate'],
      skm.balanced_accuracy_score(predictions['kl'], probs.argmax(1)))

  with pytest.raises(ValueError, match='unknown checkpoint'):
    evaluate.evaluate(workdir, checkpoint='best_loss')
  with pytest.raises(FileNotFoundError, match='not a koajax training workdir'):
    evaluate.evaluate(tmp_path)


def test_exploding_loss_stops_without_a_report(data_root, tmp_path):
  # Adam at learning rate 1e6: finite but exploding losses, never a report.
  config = smoke_config('supervised', data_root, num_epochs=3)
  config.optimizer.learning_rate = 1e6
  with pytest.raises(train.DivergedError, match='diverged at step') as e:
    train.train_and_evaluate(config, tmp_path)
  assert 'None' not in str(e.value)
  assert not (tmp_path / 'metrics.json').exists()


@pytest.mark.parametrize('method', ['supervised', 'semixup'])
def test_step_agrees_on_one_and_eight_devices(method, data_root, tmp_path):
  config = smoke_config(method, data_root)
  trainer = train.Trainer(config, tmp_path)
  batch = {name: jax.tree.map(np.asarray, next(it))
           for name, it in trainer.streams.items()}
  key = jax.random.key(3)
  host_state = jax.device_get(trainer.state)  # the step donates its input

  def run(devices):
    mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    rep = jax.NamedSharding(mesh, jax.P())
    data = jax.NamedSharding(mesh, jax.P('data'))
    state = jax.device_put(host_state, rep)
    sharded = jax.device_put(batch, data)
    with jax.set_mesh(mesh):
      new_state, metrics = trainer._train_step(state, sharded, key,
                                               trainer.steps_per_epoch)
    return jax.device_get((new_state.params, metrics))

  assert jax.device_count() == 8
  one = run(jax.devices()[:1])
  eight = run(jax.devices())
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4,
                                                       atol=2e-6), one, eight)


def test_train_step_compiles_once(data_root, tmp_path):
  config = smoke_config('supervised', data_root, num_epochs=4)
  trainer = train.Trainer(config, tmp_path)
  with jax.set_mesh(trainer.mesh):
    trainer.train()
  assert trainer.total_steps >= 4
  # Another epoch length (an active-learning round's) reuses the program.
  with jax.set_mesh(trainer.mesh):
    trainer._train_step(trainer.state, trainer._next_batch(), trainer.step_key,
                        trainer.steps_per_epoch + 3)
  assert trainer._train_step._cache_size() == 1
  # The four evaluations (one per epoch) share one predict program.
  (predict,) = trainer.predictor(trainer.state)._fns
  assert predict._cache_size() == 1


class _Affine(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x, *, train, rngs):
    del train, rngs
    return self.linear(x)


def _least_squares(forward, batch, key, *, epoch):
  del epoch
  return jnp.mean((forward(batch['x'], key) - batch['y']) ** 2), {}


def test_warmup_and_cosine_epochs_shape_the_learning_rate():
  cfg = ml_collections.ConfigDict({'boundary_epochs': {'8': 0.5},
                                   'warmup_epochs': 2.0,
                                   'cosine_epochs': 10.0})
  scale = step_lib.epoch_lr_scale(cfg)
  epochs = np.array([0, 0.5, 1, 2, 4, 8, 9.5, 10, 12])
  by_hand = (np.minimum(1, epochs / 2) * np.where(epochs >= 8, 0.5, 1.0)
             * 0.5 * (1 + np.cos(np.pi * np.clip(epochs / 10, 0, 1))))
  np.testing.assert_allclose([float(scale(jnp.float32(e))) for e in epochs],
                             by_hand, rtol=1e-6, atol=1e-7)
  assert step_lib.epoch_lr_scale(ml_collections.ConfigDict(
      {'boundary_epochs': {}})) is None


def test_boundary_epochs_scale_the_learning_rate_from_that_epoch_on():
  cfg = ml_collections.ConfigDict({
      'learning_rate': 1e-2, 'b1': 0.9, 'b2': 0.999, 'weight_decay': 0.0,
      'boundaries': {}, 'boundary_epochs': {'2': 0.1, '3': 0.5}})
  scale = step_lib.epoch_lr_scale(cfg)
  np.testing.assert_allclose(
      [float(scale(jnp.float32(e))) for e in (0, 1.5, 2, 2.5, 3, 7)],
      [1, 1, 0.1, 0.1, 0.05, 0.05], rtol=1e-6)

  graphdef, params, extra = nnx.split(_Affine(nnx.Rngs(0)), nnx.Param, ...)
  tx = step_lib.make_optimizer(cfg)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           extra=extra, opt_state=tx.init(params),
                           method_state={})
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef,
                                   tx=tx,
                                   method=methods.LossMethod(_least_squares),
                                   lr_scale=scale))
  # Reference: optax's Adam with the learning rate set by hand each step.
  ref_tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
  ref_params = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  ref_state = ref_tx.init(ref_params)
  rng = np.random.default_rng(0)
  steps_per_epoch = 3
  for s in range(12):
    batch = {'x': rng.normal(size=(4, 3)).astype(np.float32),
             'y': rng.normal(size=(4, 2)).astype(np.float32)}
    state, _ = step(state, batch, jax.random.key(0), steps_per_epoch)
    epoch = s // steps_per_epoch
    ref_state.hyperparams['learning_rate'] = 1e-2 * (
        (0.1 if epoch >= 2 else 1.0) * (0.5 if epoch >= 3 else 1.0))
    grads = jax.grad(lambda p: jnp.mean(
        (batch['x'] @ p['linear']['kernel'] + p['linear']['bias']
         - batch['y']) ** 2))(ref_params)
    updates, ref_state = ref_tx.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)),
               ref_params)


def test_sweep_writes_scores_and_reruns_only_what_is_missing(supervised_run,
                                                              tmp_path):
  from koajax.active import sweep
  _, workdir = supervised_run
  out = tmp_path / 'sweep'
  table = sweep.sweep(workdir, split='val', num_samples=4, chunk_size=16,
                      top_k=6, out=out)
  n = len(train.Trainer(config_lib.load_run_config(workdir),
                        workdir).split_indices('val'))
  written = pd.read_csv(out / 'scores.csv')
  assert len(written) == n == len(table)
  probs = written[[f'p{k}' for k in range(5)]].to_numpy()
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  # Entropy of the mean prediction, by hand from the written means.
  with np.errstate(divide='ignore', invalid='ignore'):
    by_hand = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(1)
  np.testing.assert_allclose(written['entropy'], by_hand, atol=1e-5)
  np.testing.assert_allclose(written['least_confidence'], 1 - probs.max(1),
                             atol=1e-6)
  assert (written['bald'] >= 0).all() and (written['bald'] > 0).any()
  for name in ('hist_bald.png', 'hist_entropy.png', 'top_uncertain.png'):
    assert (out / name).stat().st_size > 1000
  # A killed sweep (one chunk lost) reruns that chunk and ends the same.
  parts = sorted((out / 'parts').glob('chunk_*.npz'))
  assert len(parts) == -(-n // 16)
  parts[-1].unlink()
  kept = parts[0].stat().st_mtime_ns
  sweep.sweep(workdir, split='val', num_samples=4, chunk_size=16, top_k=6,
              out=out)
  assert parts[0].stat().st_mtime_ns == kept
  pd.testing.assert_frame_equal(pd.read_csv(out / 'scores.csv'), written)


def test_start_from_takes_another_runs_weights_not_its_step(supervised_run,
                                                            tmp_path):
  config, workdir = supervised_run
  best = train.Trainer(config, workdir).load_checkpoint(
      'best_balanced_accuracy')
  fresh = train.Trainer(config, tmp_path)
  fresh.start_from(workdir, 'best_balanced_accuracy')
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(best.params),
               jax.device_get(fresh.state.params))
  assert int(fresh.state.step) == 0 and int(best.step) > 0
  latest = train.Trainer(config, workdir).load_checkpoint('latest')
  fresh.start_from(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(latest.params),
               jax.device_get(fresh.state.params))
  with pytest.raises(FileNotFoundError, match='no .best_kappa. checkpoint'):
    fresh.start_from(tmp_path / 'nothing', 'best_kappa')


def test_sweep_scores_the_knees_of_a_dicom_manifest(supervised_run, data_root,
                                                    tmp_path):
  from koajax.active import sweep
  _, workdir = supervised_run
  manifest = next(Path(data_root).glob('synthetic-*/raw/manifest.csv'))
  table = sweep.sweep(workdir, manifest=manifest, num_samples=2,
                      chunk_size=32, top_k=4, out=tmp_path)
  built = json.loads((manifest.with_name('koajax-cache-roi160') /
                      'meta.json').read_text())
  assert len(table) == built['num_knees'] > 0
  assert set(pd.read_csv(tmp_path / 'scores.csv')['knee_id']) == \
      set(table['knee_id'])


def _tree_digest(root: Path) -> dict[str, tuple[bytes, int]]:
  """Every file under root: its bytes and modification time."""
  return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_evaluate_and_sweep_leave_a_read_only_run_unchanged(supervised_run,
                                                            tmp_path):
  import shutil
  import stat
  from koajax.active import sweep
  _, workdir = supervised_run
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('eval',
                                                              'sweep'))
  before = _tree_digest(run)
  modes = {p: p.stat().st_mode for p in [run, *run.rglob('*')]}
  for p in modes:
    p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
  try:
    result = evaluate.evaluate(run, split='test', out=tmp_path / 'eval')
    sweep.sweep(run, split='val', num_samples=2, chunk_size=16, top_k=2,
                out=tmp_path / 'sweep')
  finally:
    for p, mode in modes.items():
      p.chmod(mode)
  # Byte-identical, not even touched, and nothing added.
  assert _tree_digest(run) == before
  # The copy predicts what the original run reported.
  assert result['metrics'] == json.loads(
      (workdir / 'metrics.json').read_text())['metrics']
  assert (tmp_path / 'sweep' / 'scores.csv').is_file()


def test_a_multi_head_task_reports_every_head(data_root, tmp_path):
  """KL + six OARSI heads on a k-fold split, selected by the mean OARSI
  kappa: the trainer, predictor and report handle seven heads (the
  supervised method trains the first)."""
  config = smoke_config('supervised', data_root)
  config.task = 'kl_oarsi'
  config.view = 'siamese'
  config.split = split_recipes.split_config('kfold', num_folds=3, fold=1)
  config.selection = ('mean/kappa', 'loss')
  result = train.train_and_evaluate(config, tmp_path)
  heads = ('kl', 'ost_tl', 'ost_fl', 'jsn_l', 'ost_tm', 'ost_fm', 'jsn_m')
  assert tuple(result['heads']) == heads
  predictions = pd.read_csv(tmp_path / 'predictions.csv')
  for head in heads:
    k = 5 if head == 'kl' else 4
    probs = predictions[[f'{head}_p{c}' for c in range(k)]].to_numpy()
    graded = predictions[head].to_numpy() >= 0
    np.testing.assert_allclose(
        result['heads'][head]['metrics']['kappa']['estimate'],
        skm.cohen_kappa_score(predictions[head][graded],
                              probs[graded].argmax(1), weights='quadratic',
                              labels=range(k)))
  np.testing.assert_allclose(
      result['mean']['kappa']['estimate'],
      np.mean([result['heads'][h]['metrics']['kappa']['estimate']
               for h in heads[1:]]))
  assert (tmp_path / 'best_mean-kappa').is_dir()
  assert (tmp_path / 'best_loss').is_dir()
  log = [json.loads(line) for line in
         (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('val/jsn_m/kappa' in r for r in log)


def test_a_binary_task_excludes_the_other_grades(data_root, tmp_path):
  config = smoke_config('supervised', data_root)
  config.task = 'kl0_vs_kl2'
  config.split = split_recipes.split_config('ratio', ratios=(2, 1, 1))
  result = train.train_and_evaluate(config, tmp_path)
  predictions = pd.read_csv(tmp_path / 'predictions.csv')
  assert list(predictions.columns[-3:]) == ['kl0_vs_kl2', 'p0', 'p1']
  index = pd.read_csv(next(Path(data_root).glob('synthetic-*/cache-*/'
                                                'index.csv')), dtype=str)
  kl = dict(zip(index['knee_id'], index['kl'].astype(int)))
  truth = predictions['knee_id'].map(kl).to_numpy()
  assert set(truth) <= {0, 2}
  np.testing.assert_array_equal(predictions['kl0_vs_kl2'], truth // 2)
  assert result['metrics']['roc_auc']['estimate'] is not None


def test_an_unknown_selection_metric_is_refused_before_training(data_root,
                                                                tmp_path):
  config = smoke_config('supervised', data_root)
  config.selection = ('kl/kapa',)
  with pytest.raises(ValueError, match=r"selection metric 'kl/kapa'.*"
                     r'kl/kappa'):
    train.Trainer(config, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


class _CentreByBatch(nnx.Module):
  """Subtracts the batch mean, optionally through batch norm's statistics:
  an output that shows which knees were in one call."""

  def __init__(self, batch_norm, rngs):
    self.norm = (nnx.BatchNorm(2, use_bias=False, use_scale=False,
                               momentum=0.5, rngs=rngs)
                 if batch_norm else None)

  def __call__(self, x, *, train, rngs):
    del rngs
    if self.norm is not None:
      return self.norm(x, use_running_average=not train)
    return x - x.mean(0)


def _parts_loss(forward, batch, key, *, epoch):
  del epoch
  out = forward((batch['a'], batch['b']), key)
  return jnp.sum(out ** 2), {'out': out}


@pytest.mark.parametrize('batch_norm,devices', [(False, 2), (True, 2),
                                                 (False, 1)])
def test_parts_of_a_batch_run_apart_unless_batch_norm_couples_them(
    batch_norm, devices):
  graphdef, params, extra = nnx.split(_CentreByBatch(batch_norm, nnx.Rngs(0)),
                                      nnx.Param, ...)
  tx = optax.sgd(0.0)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           extra=extra, opt_state=tx.init(params),
                           method_state={})
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 2)).astype(np.float32)
  b = rng.normal(3.0, 2.0, size=(6, 2)).astype(np.float32)
  mesh = jax.make_mesh((devices,), ('data',), devices=jax.devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch = jax.device_put({'a': a, 'b': b}, jax.NamedSharding(mesh, jax.P('data')))
  with jax.set_mesh(mesh):
    new, metrics = jax.jit(functools.partial(
        step_lib.train_step, graphdef=graphdef, tx=tx,
        method=methods.LossMethod(_parts_loss)))(
            state, batch, jax.random.key(0), 1)
  whole = np.concatenate([a, b])
  if batch_norm:  # one call: normalised by the statistics of all 10
    np.testing.assert_allclose(
        metrics['out'], (whole - whole.mean(0)) / np.sqrt(whole.var(0) + 1e-5),
        rtol=1e-5, atol=1e-5)
    running = nnx.to_pure_dict(new.extra)['norm']['mean']
    np.testing.assert_allclose(running, 0.5 * whole.mean(0), rtol=1e-5)
  else:  # one call per part, on any number of devices
    np.testing.assert_allclose(
        metrics['out'], np.concatenate([a - a.mean(0), b - b.mean(0)]),
        rtol=1e-5, atol=1e-6)
