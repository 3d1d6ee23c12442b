"""One trainer for every method: a jitted, data-parallel, resumable loop.

    state, metrics = train_step(state, batch, key, steps_per_epoch)

is a pure function of plain pytrees, jitted with the state donated; its RNG is
`fold_in(key, step)`, so a resumed run draws exactly what an uninterrupted run
would. The batch is sharded over a one-axis device mesh ('data'), the state
replicated; XLA inserts the gradient all-reduce. With several processes
(`jax.distributed.initialize()` before calling `train_and_evaluate`) each
process reads its own share of every batch.

Checkpoints (Orbax) hold the state and the Grain iterators together, so a
rerun in the same workdir continues at the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from koajax import config_lib
from koajax import metric_writers
from koajax import methods
from koajax import models
from koajax import runtime
from koajax.data import pipeline
from koajax.data import sources
from koajax.data import splits as splits_lib
from koajax.evaluation import metrics as metrics_lib
from koajax.evaluation import report

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of nnx.Param
  extra: Any  # nnx.State of everything else (batch-norm statistics)
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  pass


# --------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class Splits:
  labeled: np.ndarray
  unlabeled: np.ndarray
  val: np.ndarray
  test: np.ndarray


SPLITS_NPZ = 'splits.npz'


def saved_splits(workdir: str | Path) -> Splits | None:
  """The splits a run wrote to its workdir, or None (older runs)."""
  path = Path(workdir) / SPLITS_NPZ
  if not path.is_file():
    return None
  with np.load(path) as saved:
    return Splits(**{f.name: saved[f.name] for f in dataclasses.fields(Splits)})


def make_splits(index, cfg: ml_collections.ConfigDict) -> Splits:
  """Test = one held-out site; the other sites make the Semixup setting."""
  rest = np.arange(len(index))
  test = np.zeros(0, np.int64)
  if cfg.test_site:
    held_out = splits_lib.held_out_site(index, test_site=cfg.test_site,
                                        graded_only=True)
    rest, test = held_out.train, held_out.test
  pools = splits_lib.labeled_unlabeled_pools(
      index, labeled_fraction=cfg.labeled_fraction, seed=cfg.seed, rows=rest)
  setting = splits_lib.semixup_setting(
      index, n_per_grade=cfg.labels_per_grade,
      unlabeled_factor=cfg.unlabeled_factor, fold=cfg.fold,
      n_folds=cfg.num_folds, seed=cfg.seed, pools=pools)
  return Splits(setting.labeled, setting.unlabeled, setting.val, test)


# --------------------------------------------------------------------------
# Model, optimiser and the pure step.


def create_state(config: ml_collections.ConfigDict, key: jax.Array,
                 sharding: jax.sharding.Sharding | None = None):
  """(graphdef, optimizer, state); the state is initialised by one jit call."""
  tx = make_optimizer(config.optimizer)

  def init(key):
    model = models.create(config.model, rngs=nnx.Rngs(params=key))
    _, params, extra = nnx.split(model, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      extra=extra, opt_state=tx.init(params))

  # Eager initialisation would compile every layer's initialiser separately.
  abstract = nnx.eval_shape(
      lambda: models.create(config.model, rngs=nnx.Rngs(params=0)))
  graphdef = nnx.split(abstract, nnx.Param, ...)[0]
  state = jax.jit(init, out_shardings=sharding)(key)
  return graphdef, tx, state


def make_optimizer(cfg: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """Adam(W) with the learning rate scaled at `boundaries` ({step: scale}).

  `boundary_epochs` is applied by the step itself (`epoch_lr_scale`)."""
  boundaries = {int(k): float(v) for k, v in cfg.get('boundaries', {}).items()}
  schedule = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
  if cfg.weight_decay:
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                       weight_decay=cfg.weight_decay)
  return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)


def epoch_lr_scale(cfg: ml_collections.ConfigDict
                   ) -> Callable[[jax.Array], jax.Array] | None:
  """epoch -> learning-rate factor of `boundary_epochs` ({epoch: scale}):
  the product of the scales of every boundary epoch reached (0-based, so
  {300: 0.1} scales from the first step of epoch 300 on).

  The step multiplies Adam's updates by it (the same as scaling the learning
  rate, weight decay included). Computed from the traced epoch rather than
  baked into a schedule in steps, one compiled step serves any epoch length:
  the rounds of an active-learning run differ only in their labeled set.
  None without boundaries: the step then scales nothing.
  """
  pairs = sorted((float(e), float(s))
                 for e, s in cfg.get('boundary_epochs', {}).items())
  if not pairs:
    return None

  def scale(epoch: jax.Array) -> jax.Array:
    out = jnp.ones((), jnp.float32)
    for boundary, factor in pairs:
      out = jnp.where(epoch >= boundary, out * factor, out)
    return out

  return scale


def normalise(images: jax.Array) -> jax.Array:
  """uint8 -> [-1, 1], as the augmentation leaves its output."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def train_step(state: TrainState, batch, key: jax.Array,
               steps_per_epoch: jax.Array | int, *, graphdef, tx, method,
               lr_scale: Callable[[jax.Array], jax.Array] | None = None):
  """One optimiser step. `steps_per_epoch` is an argument, not a constant,
  so runs of other lengths reuse the compiled step."""
  key = jax.random.fold_in(key, state.step)
  epoch = state.step / steps_per_epoch

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.extra, copy=True)

    def forward(images, dropout_key):
      return model(images, train=True, rngs=nnx.Rngs(dropout=dropout_key))

    loss, aux = method(forward, batch, key, epoch=epoch)
    return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

  (loss, (aux, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if lr_scale is not None:
    updates = optax.tree.scale(lr_scale(epoch), updates)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
  return state.replace(step=state.step + 1, params=params, extra=extra,
                       opt_state=opt_state), metrics


def predict_step(state: TrainState, images: jax.Array, *, graphdef):
  model = nnx.merge(graphdef, state.params, state.extra, copy=True)
  return jax.nn.softmax(model(normalise(images), train=False))


# --------------------------------------------------------------------------
# The loop.


class Trainer:
  """Holds what the loop needs: mesh, jitted steps, streams, checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path,
               *, splits: Splits | None = None, cache=None):
    """`splits` (default: made from `config.split`) and `cache` (default:
    the one `config.data` names) let a caller choose the knees, as the
    active-learning loop does each round."""
    self.config = config
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.cache = cache or runtime.process_zero_first(
        lambda: sources.resolve_cache(config.data), 'koajax-cache')
    self.splits = splits or make_splits(self.cache.index, config.split)
    self.semi = config.method in methods.SEMI_SUPERVISED

    self.mesh = runtime.data_mesh(
        config.batch_size,
        *([config.unlabeled_batch_size or config.batch_size] if self.semi
          else []))
    self.replicated = jax.NamedSharding(self.mesh, jax.P())
    self.data_sharding = jax.NamedSharding(self.mesh, jax.P('data'))

    key = jax.random.key(config.seed)
    self.init_key, self.step_key = jax.random.split(key)
    self.steps_per_epoch = pipeline.steps_per_epoch(
        len(self.splits.labeled), config.batch_size)
    self.graphdef, tx, self.state = create_state(
        config, self.init_key, self.replicated)
    self.total_steps = config.num_epochs * self.steps_per_epoch
    self._train_step = jax.jit(
        functools.partial(train_step, graphdef=self.graphdef, tx=tx,
                          method=methods.from_config(config),
                          lr_scale=epoch_lr_scale(config.optimizer)),
        donate_argnums=0)
    # Replicated output: every process can read all probabilities.
    self._predict = jax.jit(functools.partial(predict_step,
                                              graphdef=self.graphdef),
                            out_shardings=self.replicated)
    self._params_finite = jax.jit(lambda params: jnp.all(jnp.stack(
        [jnp.isfinite(x).all() for x in jax.tree.leaves(params)])))
    self.streams = pipeline.make_streams(
        self.cache, labeled=self.splits.labeled,
        unlabeled=self.splits.unlabeled if self.semi else None,
        batch_size=config.batch_size,
        unlabeled_batch_size=config.unlabeled_batch_size or None,
        seed=config.seed, num_epochs=None, worker_count=config.data_workers)
    self.ckpt = ocp.CheckpointManager(
        (self.workdir / 'checkpoints').absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    self.best = {name: ocp.CheckpointManager(
        (self.workdir / f'best_{name}').absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        for name in ('balanced_accuracy', 'kappa')}
    self.best_values = {name: -math.inf for name in self.best}
    if jax.process_index() == 0:
      # What `koajax.evaluate` needs to rebuild this run, including knees
      # chosen by a caller rather than by config.split.
      (self.workdir / config_lib.CONFIG_JSON).write_text(
          config.to_json_best_effort(indent=1))
      tmp = self.workdir / f'{SPLITS_NPZ}.tmp.npz'
      np.savez(tmp, **dataclasses.asdict(self.splits))
      os.replace(tmp, self.workdir / SPLITS_NPZ)

  # -- checkpoints ---------------------------------------------------------

  def _save(self, step: int) -> None:
    items = {'state': ocp.args.StandardSave(self.state),
             'meta': ocp.args.JsonSave({'best_values': self.best_values})}
    items.update({name: grain.checkpoint.CheckpointSave(it)
                  for name, it in self.streams.items()})
    self.ckpt.save(step, args=ocp.args.Composite(**items))
    self.ckpt.wait_until_finished()

  def restore(self) -> int:
    """Restores the latest checkpoint, if any; returns the step to go on from."""
    step = self.ckpt.latest_step()
    if step is None:
      return 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
    items = {'state': ocp.args.StandardRestore(abstract),
             'meta': ocp.args.JsonRestore()}
    items.update({name: grain.checkpoint.CheckpointRestore(it)
                  for name, it in self.streams.items()})
    restored = self.ckpt.restore(step, args=ocp.args.Composite(**items))
    self.state = restored['state']
    self.best_values.update(restored['meta']['best_values'])
    log.info('Resumed from step %d in %s', step, self.ckpt.directory)
    return int(step)

  def _keep_if_best(self, step: int, scores: dict[str, float]) -> None:
    for name, manager in self.best.items():
      value = scores[name]
      if np.isfinite(value) and value > self.best_values[name]:
        self.best_values[name] = float(value)
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state)), force=True)
        manager.wait_until_finished()

  def checkpoint_names(self) -> list[str]:
    """'latest' and the best-by-metric checkpoints that exist."""
    names = ['latest'] if self.ckpt.latest_step() is not None else []
    return names + [f'best_{name}' for name, manager in self.best.items()
                    if manager.latest_step() is not None]

  def load_checkpoint(self, name: str) -> TrainState:
    """The state saved as `name`: 'latest', 'best_balanced_accuracy' or
    'best_kappa'."""
    managers = {'latest': self.ckpt,
                **{f'best_{k}': m for k, m in self.best.items()}}
    if name not in managers:
      raise ValueError(f'unknown checkpoint {name!r}; choose one of '
                       f'{", ".join(managers)}')
    step = managers[name].latest_step()
    if step is None:
      raise FileNotFoundError(
          f'no {name!r} checkpoint in {self.workdir}; found: '
          f'{", ".join(self.checkpoint_names()) or "none (train first)"}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
    return managers[name].restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']

  def start_from(self, workdir: str | Path, name: str = 'latest') -> None:
    """Takes the weights and norm statistics of checkpoint `name` ('latest'
    or 'best_<metric>') of another run of the same model; step and
    optimiser start afresh."""
    folder = 'checkpoints' if name == 'latest' else name
    manager = ocp.CheckpointManager((Path(workdir) / folder).absolute())
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no {name!r} checkpoint in {workdir}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
    saved = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
    self.state = self.state.replace(params=saved.params, extra=saved.extra)

  # -- data ------------------------------------------------------------------

  def _global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local.items() if k in ('image', 'kl')}

  def _next_batch(self) -> dict[str, Any]:
    return {name: self._global(next(it)) for name, it in self.streams.items()}

  # -- evaluation ------------------------------------------------------------

  def predict(self, state: TrainState, indices: np.ndarray,
              cache=None) -> np.ndarray:
    """Class probabilities of the knees at `indices` of `cache` (default:
    the training cache), in order."""
    batch = self.config.eval_batch_size
    # Every batch, the last one too, is padded to one shape that splits
    # evenly over the devices: one compiled program for any number of knees.
    padded = -(-batch // self.mesh.size) * self.mesh.size
    probs = []
    for b in pipeline.eval_batches(cache or self.cache, indices,
                                   batch_size=batch,
                                   sharding=pipeline.Sharding(0, 1)):
      images = b['image']
      pad = padded - len(images)
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
      # Every process holds all images; each device takes its rows.
      out = self._predict(state, jax.make_array_from_callback(
          images.shape, self.data_sharding, lambda rows: images[rows]))
      probs.append(np.asarray(out)[:len(b['image'])])
    return np.concatenate(probs)

  def evaluate(self, state: TrainState, indices: np.ndarray) -> dict[str, Any]:
    probs = self.predict(state, indices)
    y = self.cache.index['kl'].to_numpy()[indices]
    return metrics_lib.kl_metrics(y, probs)

  # -- the loop ----------------------------------------------------------------

  def _check_finite(self, step: int, loss: float) -> None:
    """Stops before a non-finite loss or weights reach a checkpoint."""
    if np.isfinite(loss) and bool(self._params_finite(self.state.params)):
      return
    raise NonFiniteLossError(
        f'training diverged at step {step} (loss {loss}, or non-finite '
        f'weights); stopping. The last good checkpoint (step '
        f'{self.ckpt.latest_step()}) is kept in {self.ckpt.directory}. '
        f'Lower optimizer.learning_rate or check the data.')

  def train(self) -> None:
    cfg = self.config
    writer = metric_writers.MetricWriter(self.workdir,
                                         enabled=jax.process_index() == 0)
    step = self.restore()
    eval_every = cfg.eval_every_epochs * self.steps_per_epoch
    bar = tqdm.tqdm(total=self.total_steps, initial=step, unit='step',
                    disable=jax.process_index() != 0 or not cfg.progress_bar)
    pending = None
    while step < self.total_steps:
      self.state, metrics = self._train_step(
          self.state, self._next_batch(), self.step_key, self.steps_per_epoch)
      step += 1
      bar.update()
      if step % cfg.log_every_steps == 0 or step % eval_every == 0 \
          or step == self.total_steps:
        pending = jax.device_get(metrics)
        self._check_finite(step, pending['loss'])
        scalars = {f'train/{k}': float(v) for k, v in pending.items()}
        scalars['train/epoch'] = step / self.steps_per_epoch
        writer.write_scalars(step, scalars)
        bar.set_postfix(loss=f'{pending["loss"]:.4f}')
      if step % eval_every == 0 or step == self.total_steps:
        scores = self.evaluate(self.state, self.splits.val)
        writer.write_scalars(step, {f'val/{k}': float(v)
                                    for k, v in scores.items()
                                    if np.ndim(v) == 0})
        self._keep_if_best(step, scores)
        self._save(step)
    bar.close()
    writer.close()

  def split_indices(self, split: str) -> np.ndarray:
    """Rows of the training cache in `split` ('test' falls back to 'val'
    when no site is held out)."""
    if split == 'test' and not len(self.splits.test):
      split = 'val'
    if split not in ('labeled', 'unlabeled', 'val', 'test'):
      raise ValueError(f'unknown split {split!r}; choose labeled, unlabeled, '
                       'val or test')
    return getattr(self.splits, split)

  def test(self) -> dict[str, Any] | None:
    """Evaluates the best-by-BA checkpoint on the test split."""
    name = 'best_balanced_accuracy'
    state = self.load_checkpoint(name) if name in self.checkpoint_names() \
        else self.state
    return self.write_report(self.workdir, state, self.split_indices('test'))

  def write_report(self, out_dir: str | Path, state: TrainState,
                   indices: np.ndarray, cache=None) -> dict[str, Any] | None:
    """metrics.json, predictions.csv and plots of `state` on `indices`.

    Every process predicts (the devices work together); process 0 writes
    and returns the report, the others return None.
    """
    cache = cache or self.cache
    probs = self.predict(state, indices, cache)
    if jax.process_index() != 0:
      return None
    index = cache.index.iloc[indices]
    return report.write_report(
        out_dir, knee_ids=index['knee_id'].to_numpy(),
        sides=index['side'].to_numpy(), y_true=index['kl'].to_numpy(),
        probs=probs, subject_ids=index['subject_id'].to_numpy(),
        n_resamples=self.config.bootstrap_resamples, seed=self.config.seed)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | Path) -> dict[str, Any] | None:
  """Trains, then reports on the test split; returns metrics.json's content
  (None on processes other than 0)."""
  trainer = Trainer(config, workdir)
  log.info('%s: %d labeled, %d unlabeled, %d val, %d test knees; '
           '%d steps of %d', config.method, len(trainer.splits.labeled),
           len(trainer.splits.unlabeled) if trainer.semi else 0,
           len(trainer.splits.val), len(trainer.splits.test),
           trainer.total_steps, config.batch_size)
  with jax.set_mesh(trainer.mesh):
    trainer.train()
    result = trainer.test()
  if result is None:
    return None
  print(f'{config.method} test: {report.headline(result)}; '
        f'report in {Path(workdir) / "metrics.json"}')
  return result
