"""configs/coherence.py end to end on the smoke preset: a run with the
unlabeled stream writes every head's report and the coherence measures,
which agree with scikit-learn recomputed from predictions.csv; a run stopped
after its first epoch and resumed ends with the same weights and mixture; and
knees without landmarks are in no set."""

import json
import logging

import jax
import numpy as np
import pandas as pd
import pytest

from koajax import evaluate
from koajax import tasks
from koajax import train
from koajax.data import pipeline
from config_loader import smoke_config
import sklearn_reference

TASK = tasks.get('kl_oarsi', view='keypoints')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def full_run(data_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  train.train_and_evaluate(smoke_config('coherence', data_root), workdir)
  return workdir


@pytest.fixture(scope='module')
def full_state(full_run, data_root):
  """The last state of the full run, restored from its checkpoint."""
  trainer = train.Trainer(smoke_config('coherence', data_root), full_run)
  try:
    trainer.restore()
    return jax.device_get(trainer.state)
  finally:
    trainer.close()


def test_a_run_reports_every_head_and_the_coherence_of_its_predictions(
    full_run, full_state):
  plan = json.loads((full_run / 'plan.json').read_text())
  assert plan['knees']['unlabeled'] > plan['knees']['labeled'] > 0
  logged = [json.loads(line) for line in
            (full_run / 'metrics.jsonl').read_text().splitlines()]
  switch = [r['train/coherence_on'] for r in logged
            if 'train/coherence_on' in r]
  epochs = [r['train/epoch'] for r in logged if 'train/coherence_on' in r]
  # Off in the first epoch's steps, on from the first step of the second.
  assert switch == [float(e > 1) for e in epochs]
  assert 0 in switch and 1 in switch

  result = json.loads((full_run / 'metrics.json').read_text())
  frame = pd.read_csv(full_run / 'predictions.csv')
  assert list(result['heads']) == list(TASK.head_names)
  probs, labels = {}, {}
  for head in TASK.heads:
    labels[head.name] = frame[head.name].to_numpy()
    probs[head.name] = frame[[f'{head.name}_p{k}' for k in
                              range(head.num_classes)]].to_numpy()
    graded = labels[head.name] >= 0
    want = sklearn_reference.sklearn_head(labels[head.name][graded],
                                          probs[head.name][graded])
    got = result['heads'][head.name]['metrics']
    for name in ('accuracy', 'kappa', 'rmse', 'balanced_accuracy'):
      np.testing.assert_allclose(got[name]['estimate'], want[name],
                                 rtol=1e-6, err_msg=f'{head.name} {name}')

  # The coherence section, recomputed with scikit-learn from the files and
  # the mixture in the checkpoint.
  gm = sklearn_reference.gaussian_mixture(full_state.method_state['gmm'])
  heads = TASK.head_names
  p = np.concatenate([probs[h] for h in heads], axis=1)
  pred = np.stack([probs[h].argmax(1) for h in heads], axis=1)
  measures = result['coherence']
  assert measures['predicted']['n_knees'] == len(frame)
  np.testing.assert_allclose(measures['predicted']['mean_log_density'],
                             gm.score_samples(p).mean(), rtol=1e-4)
  rule = (pred[:, 0] >= 2) & (pred[:, 1:] == 0).all(1)
  np.testing.assert_allclose(
      measures['predicted']['incoherent']['kl_without_findings'], rule.mean())
  truth = np.stack([labels[h] for h in heads], axis=1)
  assert measures['true']['n_knees'] == int((truth >= 0).all(1).sum())


def test_evaluate_reports_the_coherence_measures_as_training_did(
    full_run, tmp_path):
  """`koajax.evaluate` measures the predictions with the run's own
  checkpointed mixture, as the end of training did."""
  trained = json.loads((full_run / 'metrics.json').read_text())['coherence']
  again = evaluate.evaluate(full_run, out=tmp_path)['coherence']
  assert again['true'] == trained['true']
  assert again['predicted']['incoherent'] == trained['predicted']['incoherent']
  np.testing.assert_allclose(again['predicted']['mean_log_density'],
                             trained['predicted']['mean_log_density'],
                             rtol=1e-5)
  assert 'coherence' in json.loads((tmp_path / 'metrics.json').read_text())


def _train_only(config, workdir):
  """The trained state of a run, trained without its test report."""
  trainer = train.Trainer(config, workdir)
  try:
    with jax.set_mesh(trainer.mesh):
      trainer.train()
    return jax.device_get(trainer.state)
  finally:
    trainer.close()


def test_a_stopped_run_resumes_to_the_same_weights_and_mixture(
    full_state, data_root, tmp_path):
  first = _train_only(smoke_config('coherence', data_root, num_epochs=1),
                      tmp_path)
  resumed = _train_only(smoke_config('coherence', data_root,
                                     resume_changed='num_epochs'), tmp_path)
  whole = full_state
  assert int(first.step) * 2 == int(resumed.step) == int(whole.step)
  jax.tree.map(np.testing.assert_array_equal, whole.params, resumed.params)
  jax.tree.map(np.testing.assert_array_equal, whole.extra, resumed.extra)
  jax.tree.map(np.testing.assert_array_equal, whole.method_state,
               resumed.method_state)
  # The mixture is the one fitted before the first step, checkpointed.
  jax.tree.map(np.testing.assert_array_equal, first.method_state,
               resumed.method_state)


def test_knees_without_landmarks_are_in_no_set_and_counted(
    data_root, tmp_path, monkeypatch, caplog):
  real = pipeline.knees_with_keypoints

  def some_missing(cache, *args, **kwargs):
    known = real(cache, *args, **kwargs)
    known[::7] = False
    return known

  monkeypatch.setattr(pipeline, 'knees_with_keypoints', some_missing)
  caplog.set_level(logging.WARNING)
  trainer = train.Trainer(smoke_config('coherence', data_root), tmp_path)
  trainer.close()
  missing = np.arange(0, len(trainer.cache), 7)
  for name in ('labeled', 'unlabeled', 'val', 'test'):
    rows = getattr(trainer.splits, name)
    assert len(rows) and not np.isin(rows, missing).any(), name
  assert f'{len(missing)} of the {len(trainer.cache)} knees' in caplog.text
