"""Prediction apart from training: finished runs, read-only, every head.

    predictor = Predictor.from_runs(['RUN_A', 'RUN_B'], checkpoint='best')
    probs = predictor.predict(cache, rows)        # {head: (n, classes)}
                                                  # (+ 'landmarks')

A landmark model's prediction also holds 'landmarks', (n, 16, 2) (x, y)
view pixels, its members' mean. With `shift` each knee's view is first moved
by a translation of up to `shift` px per axis, drawn for the knee from its
cache row (the same in every evaluation), and the points are moved back:
the fine localiser is measured as it works behind a coarse one, whose ROI is
never centred on the truth (a view cut around the true joint centre would
put that landmark at the centre for free).

A predictor holds one or several members (a run's weights) of one task. Each
member's forward pass is jitted over a data-parallel mesh. A model that takes
`keypoints=` (the keypoint pooling network) gets the knees' keypoints of the
'keypoints' view, moved with every crop. With `crop` every
knee is first cut to its centre `crop` px (multi-task OARSI trains on random
300 px crops of a 310 px view); a run whose method state holds `input_norm`
has its inputs standardised with it, as in training. With test-time
augmentation (`tta='five_crop'`) every knee is also seen as its four corner
crops and its centre crop of `tta_crop` px, and the member's output is the
mean over the five. An ensemble averages its members' probabilities (the
default) or their logits (`ensemble='logits'`, then one softmax).

`from_runs` reads a run's config.json and checkpoint and writes nothing, so
it works on a read-only copy of a run and leaves the run byte-identical. A
checkpoint whose weights hold NaN or Inf is refused when loaded
(`NonFiniteWeights`, naming the checkpoint, its step and folder), before
anything is predicted with it.
"""

from __future__ import annotations

from collections.abc import Sequence
import copy
import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from koajax import cli
from koajax import config_lib
from koajax import tasks as tasks_lib
from koajax.data import augment
from koajax.data import pipeline
from koajax.data import views
from koajax.train import checkpoints as checkpoints_lib
from koajax.train import step as step_lib

TTA = ('none', 'five_crop')
INPUT_NORM = 'input_norm'  # see koajax.methods
ENSEMBLE = ('probs', 'logits')
DEFAULT_SELECTION = ('balanced_accuracy', 'kappa')


class NonFiniteWeights(cli.BadInput):
  """A checkpoint whose weights hold NaN or Inf."""


def non_finite_leaves(tree) -> list[str]:
  """Paths of the floating-point arrays of `tree` holding NaN or Inf."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
      continue
    # Replicated: the local copy is the whole array, on any process.
    local = (leaf.addressable_data(0) if isinstance(leaf, jax.Array)
             else leaf)
    if not np.isfinite(np.asarray(local)).all():
      bad.append(jax.tree_util.keystr(path, simple=True, separator='/'))
  return bad


def five_crop_origins(h: int, w: int, size: int) -> list[tuple[int, int]]:
  """(top, left) of `five_crop`'s crops of an h x w image, in its order."""
  if not 0 < size < min(h, w):
    raise ValueError(f'five_crop needs 0 < tta_crop < {min(h, w)} (the '
                     f'view is {h}x{w} px), got {size}')
  tops = (0, 0, h - size, h - size, (h - size) // 2)
  lefts = (0, w - size, 0, w - size, (w - size) // 2)
  return list(zip(tops, lefts))


def five_crop(images: jax.Array, size: int) -> list[jax.Array]:
  """The four corner crops and the centre crop of `size` px of the last two
  axes (top-left, top-right, bottom-left, bottom-right, centre)."""
  return [images[..., t:t + size, l:l + size]
          for t, l in five_crop_origins(*images.shape[-2:], size)]


@dataclasses.dataclass(frozen=True)
class Member:
  """One set of weights: a run's model and its state."""
  graphdef: Any
  params: Any
  extra: Any
  name: str = ''
  step: int = -1  # the training step the weights are from
  input_norm: Any = None  # {'mean', 'std'} from the method state, or None
  # The run's whole method state (the coherence mixture, say), for the
  # method's own report sections; None for weights without a run.
  method_state: Any = None


def centre_crop(images: jax.Array, size: int) -> jax.Array:
  """The centre `size` px of the last two axes (as `five_crop`'s last)."""
  return five_crop(images, size)[-1] if size else images


def crop_view(x: jax.Array, keypoints: jax.Array | None, size: int
              ) -> tuple[jax.Array, jax.Array | None]:
  """The centre `size` px crop of `x` (none for 0) and its keypoints ((x,
  y) pixels, or None) shifted to the crop's origin."""
  return _cropped_views(x, keypoints, size, tta=False)[0] if size else (
      x, keypoints)


def takes_keypoints(model: nnx.Module) -> bool:
  """Whether `model` is called with the knees' keypoints (`keypoints=`)."""
  return 'keypoints' in inspect.signature(model.__call__).parameters


def _cropped_views(x: jax.Array, keypoints: jax.Array | None, size: int,
                   tta: bool) -> list[tuple[jax.Array, jax.Array | None]]:
  """(image, keypoints) of the centre crop (or, with `tta`, the five crops)
  of `size` px; keypoints ((x, y) pixels) shifted to each crop's origin."""
  origins = five_crop_origins(*x.shape[-2:], size)
  views = []
  for top, left in (origins if tta else origins[-1:]):
    points = None if keypoints is None else (
        keypoints - jnp.array([left, top], keypoints.dtype))
    views.append((x[..., top:top + size, left:left + size], points))
  return views


def shift_images(images: jax.Array, shifts: jax.Array) -> jax.Array:
  """Each (H, W) image of `images` moved by its (x, y) shift in pixels
  (bilinear, zero fill): the content at p is at p + shift after."""
  eye = jnp.eye(2, dtype=jnp.float32)
  return jax.vmap(lambda im, t: augment.affine_warp(
      im, eye, -t[::-1]))(images, shifts)


def knee_shifts(indices: np.ndarray, shift: float, seed: int = 0
                ) -> np.ndarray:
  """(n, 2) float32 (x, y) shifts, uniform in +-`shift` px, one per cache
  row, a function of (seed, row) only."""
  return np.stack([np.random.default_rng([seed, int(i)]).uniform(
      -shift, shift, 2) for i in indices]).astype(np.float32).reshape(-1, 2)


def _member_outputs(params, extra, input_norm, images, keypoints, shifts,
                    dropout_key=None, *, graphdef, crop: int, tta: str,
                    tta_crop: int, ensemble: str) -> dict[str, jax.Array]:
  """{head: mean probabilities (or logits) over the TTA views}, and
  'landmarks' where the model predicts them (no crop or TTA then:
  `check_settings`). `keypoints` (or None) reach the model when it takes
  them. With `dropout_key` the model's dropout is on (MC dropout; norms
  stay in inference mode)."""
  model = nnx.merge(graphdef, params, extra, copy=True)
  sampled = {} if dropout_key is None else {
      'dropout': True, 'rngs': nnx.Rngs(dropout=dropout_key)}
  if not takes_keypoints(model):
    keypoints = None
  if shifts is not None:
    images = shift_images(images, shifts)
  x = step_lib.normalise(images)
  if input_norm is not None:
    x = (x - input_norm['mean']) / input_norm['std']
  views = [(x, keypoints)]
  if crop:
    views = _cropped_views(x, keypoints, crop, tta=False)
  if tta == 'five_crop':
    views = _cropped_views(*views[0], tta_crop, tta=True)
  full = [model(v, train=False, **sampled,
                **({} if k is None else {'keypoints': k}))
          for v, k in views]
  outs = [o['logits'] for o in full]
  combine = ((lambda z: z.astype(jnp.float32)) if ensemble == 'logits'
             else jax.nn.softmax)
  result = {head: jnp.mean(jnp.stack([combine(o[head]) for o in outs]),
                           axis=0)
            for head in outs[0]}
  if 'landmarks' in full[0]:
    points = full[0]['landmarks'].astype(jnp.float32)
    result['landmarks'] = (points if shifts is None
                           else points - shifts[:, None, :])
  return result


def _member_samples(params, extra, input_norm, images, keypoints, keys, *,
                    num_samples: int, **settings) -> dict[str, jax.Array]:
  """{head: (T, B, classes)} probabilities of `num_samples` MC-dropout
  passes; knee b's pass t has dropout key `split(keys[b], T)[t]`, so its
  samples do not depend on the other knees of the batch. vmap shares what
  comes before the first dropout among the passes
  (`koajax.active.mc_dropout`)."""

  def one_knee(image, points, key):
    return jax.vmap(lambda k: _member_outputs(
        params, extra, input_norm, image[None],
        None if points is None else points[None], None, k,
        **settings))(jax.random.split(key, num_samples))

  out = jax.vmap(one_knee, in_axes=(0, None if keypoints is None else 0, 0))(
      images, keypoints, keys)  # {head: (B, T, 1, classes)}
  return {name: jnp.swapaxes(v[:, :, 0], 0, 1) for name, v in out.items()}


def has_dropout(model: nnx.Module) -> bool:
  """Whether MC dropout can sample `model`: it takes `dropout=` and holds
  a dropout layer with a rate above 0."""
  if 'dropout' not in inspect.signature(model.__call__).parameters:
    return False
  return any(float(getattr(node, 'rate', 0.0) or 0.0) > 0
             for _, node in nnx.iter_graph(model)
             if type(node).__name__ == 'Dropout')


def check_settings(task: tasks_lib.Task, *, tta: str, tta_crop: int,
                   ensemble: str, crop: int = 0, shift: float = 0.0) -> None:
  """Raises ValueError naming the `predict.` field that cannot work with
  `task`'s view (checked when a run's config is read, not after training)."""
  if tta not in TTA:
    raise ValueError(f'unknown predict.tta {tta!r}; choose one of '
                     f'{", ".join(TTA)}')
  size = task.view_size or views.VIEW_PX[task.view]
  if not 0 <= crop < size:
    raise ValueError(f'predict.crop must lie in 0..{size - 1} px for the '
                     f'{size} px {task.view} view (0: none); got {crop}')
  size = crop or size
  if tta == 'five_crop':
    if not 0 < tta_crop < size:
      raise ValueError(f'predict.tta_crop must lie in 1..{size - 1} px for '
                       f'the {size} px {task.view} view; got {tta_crop}')
  if ensemble not in ENSEMBLE:
    raise ValueError(f'unknown predict.ensemble {ensemble!r}; choose one '
                     f'of {", ".join(ENSEMBLE)}')
  if task.landmarks and (crop or tta != 'none'):
    raise ValueError('a landmark model predicts on the whole view: set '
                     "predict.crop=0 and predict.tta='none'")
  if shift and not task.landmarks:
    raise ValueError('predict.shift moves the view of a landmark model; '
                     f'task {task.name!r} has none: set it to 0')
  if shift < 0:
    raise ValueError(f'predict.shift must be >= 0 px; got {shift}')


class Predictor:
  """Probabilities of every head of a task, from one model or an ensemble."""

  def __init__(self, members: Sequence[Member], task: tasks_lib.Task,
               mesh: jax.sharding.Mesh, *, batch_size: int = 64,
               tta: str = 'none', tta_crop: int = 0,
               ensemble: str = 'probs', crop: int = 0, shift: float = 0.0):
    if not members:
      raise ValueError('a predictor needs at least one run')
    check_settings(task, tta=tta, tta_crop=tta_crop, ensemble=ensemble,
                   crop=crop, shift=shift)
    self.shift = shift
    self.members = list(members)
    self.task = task
    self.mesh = mesh
    self.batch_size = batch_size
    self.ensemble = ensemble
    self._data = jax.NamedSharding(mesh, jax.P('data'))
    # Replicated output: every process can read all probabilities.
    replicated = jax.NamedSharding(mesh, jax.P())
    self._settings = dict(crop=crop, tta=tta, tta_crop=tta_crop)
    self._fns = [jax.jit(functools.partial(
        _member_outputs, graphdef=m.graphdef, ensemble=ensemble,
        **self._settings), out_shardings=replicated)
                 for m in self.members]
    self._samplers = {}  # num_samples -> jitted `_member_samples`

  def with_weights(self, members: Sequence[Member]) -> Predictor:
    """This predictor with other weights of the same models: the compiled
    programs are kept (the trainer predicts at every evaluation)."""
    if len(members) != len(self.members):
      raise ValueError(f'{len(members)} members for a predictor of '
                       f'{len(self.members)}')
    other = copy.copy(self)
    other.members = list(members)
    return other

  @classmethod
  def from_runs(cls, workdirs: Sequence[str | Path], *,
                checkpoint: str = checkpoints_lib.BEST,
                mesh: jax.sharding.Mesh | None = None,
                **options) -> Predictor:
    """Loads `checkpoint` of each run read-only. `options` override the
    first run's `predict` config (tta, tta_crop, ensemble) and
    `batch_size` its eval_batch_size."""
    from koajax import runtime
    configs = [config_lib.load_run_config(w) for w in workdirs]
    task = tasks_lib.from_config(configs[0])
    for w, c in zip(workdirs, configs):
      if tasks_lib.from_config(c).head_names != task.head_names:
        raise ValueError(f'{w} predicts {tasks_lib.from_config(c).head_names},'
                         f' {workdirs[0]} {task.head_names}: an ensemble '
                         'needs runs of one task')
    first = configs[0]
    settings = {'batch_size': first.eval_batch_size,
                **dict(first.get('predict', {})), **options}
    mesh = mesh or runtime.data_mesh(settings['batch_size'])
    members = [load_member(w, c, checkpoint, mesh)
               for w, c in zip(workdirs, configs)]
    return cls(members, task, mesh, **settings)

  def _padded(self) -> int:
    # Every batch, the last one too, is padded to one shape that splits
    # evenly over the devices: one compiled program for any number of knees.
    return -(-self.batch_size // self.mesh.size) * self.mesh.size

  def predict_images(self, images: np.ndarray,
                     keypoints: np.ndarray | None = None,
                     shifts: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
    """{head: (n, classes)} probabilities (and 'landmarks') of n <=
    batch_size view images (with their (n, K, 2) keypoints in the
    'keypoints' view, and (n, 2) (x, y) pixel shifts of the views)."""
    outs = self.member_outputs(images, keypoints, shifts)
    mean = {name: np.mean([o[name] for o in outs], axis=0)
            for name in outs[0]}
    if self.ensemble == 'logits':
      return {name: (np.asarray(jax.nn.softmax(z))
                     if name in self.task.head_names else z)
              for name, z in mean.items()}
    return mean

  def _shard(self, a: np.ndarray) -> jax.Array:
    a = np.concatenate([a, np.repeat(a[-1:], self._padded() - len(a), 0)])
    # Every process holds all images; each device takes its rows.
    return jax.make_array_from_callback(a.shape, self._data,
                                        lambda rows: a[rows])

  def member_outputs(self, images: np.ndarray,
                     keypoints: np.ndarray | None = None,
                     shifts: np.ndarray | None = None
                     ) -> list[dict[str, np.ndarray]]:
    """`predict_images` of each member on its own: probabilities, or
    logits with `ensemble='logits'`."""
    n = len(images)
    sharded = self._shard(images)
    points = None if keypoints is None else self._shard(keypoints)
    moved = None if shifts is None else self._shard(shifts)
    outs = [jax.device_get(fn(m.params, m.extra, m.input_norm, sharded,
                              points, moved))
            for fn, m in zip(self._fns, self.members)]
    return [{name: o[name][:n] for name in o} for o in outs]

  def dropout_samples(self, images: np.ndarray,
                      keypoints: np.ndarray | None, keys: jax.Array, *,
                      num_samples: int) -> dict[str, np.ndarray]:
    """{head: (T, n, classes)} MC-dropout probabilities of the first
    member (`has_dropout`) on n <= batch_size view images, with one
    dropout key per knee (`keys`, (n,))."""
    if num_samples < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    if num_samples not in self._samplers:
      self._samplers[num_samples] = jax.jit(functools.partial(
          _member_samples, graphdef=self.members[0].graphdef,
          num_samples=num_samples, ensemble='probs', **self._settings),
          out_shardings=jax.NamedSharding(self.mesh, jax.P()))
    member, n = self.members[0], len(images)
    out = jax.device_get(self._samplers[num_samples](
        member.params, member.extra, member.input_norm, self._shard(images),
        None if keypoints is None else self._shard(keypoints),
        self._shard(keys)))
    return {head: out[head][:, :n] for head in self.task.head_names}

  def predict(self, cache, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{head: (len(indices), classes)} probabilities of cache rows, in
    order (and 'landmarks' of a landmark task)."""
    batches = [self.predict_images(
                   b['image'], b.get('keypoints'),
                   knee_shifts(b['index'], self.shift) if self.shift else None)
               for b in pipeline.eval_batches(
                   cache, indices, view=self.task.view,
                   view_size=self.task.view_size, batch_size=self.batch_size,
                   sharding=pipeline.Sharding(0, 1))]
    return {name: np.concatenate([b[name] for b in batches])
            for name in self.task.outputs}


def load_member(workdir: str | Path, config: ml_collections.ConfigDict,
                checkpoint: str, mesh: jax.sharding.Mesh) -> Member:
  """Checkpoint `checkpoint` of the run in `workdir`, read-only."""
  task = tasks_lib.from_config(config)
  ckpts = checkpoints_lib.Checkpoints(
      workdir, config.get('selection', DEFAULT_SELECTION), read_only=True)
  replicated = jax.NamedSharding(mesh, jax.P())
  abstract = step_lib.abstract_state(
      config, task, ckpts.method_state_shapes(checkpoint), replicated)
  state = ckpts.load(checkpoint, abstract)
  bad = non_finite_leaves({'params': state.params, 'extra': state.extra})
  if bad:
    name = ckpts.resolve(checkpoint)
    more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
    others = [n for n in ckpts.names() if n != name]
    raise NonFiniteWeights(
        f'checkpoint {name!r} (step {int(state.step)}, '
        f'{ckpts.step_dir(name)}) holds NaN or Inf weights ({bad[0]}{more}) '
        'and cannot predict; choose another checkpoint with --checkpoint ('
        f'{", ".join(others) or "none left"}) or train again')
  graphdef = step_lib.abstract_model(config, task)[0]
  return Member(graphdef, state.params, state.extra, name=str(workdir),
                step=int(state.step), input_norm=_input_norm(state),
                method_state=state.method_state)


def _input_norm(state) -> Any:
  method_state = state.method_state
  if isinstance(method_state, dict) and INPUT_NORM in method_state:
    return method_state[INPUT_NORM]
  return None


def state_member(graphdef, state, name: str = '') -> Member:
  """A member from a state in memory (the trainer's)."""
  return Member(graphdef, state.params, state.extra, name=name,
                input_norm=_input_norm(state), method_state=state.method_state)
