"""The train state and the pure, jitted train step.

    state, metrics = train_step(state, batch, key, steps_per_epoch)

is a pure function of plain pytrees, jitted with the state donated; its RNG
is `fold_in(key, step)`, so a resumed run draws exactly what an
uninterrupted run would. The method's own state (fitted before training or
updated after each evaluation) rides in the train state, so it is
checkpointed with the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from koajax import models
from koajax import tasks as tasks_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of nnx.Param
  extra: Any  # nnx.State of everything else (batch-norm statistics)
  opt_state: Any
  method_state: Any  # the method's pytree ({} for stateless methods)


def model_fn(config: ml_collections.ConfigDict, task: tasks_lib.Task
             ) -> Callable[[nnx.Rngs], nnx.Module]:
  return lambda rngs: models.create(config.model, heads=task.num_classes,
                                    rngs=rngs)


def abstract_model(config: ml_collections.ConfigDict,
                   task: tasks_lib.Task) -> tuple[Any, Any, Any]:
  """(graphdef, params, extra) as shapes only: nothing is computed."""
  make = model_fn(config, task)
  return nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))),
                   nnx.Param, ...)


def _initializer(config: ml_collections.ConfigDict, task: tasks_lib.Task):
  """(optimizer, init(key, method_state) -> TrainState)."""
  tx = make_optimizer(config.optimizer)
  make = model_fn(config, task)

  def init(key, method_state):
    _, params, extra = nnx.split(make(nnx.Rngs(params=key)), nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      extra=extra, opt_state=tx.init(params),
                      method_state=method_state)

  return tx, init


def create_state(config: ml_collections.ConfigDict, task: tasks_lib.Task,
                 key: jax.Array, method_state: Any = None,
                 sharding: jax.sharding.Sharding | None = None):
  """(graphdef, optimizer, state); the state is initialised by one jit call."""
  tx, init = _initializer(config, task)
  # Eager initialisation would compile every layer's initialiser separately.
  graphdef = abstract_model(config, task)[0]
  state = jax.jit(init, out_shardings=sharding)(
      key, {} if method_state is None else method_state)
  return graphdef, tx, state


def abstract_state(config: ml_collections.ConfigDict, task: tasks_lib.Task,
                   method_state: Any, sharding: jax.sharding.Sharding):
  """The TrainState of a run as shapes placed by `sharding`, for restoring
  a checkpoint into without initialising anything. `method_state` gives the
  shapes of the method's state."""
  _, init = _initializer(config, task)
  shapes = jax.eval_shape(init, jax.random.key(0), method_state)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      shapes)


def make_optimizer(cfg: ml_collections.ConfigDict
                   ) -> optax.GradientTransformationExtraArgs:
  """Adam with weight decay, the learning rate scaled at `boundaries`
  ({step: scale}), and optionally the heads trained alone at first.

    weight_decay       the decay factor (0: none);
    weight_decay_mode  'decoupled': AdamW, the decay added to Adam's update;
                       'l2': PyTorch's Adam(weight_decay=...), the decay
                       added to the gradient before Adam's moments;
    heads_only_epochs  for this many epochs only the parameters under the
                       model's `heads` are trained (a pretrained backbone
                       keeps its weights while fresh heads settle).

  The update takes the traced epoch as `tx.update(..., epoch=epoch)`.
  `boundary_epochs` is applied by the step itself (`epoch_lr_scale`).
  """
  boundaries = {int(k): float(v) for k, v in cfg.get('boundaries', {}).items()}
  schedule = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
  decay = float(cfg.get('weight_decay', 0.0))
  mode = cfg.get('weight_decay_mode', 'decoupled')
  heads_only = float(cfg.get('heads_only_epochs', 0.0))
  if not heads_only:
    # The transforms of earlier runs, so their checkpoints still restore.
    if decay and mode == 'l2':
      tx = optax.chain(optax.add_decayed_weights(decay),
                       optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
    elif decay:
      tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=decay)
    else:
      tx = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)
    return optax.with_extra_args_support(tx)

  def adam() -> optax.GradientTransformation:
    parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2)]
    if decay:
      parts.insert(0 if mode == 'l2' else 1, optax.add_decayed_weights(decay))
    return optax.chain(*parts)

  # Each group has its own Adam, so the backbone's starts when it is
  # unfrozen, with fresh moments and bias correction, as the reference
  # code's new optimiser does (the heads' Adam goes on).
  return optax.chain(
      optax.multi_transform(
          {HEADS: adam(), BACKBONE: frozen_before(adam(), heads_only)},
          head_labels, mask_compatible_extra_args=True),
      optax.scale_by_learning_rate(schedule))


HEADS, BACKBONE = 'heads', 'backbone'


def head_labels(params: Any) -> Any:
  """HEADS for the parameters under the model's `heads`, else BACKBONE."""
  def label(path, _):
    first = path[0]
    return HEADS if getattr(first, 'key', None) == 'heads' else BACKBONE
  labels = jax.tree_util.tree_map_with_path(label, params)
  if HEADS not in jax.tree.leaves(labels):
    raise ValueError('optimizer.heads_only_epochs needs a model with its '
                     'classifiers under `heads`; this one has none')
  return labels


def frozen_before(inner: optax.GradientTransformation,
                  epochs: float) -> optax.GradientTransformationExtraArgs:
  """`inner`, with no update and its state untouched before `epochs`."""

  def update(updates, state, params=None, *, epoch, **extra):
    del extra
    new_updates, new_state = inner.update(updates, state, params)
    frozen = epoch < epochs
    new_updates = jax.tree.map(
        lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    new_state = jax.tree.map(lambda new, old: jnp.where(frozen, old, new),
                             new_state, state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def epoch_lr_scale(cfg: ml_collections.ConfigDict
                   ) -> Callable[[jax.Array], jax.Array] | None:
  """epoch -> learning-rate factor, the product of:

    boundary_epochs  {epoch: scale}: the scales of every boundary epoch
                     reached (0-based, so {300: 0.1} scales from the first
                     step of epoch 300 on);
    warmup_epochs    a linear ramp from 0 to 1 over these epochs;
    cosine_epochs    a cosine decay from 1 to 0 over these epochs.

  The step multiplies Adam's updates by it (the same as scaling the learning
  rate, weight decay included). Computed from the traced epoch rather than
  baked into a schedule in steps, one compiled step serves any epoch length:
  runs that differ only in their labeled set (rounds of labeling) share it.
  None when none is set: the step then scales nothing.
  """
  pairs = sorted((float(e), float(s))
                 for e, s in cfg.get('boundary_epochs', {}).items())
  warmup = float(cfg.get('warmup_epochs', 0))
  cosine = float(cfg.get('cosine_epochs', 0))
  if not pairs and not warmup and not cosine:
    return None

  def scale(epoch: jax.Array) -> jax.Array:
    out = jnp.ones((), jnp.float32)
    for boundary, factor in pairs:
      out = jnp.where(epoch >= boundary, out * factor, out)
    # optax.linear_schedule and cosine_decay_schedule give these values to
    # float32 rounding; the quick presets' README figures were measured with
    # these two lines, and a rounding change moves a short run's result.
    if warmup:
      out = out * jnp.minimum(1.0, epoch / warmup)
    if cosine:
      t = jnp.clip(epoch / cosine, 0.0, 1.0)
      out = out * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return out

  return scale


def normalise(images: jax.Array) -> jax.Array:
  """uint8 -> [-1, 1], as the augmentation leaves its output."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def forward_parts(call: Callable[..., Any], parts, key: jax.Array, *,
                  coupled: bool, **inputs: Any) -> Any:
  """`call(images, key, **inputs)` on one batch given as parts: arrays that
  concatenate to it along the batch axis (the labeled and unlabeled knees
  of a consistency pool, say), each input a tuple of as many parts.

  When the call couples the knees of a batch (`coupled`: batch norm's
  statistics), the parts run as one call on their concatenation. Otherwise
  each part is its own call, with the key folded by its position, and the
  outputs are concatenated: the same function of each knee, but a part
  that arrives sharded over the data mesh stays where it is. Concatenating
  the parts first would move knees between devices and give each device
  more of them, and XLA's CPU convolutions run slower per knee on larger
  per-device batches (a Semixup step on 32 CPU devices: 24.8 s on the
  concatenated pool, 22.3 s per part; benchmarks/README.md). The split does
  not depend on the mesh, so a step draws the same on any number of devices.
  """
  parts = tuple(parts)
  if coupled or len(parts) == 1:
    return call(jnp.concatenate(parts), key,
                **{k: jnp.concatenate(v) for k, v in inputs.items()})
  outs = [call(part, jax.random.fold_in(key, i),
               **{k: v[i] for k, v in inputs.items()})
          for i, part in enumerate(parts)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def train_step(state: TrainState, batch, key: jax.Array,
               steps_per_epoch: jax.Array | int, *, graphdef, tx, method,
               lr_scale: Callable[[jax.Array], jax.Array] | None = None):
  """One optimiser step. `steps_per_epoch` is an argument, not a constant,
  so runs of other lengths reuse the compiled step."""
  key = jax.random.fold_in(key, state.step)
  epoch = state.step / steps_per_epoch

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.extra, copy=True)
    coupled = bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))

    def call(images, dropout_key, **inputs):
      # `inputs`: what a model takes besides the images (the keypoints of
      # the keypoint pooling network), handed on by the method.
      return model(images, train=True, rngs=nnx.Rngs(dropout=dropout_key),
                   **inputs)

    def forward(images, dropout_key, **inputs):
      if isinstance(images, (tuple, list)):
        return forward_parts(call, images, dropout_key, coupled=coupled,
                             **inputs)
      return call(images, dropout_key, **inputs)

    loss, aux = method.loss(forward, batch, key, epoch=epoch,
                            state=state.method_state)
    return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

  (loss, (aux, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                  epoch=epoch)
  if lr_scale is not None:
    updates = optax.tree.scale(lr_scale(epoch), updates)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
  return state.replace(step=state.step + 1, params=params, extra=extra,
                       opt_state=opt_state), metrics
