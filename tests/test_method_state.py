"""A method with state fitted before training and updated after each
evaluation: the state is what the hooks say it is, lives in the checkpoint,
and a killed and resumed run ends identical to an uninterrupted one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koajax import losses
from koajax import methods
from koajax import train
from koajax.train import predictor as predictor_lib
from config_loader import load_config

NUM_CLASSES = 5


class _PriorAndConfidence(methods.Method):
  """Class-balanced CE with weights 1 / prior, the prior counted on the
  training labels before the first step, plus a pull of each knee's
  true-class probability towards its class's mean validation confidence,
  measured after each evaluation (the confidence-driven paper's c_k)."""

  streams = ('labeled',)

  def init_state(self, training):
    y = training.labels['kl']
    prior = np.bincount(y[y >= 0], minlength=NUM_CLASSES) / max((y >= 0).sum(),
                                                                1)
    return {'prior': prior.astype(np.float32),
            'confidence': np.full(NUM_CLASSES, 1 / NUM_CLASSES, np.float32),
            'evaluations': np.int32(0)}

  def loss(self, forward, batch, key, *, epoch, state):
    del epoch
    x = (batch['labeled']['image'].astype(jnp.float32) / 255 - 0.5) / 0.5
    y = batch['labeled']['labels']['kl']
    logits = forward(x, key)['logits']['kl']
    weights = 1.0 / jnp.maximum(state['prior'][y], 1e-3)
    ce, _ = losses.cross_entropy(logits=logits, labels=y)
    p_true = jnp.take_along_axis(jax.nn.softmax(logits), y[:, None], 1)[:, 0]
    pull = jnp.mean(jnp.square(p_true - state['confidence'][y]))
    loss = ce * jnp.mean(weights) / NUM_CLASSES + 0.1 * pull
    return loss, {'pull': pull}

  def update_state(self, state, validation):
    y, probs = validation.labels['kl'], validation.probs['kl']
    confidence = np.array(state['confidence'], np.float32)
    for k in range(NUM_CLASSES):
      if (y == k).any():
        confidence[k] = probs[y == k, k].mean()
    return {**state, 'confidence': confidence,
            'evaluations': np.int32(state['evaluations'] + 1)}


STATEFUL = methods.Spec(lambda task, **options: _PriorAndConfidence())


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _config(data_root, num_epochs):
  config = load_config('supervised', 'smoke')
  config.data.root = data_root
  config.method = 'test_method_state:STATEFUL'
  config.method_kwargs = {}
  config.num_epochs = num_epochs
  return config


def _method_state(workdir, config):
  trainer = train.Trainer(config, workdir)
  trainer.restore()
  return trainer, jax.device_get(trainer.state)


def test_state_is_fitted_updated_checkpointed_and_resumes_exactly(data_root,
                                                                  tmp_path):
  full = _config(data_root, 3)
  train.train_and_evaluate(full, tmp_path / 'full')
  trainer, state = _method_state(tmp_path / 'full', full)

  # Fitted before training: the prior of the labeled knees' grades.
  kl = trainer.cache.index['kl'].to_numpy()[trainer.splits.labeled]
  np.testing.assert_allclose(state.method_state['prior'],
                             np.bincount(kl, minlength=5) / len(kl),
                             rtol=1e-6)
  # Updated after each of the 3 evaluations; the last update saw the
  # latest weights' validation predictions, recomputed here read-only.
  assert int(state.method_state['evaluations']) == 3
  probs = predictor_lib.Predictor.from_runs(
      [tmp_path / 'full'], checkpoint='latest').predict(
          trainer.cache, trainer.splits.val)['kl']
  y = trainer.cache.index['kl'].to_numpy()[trainer.splits.val]
  by_hand = [probs[y == k, k].mean() for k in range(5) if (y == k).any()]
  np.testing.assert_allclose(
      [state.method_state['confidence'][k] for k in range(5)
       if (y == k).any()], by_hand, rtol=1e-5)

  # Stopped after epoch 1 (as a kill after the first checkpoint would),
  # then rerun: the same weights, method state and metrics.
  train.train_and_evaluate(_config(data_root, 1), tmp_path / 'resumed')
  _, first = _method_state(tmp_path / 'resumed', _config(data_root, 1))
  assert int(first.method_state['evaluations']) == 1
  with full.unlocked():
    full.resume_changed = 'num_epochs'  # the longer run goes on from epoch 1
  train.train_and_evaluate(full, tmp_path / 'resumed')
  _, resumed = _method_state(tmp_path / 'resumed', full)
  jax.tree.map(np.testing.assert_array_equal, state.params, resumed.params)
  jax.tree.map(np.testing.assert_array_equal, state.method_state,
               resumed.method_state)
  metrics = [json.loads((tmp_path / d / 'metrics.json').read_text())
             for d in ('full', 'resumed')]
  assert metrics[0]['metrics'] == metrics[1]['metrics']
