"""Multi-task KL + OARSI grading: loss, augmentation, schedule, predictor.

Numbers are checked against NumPy written here (and PyTorch's Adam where
the test extra is installed), never against koajax itself.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from koajax import cli
from koajax import losses
from koajax import methods
from koajax import tasks
from koajax.data import augment
from koajax.methods import multitask
from koajax.train import predictor as predictor_lib
from koajax.train import step as step_lib

HEADS = tasks.get('kl_oarsi').head_names


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_multi_head_cross_entropy_is_the_mean_over_graded_heads():
  rng = np.random.default_rng(0)
  logits = {h: rng.normal(size=(6, 5 if h == 'kl' else 4)).astype(np.float32)
            for h in HEADS}
  labels = {h: rng.integers(0, 4, 6).astype(np.int32) for h in HEADS}
  labels['kl'][[1, 4]] = -1  # two knees without a KL grade
  labels['jsn_l'][:] = -1  # a head with no graded knee in the batch
  loss, aux = losses.multi_head_cross_entropy(
      logits={h: jnp.asarray(v) for h, v in logits.items()},
      labels={h: jnp.asarray(v) for h, v in labels.items()})
  expected = []
  for h in HEADS:
    graded = labels[h] >= 0
    if not graded.any():
      continue
    nll = -_log_softmax(logits[h].astype(np.float64))[
        np.flatnonzero(graded), labels[h][graded]]
    expected.append(nll.mean())
    np.testing.assert_allclose(aux[f'cross_entropy/{h}'], nll.mean(),
                               rtol=1e-5)
  assert len(expected) == 6
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  none = {h: jnp.full((6,), -1, jnp.int32) for h in HEADS}
  loss, _ = losses.multi_head_cross_entropy(
      logits={h: jnp.asarray(v) for h, v in logits.items()}, labels=none)
  assert float(loss) == 0.0


def test_crop_augment_without_noise_rotation_or_gamma_is_a_plain_crop():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (20, 20)).astype(np.uint8)
  crops = {(r, c): (image[r:r + 16, c:c + 16] / 255.0 - 0.5) / 0.5
           for r in range(5) for c in range(5)}
  seen = set()
  for seed in range(40):
    out = np.asarray(augment.crop_augment(
        jax.random.key(seed), jnp.asarray(image), crop=16, noise_p=0.0,
        max_rotation_deg=0.0, gamma_p=0.0))
    assert out.shape == (16, 16)
    match = [k for k, v in crops.items() if np.allclose(out, v, atol=1e-5)]
    assert len(match) == 1, 'not one of the 25 integer-offset crops'
    seen.add(match[0])
  # The offsets reach every corner of the 5 x 5 choices, not one fixed crop.
  assert len(seen) > 10 and {r for r, _ in seen} == set(range(5))
  with pytest.raises(ValueError, match='cannot crop 32 px'):
    augment.crop_augment(jax.random.key(0), jnp.asarray(image), crop=32)


def test_view_statistics_are_the_mean_and_std_of_every_pixel():
  rng = np.random.default_rng(2)
  batches = [rng.integers(0, 256, (n, 8, 8)).astype(np.uint8)
             for n in (3, 5, 1)]
  pixels = np.concatenate([b.ravel() for b in batches]) / 255.0 * 2 - 1
  stats = multitask.view_statistics(iter(batches))
  np.testing.assert_allclose(stats['mean'], pixels.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats['std'], pixels.std(), rtol=1e-5)


def _training_data(labels, images=None):
  return methods.TrainingData(index=[0] * len(labels['kl']), labels=labels,
                              seed=0, images=images)


def test_a_cache_without_oarsi_grades_is_refused_naming_the_heads():
  method = methods.from_config(ml_collections.ConfigDict(
      {'method': 'multitask', 'method_kwargs': {}}), tasks.get('kl_oarsi'))
  labels = {h: np.full(4, -1, np.int32) for h in HEADS}
  labels['kl'][:] = [0, 1, 2, 3]
  with pytest.raises(cli.BadInput, match='no training knee grades ost_tl, '
                     'ost_fl, jsn_l, ost_tm, ost_fm, jsn_m'):
    method.init_state(_training_data(labels))
  with pytest.raises(cli.BadInput, match='grades several heads'):
    methods.from_config(ml_collections.ConfigDict(
        {'method': 'multitask', 'method_kwargs': {}}), tasks.get('kl'))


def test_a_grade_missing_from_the_training_knees_is_named(caplog):
  method = methods.from_config(ml_collections.ConfigDict(
      {'method': 'multitask', 'method_kwargs': {}}), tasks.get('kl_oarsi'))
  labels = {h: np.array([0, 1, 2, 3], np.int32) for h in HEADS}
  state = method.init_state(_training_data(
      labels, images=lambda: iter([np.zeros((4, 8, 8), np.uint8)])))
  assert 'kl grade 4' in caplog.text and 'split.num_folds' in caplog.text
  np.testing.assert_allclose(state['input_norm']['mean'], -1.0)


class _TwoPart(nnx.Module):
  """A backbone layer and one head, to watch what the optimiser moves."""

  def __init__(self, rngs):
    self.body = nnx.Linear(3, 4, rngs=rngs)
    self.heads = nnx.Dict({'kl': nnx.Linear(4, 2, rngs=rngs)})

  def __call__(self, x, *, train=False, rngs=None):
    del train, rngs
    return {'logits': {'kl': self.heads['kl'](jnp.tanh(self.body(x)))}}


def _loss(forward, batch, key, *, epoch):
  del epoch
  logits = forward(batch['x'], key)['logits']['kl']
  return jnp.mean((logits - batch['y']) ** 2), {}


def _numpy_adam(lr, b1, b2, eps, decay):
  """PyTorch's Adam(weight_decay=decay): L2 added to the gradient."""
  state = {}

  def update(name, p, g):
    m, v, t = state.get(name, (0.0, 0.0, 0))
    g = g + decay * p
    t += 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    state[name] = (m, v, t)
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps)

  return update


def test_heads_only_epochs_freeze_the_backbone_then_start_its_adam_afresh():
  cfg = ml_collections.ConfigDict({
      'learning_rate': 1e-2, 'b1': 0.9, 'b2': 0.999, 'weight_decay': 1e-3,
      'weight_decay_mode': 'l2', 'heads_only_epochs': 2.0,
      'boundaries': {}, 'boundary_epochs': {}})
  graphdef, params, extra = nnx.split(_TwoPart(nnx.Rngs(0)), nnx.Param, ...)
  tx = step_lib.make_optimizer(cfg)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              extra=extra, opt_state=tx.init(params),
                              method_state={})
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef,
                                   tx=tx, method=methods.LossMethod(_loss)))
  ref = {k: np.asarray(v, np.float64)
         for k, v in _flat(nnx.to_pure_dict(params)).items()}
  heads_adam, body_adam = (_numpy_adam(1e-2, 0.9, 0.999, 1e-8, 1e-3)
                           for _ in range(2))
  rng = np.random.default_rng(3)
  steps_per_epoch = 2
  for s in range(7):
    batch = {'x': rng.normal(size=(5, 3)).astype(np.float32),
             'y': rng.normal(size=(5, 2)).astype(np.float32)}
    before = _flat(jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)))
    state, _ = step(state, batch, jax.random.key(0), steps_per_epoch)
    after = _flat(jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)))
    grads = _numpy_grads(ref, batch)
    for name in ref:
      frozen = name.startswith('body') and s < 2 * steps_per_epoch
      if frozen:
        np.testing.assert_array_equal(after[name], before[name])
        continue
      adam = heads_adam if name.startswith('heads') else body_adam
      ref[name] = adam(name, ref[name], grads[name])
    for name in ref:
      np.testing.assert_allclose(after[name], ref[name], rtol=2e-4,
                                 atol=1e-6, err_msg=f'step {s} {name}')


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flat(v, name + '/'))
    else:
      out[name] = v
  return out


def _numpy_grads(p, batch):
  """Gradients of mean((W2 tanh(W1 x + b1) + b2 - y)^2) by hand."""
  x, y = batch['x'].astype(np.float64), batch['y'].astype(np.float64)
  h_pre = x @ p['body/kernel'] + p['body/bias']
  h = np.tanh(h_pre)
  out = h @ p['heads/kl/kernel'] + p['heads/kl/bias']
  d_out = 2 * (out - y) / out.size
  d_h = d_out @ p['heads/kl/kernel'].T * (1 - h ** 2)
  return {'heads/kl/kernel': h.T @ d_out, 'heads/kl/bias': d_out.sum(0),
          'body/kernel': x.T @ d_h, 'body/bias': d_h.sum(0)}


def test_l2_weight_decay_matches_pytorch_adam():
  torch = pytest.importorskip('torch')
  cfg = ml_collections.ConfigDict({
      'learning_rate': 1e-2, 'b1': 0.9, 'b2': 0.999, 'weight_decay': 1e-2,
      'weight_decay_mode': 'l2', 'boundaries': {}, 'boundary_epochs': {}})
  tx = step_lib.make_optimizer(cfg)
  rng = np.random.default_rng(4)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  params = {'w': jnp.asarray(w)}
  opt_state = tx.init(params)
  tw = torch.nn.Parameter(torch.tensor(w))
  topt = torch.optim.Adam([tw], lr=1e-2, betas=(0.9, 0.999),
                          weight_decay=1e-2)
  for _ in range(5):
    g = rng.normal(size=(4, 3)).astype(np.float32)
    updates, opt_state = tx.update({'w': jnp.asarray(g)}, opt_state, params,
                                   epoch=jnp.float32(0))
    params = optax.apply_updates(params, updates)
    topt.zero_grad()
    tw.grad = torch.tensor(g)
    topt.step()
  np.testing.assert_allclose(params['w'], tw.detach().numpy(), rtol=1e-5,
                             atol=1e-6)


def test_predictor_crops_the_centre_and_standardises_like_training():
  task = tasks.get('kl_oarsi', view='whole', view_size=20)
  model = _Grey(task.num_classes, nnx.Rngs(0))
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  norm = {'mean': np.float32(0.1), 'std': np.float32(0.5)}
  member = predictor_lib.Member(graphdef, params, extra, input_norm=norm)
  mesh = jax.make_mesh((1,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  predictor = predictor_lib.Predictor([member], task, mesh, batch_size=4,
                                      crop=16)
  images = np.random.default_rng(5).integers(0, 256, (3, 20, 20)).astype(
      np.uint8)
  probs = predictor.predict_images(images)
  x = (images[:, 2:18, 2:18] / 255.0 - 0.5) / 0.5
  x = (x - 0.1) / 0.5
  expected = model(jnp.asarray(x, jnp.float32))['logits']
  for head in task.head_names:
    z = np.asarray(expected[head], np.float64)
    p = np.exp(_log_softmax(z))
    np.testing.assert_allclose(probs[head], p, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='predict.crop must lie in 0..19'):
    predictor_lib.Predictor([member], task, mesh, crop=20)


class _Grey(nnx.Module):
  """Heads reading a 16 x 16 image directly (any other size fails)."""

  def __init__(self, heads, rngs):
    self.heads = nnx.Dict({h: nnx.Linear(256, c, rngs=rngs)
                           for h, c in heads.items()})

  def __call__(self, x, *, train=False, rngs=None):
    del train, rngs
    flat = x.reshape(x.shape[0], 256)
    return {'logits': {h: m(flat) for h, m in self.heads.items()}}
