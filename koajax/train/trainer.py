"""One trainer for every method: a jitted, data-parallel, resumable loop.

The batch is sharded over a one-axis device mesh ('data'), the state
replicated; XLA inserts the gradient all-reduce. With several processes
(`jax.distributed.initialize()` before calling `train_and_evaluate`) each
process reads its own share of every batch.

What differs between papers reaches the loop as data: the task (heads,
qualifying knees, view), the method (its streams, its loss and its state),
the model (found by name), the split recipe and the selection metrics. The
loop itself names no paper.

Checkpoints (Orbax) hold the state, the method's state and the Grain
iterators together, so a rerun in the same workdir continues at the next
batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from koajax import cli
from koajax import config_checks
from koajax import methods as methods_lib
from koajax import metric_writers
from koajax import runtime
from koajax import tasks as tasks_lib
from koajax.data import pipeline
from koajax.data import sources
from koajax.data import split_recipes
from koajax.data import views
from koajax.evaluation import heads as heads_lib
from koajax.evaluation import landmarks as landmarks_lib
from koajax.evaluation import readers as readers_lib
from koajax.evaluation import report
from koajax.train import checkpoints as checkpoints_lib
from koajax.train import predictor as predictor_lib
from koajax.train import plan as plan_lib
from koajax.train import step as step_lib
from koajax.train import workdir as workdir_lib

log = logging.getLogger(__name__)

Splits = split_recipes.Splits
SPLITS_NPZ = 'splits.npz'


# When training counts as diverged (Trainer._check_diverged).
DIVERGED_LOSS_FACTOR = 1e3
DIVERGED_WEIGHT = 1e6


class DivergedError(FloatingPointError):
  """Training diverged: a non-finite or exploding loss or weights."""


NonFiniteLossError = DivergedError  # its name before exploding losses counted


def saved_splits(workdir: str | Path) -> Splits | None:
  """The splits a run wrote to its workdir, or None (older runs)."""
  path = Path(workdir) / SPLITS_NPZ
  if not path.is_file():
    return None
  with np.load(path) as saved:
    return Splits(**{f.name: saved[f.name] for f in dataclasses.fields(Splits)})


def split_indices(splits: Splits, split: str) -> np.ndarray:
  """Rows of `split` ('test' falls back to 'val' when no test set exists)."""
  if split == 'test' and not len(splits.test):
    split = 'val'
  if split not in ('labeled', 'unlabeled', 'val', 'test'):
    raise ValueError(f'unknown split {split!r}; choose labeled, unlabeled, '
                     'val or test')
  return getattr(splits, split)


def landmark_truth(task: tasks_lib.Task, cache, indices: np.ndarray
                   ) -> tuple[np.ndarray, tuple[float, float]]:
  """((n, K, 2) true landmarks of cache rows `indices` in the pixels of the
  task's view, (row, col) mm per view pixel)."""
  size = task.view_size or views.VIEW_PX[task.view]
  mm = cache.meta['roi_mm'] / size
  return pipeline.view_keypoints(cache, indices, view=task.view,
                                 view_size=task.view_size), (mm, mm)


def write_report(out_dir: str | Path, config: ml_collections.ConfigDict,
                 task: tasks_lib.Task, cache, indices: np.ndarray,
                 probs: dict[str, np.ndarray],
                 sections: dict[str, Any] | None = None
                 ) -> dict[str, Any] | None:
  """metrics.json, predictions.csv and plots of `probs` on cache rows
  `indices`; written by process 0, which returns the report. With reader
  columns in the cache index (kl_reader_<name>) and a primary head on KL,
  the report compares the model with those readers too. `sections` are
  further top-level entries of metrics.json (`Method.report_sections`).
  A landmark task's report is KNEEL's figures of probs['landmarks']
  (`koajax.evaluation.landmarks.write_report`)."""
  if jax.process_index() != 0:
    return None
  index = cache.index.iloc[indices]
  if task.landmarks:
    true, spacing = landmark_truth(task, cache, indices)
    size = task.view_size or views.VIEW_PX[task.view]
    return landmarks_lib.write_report(
        out_dir, knee_ids=index['knee_id'].to_numpy(),
        sides=index['side'].to_numpy(), pred=probs['landmarks'], true=true,
        spacing=spacing, pixels=f'{task.view} view, {size} px over the '
        f"{cache.meta['roi_mm']:g} mm ROI", sections=sections)
  return report.write_report(
      out_dir, knee_ids=index['knee_id'].to_numpy(),
      sides=index['side'].to_numpy(), labels=task.index_labels(index),
      probs=probs, positive_from=task.positive_from,
      mean_heads=task.mean_heads, pooled_binary=dict(task.pooled_binary),
      subject_ids=index['subject_id'].to_numpy(),
      n_resamples=config.bootstrap_resamples, seed=config.seed,
      readers=readers_lib.index_readers(index, task.heads[0]),
      sections=sections)


def headline(task: tasks_lib.Task, result: dict[str, Any]) -> str:
  """The figures worth printing from a `write_report` result."""
  return (landmarks_lib.headline(result) if task.landmarks
          else report.headline(result))


def usable_only(splits: Splits, usable: np.ndarray) -> Splits:
  """`splits` without the rows where `usable` is False."""
  return Splits(**{f.name: getattr(splits, f.name)[
      usable[getattr(splits, f.name)]] for f in dataclasses.fields(Splits)})


class Trainer:
  """Holds what the loop needs: mesh, jitted steps, streams, checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path,
               *, splits: Splits | None = None, cache=None,
               method: methods_lib.Method | None = None, source: str = ''):
    """`splits` (default: made from `config.split`) and `cache` (default:
    the one `config.data` names) let a caller choose the knees, as the
    loop over rounds of labeling does; `method` overrides the one
    `config.method` names; `source` (the `--config` file and preset) goes
    into plan.json."""
    config_checks.check(config)
    self.workdir = Path(workdir)
    # Before anything is written: a workdir holds one run.
    self.resuming = workdir_lib.claim(self.workdir, config)
    self.task = tasks_lib.from_config(config)
    self.method = method or methods_lib.from_config(config, self.task)
    selection = tuple(config.get('selection',
                                 predictor_lib.DEFAULT_SELECTION))
    known = heads_lib.score_names(
        self.task.num_classes, self.task.positive_from,
        self.task.mean_heads) if self.task.heads else set()
    if self.task.landmarks:
      known |= set(landmarks_lib.SCORE_NAMES)
    for name in selection:
      if name not in known:
        raise ValueError(
            f'selection metric {name!r} (config field selection) is not a '
            f'validation metric of task {self.task.name!r}; choose from '
            f'{", ".join(sorted(known))}')
    self.cache = cache or runtime.process_zero_first(
        lambda: sources.resolve_cache(config.data), 'koajax-cache')
    qualifies = self.task.qualifies(self.cache.index)
    # Knees the view cannot be cut from (no landmarks for the 'keypoints'
    # view) are in no set, labeled or not: never fed to the model as NaN.
    usable = pipeline.usable_knees(self.cache, self.task.view)
    if usable is not None:
      qualifies = qualifies & usable
    if splits is None:  # a paper's sizes on smaller data: said, not silent
      config = plan_lib.adapt(config, self.cache.index, qualifies=qualifies)
    self.config = config
    self.splits = splits or split_recipes.make_splits(
        self.cache.index, config.split, qualifies=qualifies)
    if usable is not None:
      self.splits = usable_only(self.splits, usable)
      if not usable.all():
        log.warning('%d of the %d knees of the cache lack landmarks and are '
                    'left out of this run (the %r view needs them)',
                    int((~usable).sum()), len(usable), self.task.view)
    streams = self.method.streams
    unknown = set(streams) - {'labeled', 'unlabeled'}
    if unknown:
      raise ValueError(f'method streams {sorted(unknown)} are not labeled or '
                       'unlabeled')
    batch_sizes = {'labeled': config.batch_size,
                   'unlabeled': config.unlabeled_batch_size or
                   config.batch_size}
    self.mesh = runtime.data_mesh(*(batch_sizes[s] for s in streams))
    self.replicated = jax.NamedSharding(self.mesh, jax.P())
    self.data_sharding = jax.NamedSharding(self.mesh, jax.P('data'))

    key = jax.random.key(config.seed)
    self.init_key, self.step_key = jax.random.split(key)
    labeled_index = self.cache.index.iloc[self.splits.labeled]
    # 'bootstrap': the first head's smaller classes drawn with replacement
    # up to the largest one's size, every epoch (koajax.data.pipeline).
    oversample = (self.task.index_labels(labeled_index)[self.task.heads[0].name]
                  if config.get('oversample', '') == 'bootstrap' else None)
    self.steps_per_epoch = pipeline.steps_per_epoch(
        pipeline.epoch_knees(len(self.splits.labeled), oversample),
        config.batch_size)
    method_state = self.method.init_state(methods_lib.TrainingData(
        index=labeled_index, labels=self.task.index_labels(labeled_index),
        seed=config.seed, images=functools.partial(
            self._view_images, self.splits.labeled)))
    self.graphdef, tx, self.state = step_lib.create_state(
        config, self.task, self.init_key, method_state, self.replicated)
    if self.steps_per_epoch == 0:
      raise cli.BadInput(
          f'config field batch_size={config.batch_size} is larger than the '
          f'{len(self.splits.labeled)} labeled knees: an epoch would hold no '
          'step; lower batch_size')
    self.total_steps = config.num_epochs * self.steps_per_epoch
    self._train_step = jax.jit(
        functools.partial(step_lib.train_step, graphdef=self.graphdef, tx=tx,
                          method=self.method,
                          lr_scale=step_lib.epoch_lr_scale(config.optimizer)),
        donate_argnums=0)
    self._predictor = None
    # NaN anywhere makes the maximum NaN, which fails the check too.
    self._params_max_abs = jax.jit(lambda params: jnp.max(jnp.stack(
        [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(params)])))
    self._first_loss = None
    workers, threads = pipeline.reading_processes(
        config.data_workers, streams=len(streams),
        accelerator=jax.default_backend() != 'cpu')
    self.streams = pipeline.make_streams(
        self.cache, labeled=self.splits.labeled,
        unlabeled=(self.splits.unlabeled if 'unlabeled' in streams
                   else None),
        view=self.task.view, view_size=self.task.view_size, task=self.task,
        batch_size=config.batch_size,
        unlabeled_batch_size=batch_sizes['unlabeled'], seed=config.seed,
        oversample=oversample, num_epochs=None,
        worker_count=workers, read_threads=threads)
    self.ckpts = checkpoints_lib.Checkpoints(self.workdir, selection)
    self.plan = plan_lib.describe(
        config, task=self.task.name, splits=self.splits, streams=streams,
        steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
        mesh_size=self.mesh.size, cache_dir=self.cache.dir,
        data_workers=workers)
    if source:
      self.plan['config'] = source
    if jax.process_index() == 0:
      # What `koajax.evaluate` needs to rebuild this run, including knees
      # chosen by a caller rather than by config.split.
      workdir_lib.write_config(self.workdir, config)
      plan_lib.write(self.workdir, self.plan)
      tmp = self.workdir / f'{SPLITS_NPZ}.tmp.npz'
      np.savez(tmp, **dataclasses.asdict(self.splits))
      os.replace(tmp, self.workdir / SPLITS_NPZ)

  # -- checkpoints ---------------------------------------------------------

  def restore(self) -> int:
    """Restores the latest checkpoint, if any; returns the step to go on from."""
    state, step = self.ckpts.restore_latest(
        checkpoints_lib.abstract_of(self.state), self.streams)
    if state is not None:
      self.state = state
      log.info('Resumed from step %d in %s', step, self.ckpts.latest.directory)
    return step

  def load_checkpoint(self, name: str) -> step_lib.TrainState:
    """The state saved as `name`: 'latest', 'best' or 'best_<metric>'."""
    return self.ckpts.load(name, checkpoints_lib.abstract_of(self.state))

  def start_from(self, workdir: str | Path, name: str = 'latest') -> None:
    """Takes the weights and norm statistics of checkpoint `name` ('latest'
    or 'best...') of another run of the same model; step, optimiser and
    method state start afresh."""
    other = checkpoints_lib.Checkpoints(workdir, self.ckpts.selection,
                                        read_only=True)
    saved = other.load(name, checkpoints_lib.abstract_of(self.state))
    self.state = self.state.replace(params=saved.params, extra=saved.extra)

  # -- data ------------------------------------------------------------------

  def _next_batch(self) -> dict[str, Any]:
    return {name: jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(self.data_sharding,
                                                         v), next(it))
            for name, it in self.streams.items()}

  def _view_images(self, indices: np.ndarray):
    """uint8 view batches of the knees at `indices`, all of them on every
    process (what a method fits on must be the same everywhere)."""
    for batch in pipeline.eval_batches(
        self.cache, indices, view=self.task.view,
        view_size=self.task.view_size, batch_size=self.config.eval_batch_size,
        sharding=pipeline.Sharding(0, 1)):
      yield batch['image']

  # -- evaluation ------------------------------------------------------------

  def predictor(self, state: step_lib.TrainState) -> predictor_lib.Predictor:
    """A predictor of `state` on this run's mesh, with the config's
    prediction settings."""
    members = [predictor_lib.state_member(self.graphdef, state)]
    if self._predictor is None:  # compiled once, for every evaluation
      self._predictor = predictor_lib.Predictor(
          members, self.task, self.mesh,
          batch_size=self.config.eval_batch_size,
          **dict(self.config.get('predict', {})))
    return self._predictor.with_weights(members)

  def predict(self, state: step_lib.TrainState, indices: np.ndarray,
              cache=None) -> dict[str, np.ndarray]:
    """{head: probabilities} of the knees at `indices` of `cache` (default:
    the training cache), in order."""
    return self.predictor(state).predict(cache or self.cache, indices)

  def evaluate(self, indices: np.ndarray) -> dict[str, float]:
    """Validation metrics of the current state; the method updates its
    state from the same predictions."""
    probs = self.predict(self.state, indices)
    labels = self.task.index_labels(self.cache.index.iloc[indices])
    new_state = self.method.update_state(
        jax.device_get(self.state.method_state), methods_lib.Validation(
            probs=probs, labels=labels,
            epoch=float(self.state.step) / self.steps_per_epoch))
    self.state = self.state.replace(method_state=jax.device_put(
        jax.tree.map(jnp.asarray, new_state), self.replicated))
    scores = heads_lib.head_scores(
        labels, {h: probs[h] for h in self.task.head_names},
        positive_from=self.task.positive_from,
        mean_heads=self.task.mean_heads) if self.task.heads else {}
    if self.task.landmarks:
      scores.update(landmarks_lib.scores(
          probs['landmarks'], *landmark_truth(self.task, self.cache, indices)))
    return scores

  # -- the loop ----------------------------------------------------------------

  def _check_diverged(self, step: int, loss: float) -> None:
    """Stops before a diverged state reaches a checkpoint or a report: a
    non-finite loss, a loss DIVERGED_LOSS_FACTOR times the first step's, or
    weights beyond DIVERGED_WEIGHT (an Adam run at learning rate 1e6 trained
    on at a loss of 5e7 with finite weights)."""
    if self._first_loss is None:
      self._first_loss = loss
    largest = float(self._params_max_abs(self.state.params))
    limit = DIVERGED_LOSS_FACTOR * max(abs(self._first_loss), 1.0)
    if np.isfinite(loss) and loss <= limit and largest <= DIVERGED_WEIGHT:
      return
    why = (f'loss {loss:.4g}' if not np.isfinite(loss) or loss > limit else
           f'a weight of magnitude {largest:.3g}')
    if not np.isfinite(self._first_loss):
      why += ' from the first step'
    elif np.isfinite(loss) and loss > limit:
      why += f', {DIVERGED_LOSS_FACTOR:g}x above the first step\'s ' \
             f'{self._first_loss:.4g}'
    kept = self.ckpts.latest.latest_step()
    if kept is None:
      saved = ('no checkpoint had been saved yet (the first is saved at the '
               'first evaluation)')
    else:
      saved = (f'the last good checkpoint (step {kept}) is kept in '
               f'{self.ckpts.latest.directory}')
    raise DivergedError(
        f'training diverged at step {step} ({why}); stopped without a '
        f'report, {saved}. Lower optimizer.learning_rate (in a new '
        '--workdir) or check the data')

  def train(self) -> None:
    cfg = self.config
    step = self.restore()
    # Steps logged after the checkpoint resumed from are logged again.
    writer = metric_writers.MetricWriter(self.workdir, start_step=step,
                                         enabled=jax.process_index() == 0)
    eval_every = cfg.eval_every_epochs * self.steps_per_epoch
    bar = tqdm.tqdm(total=self.total_steps, initial=step, unit='step',
                    disable=jax.process_index() != 0 or not cfg.progress_bar)
    if jax.process_index() == 0:
      plan_lib.log_plan(self.plan)
    durations = []  # of the first steps, for the plan's estimate
    while step < self.total_steps:
      timed = len(durations) <= plan_lib.TIMED_STEPS
      start = time.perf_counter()
      self.state, metrics = self._train_step(
          self.state, self._next_batch(), self.step_key, self.steps_per_epoch)
      step += 1
      bar.update()
      if timed:
        jax.block_until_ready(metrics)
        durations.append(time.perf_counter() - start)
        if len(durations) == plan_lib.TIMED_STEPS + 1:
          # The first step compiles; the next ones are timed one by one
          # (dispatch is asynchronous: only a wait says what a step costs).
          self.plan = plan_lib.estimate(
              self.plan, float(np.median(durations[1:])),
              self.total_steps - step)
          plan_lib.write(self.workdir, self.plan)
      if self._first_loss is None:  # the baseline of an exploding loss
        self._check_diverged(step, float(jax.device_get(metrics['loss'])))
      if step % cfg.log_every_steps == 0 or step % eval_every == 0 \
          or step == self.total_steps:
        pending = jax.device_get(metrics)
        self._check_diverged(step, float(pending['loss']))
        scalars = {f'train/{k}': float(v) for k, v in pending.items()}
        scalars['train/epoch'] = step / self.steps_per_epoch
        writer.write_scalars(step, scalars)
        bar.set_postfix(loss=f'{pending["loss"]:.4f}')
      if step % eval_every == 0 or step == self.total_steps:
        scores = self.evaluate(self.splits.val)
        writer.write_scalars(step, {f'val/{k}': v for k, v in scores.items()})
        self.ckpts.keep_if_best(step, self.state, scores)
        self.ckpts.save(step, self.state, self.streams)
    bar.close()
    writer.close()

  def close(self) -> None:
    """Lets other processes use the workdir."""
    workdir_lib.release(self.workdir)

  def split_indices(self, split: str) -> np.ndarray:
    return split_indices(self.splits, split)

  def test(self) -> dict[str, Any] | None:
    """Reports the best checkpoint (first selection metric) on the test
    split."""
    name = self.ckpts.resolve(checkpoints_lib.BEST)
    state = (self.load_checkpoint(name) if name in self.ckpts.names()
             else self.state)
    indices = self.split_indices('test')
    probs = self.predict(state, indices)
    sections = self.method.report_sections(
        jax.device_get(state.method_state), probs,
        self.task.index_labels(self.cache.index.iloc[indices]))
    result = write_report(self.workdir, self.config, self.task, self.cache,
                          indices, probs, sections=sections)
    count = self.config.get('gradcam_knees', 0)
    if count and result is not None and self.task.heads:
      # Imported here: Grad-CAM reads the predictor, which imports this
      # package.
      from koajax.evaluation import gradcam  # pylint: disable=g-import-not-at-top
      head = self.task.heads[0].name
      gradcam.write_extremes(
          self.workdir, predictor_lib.state_member(self.graphdef, state),
          self.cache, indices,
          labels=self.task.index_labels(self.cache.index.iloc[indices])[head],
          probs=probs[head], head=head, view=self.task.view,
          view_size=self.task.view_size, count=count,
          crop=self.config.get('predict', {}).get('crop', 0))
    return result


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | Path, *,
                       source: str = '') -> dict[str, Any] | None:
  """Trains, then reports on the test split; returns metrics.json's content
  (None on processes other than 0). `source`: as for `Trainer`."""
  trainer = Trainer(config, workdir, source=source)
  try:
    with jax.set_mesh(trainer.mesh):
      trainer.train()
      result = trainer.test()
  finally:
    trainer.close()
  if result is None:
    return None
  print(f'{config.method} test: {headline(trainer.task, result)}; '
        f'report in {Path(workdir) / "metrics.json"}')
  return result
