"""configs/confidence.py end to end on the smoke preset: the report against
scikit-learn, c_k recomputed from the validation knees and checkpointed,
and a run killed with SIGKILL that ends identical to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as sk_metrics

from koajax import train
from koajax.methods import confidence
from koajax.train import predictor as predictor_lib
from config_loader import smoke_config

REPO = Path(__file__).resolve().parents[1]


def _command(workdir, data_root):
  return [sys.executable, '-m', 'koajax.main',
          '--config=configs/confidence.py:smoke', f'--workdir={workdir}',
          f'--config.data.root={data_root}']


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def run(data_root, tmp_path_factory):
  """An uninterrupted smoke run (2 epochs, an evaluation after each)."""
  workdir = tmp_path_factory.mktemp('run')
  subprocess.run(_command(workdir, data_root), cwd=REPO, check=True,
                 capture_output=True, timeout=600)
  return workdir


def _state(workdir, data_root):
  config = smoke_config('confidence', data_root)
  trainer = train.Trainer(config, workdir)
  trainer.restore()
  return trainer, jax.device_get(trainer.state)


def test_the_report_agrees_with_sklearn_on_its_predictions(run):
  result = json.loads((run / 'metrics.json').read_text())
  frame = pd.read_csv(run / 'predictions.csv', dtype={'knee_id': str})
  y = frame['kl0_vs_kl2'].to_numpy()
  p = frame[['p0', 'p1']].to_numpy()
  assert set(np.unique(y)) <= {0, 1}  # only KL-0 and KL-2 knees are tested
  pred = p.argmax(1)
  want = {'accuracy': sk_metrics.accuracy_score(y, pred),
          'f1': sk_metrics.f1_score(y, pred, zero_division=np.nan),
          'recall_1': sk_metrics.recall_score(y, pred),  # sensitivity
          'recall_0': sk_metrics.recall_score(y, pred, pos_label=0),
          'roc_auc': sk_metrics.roc_auc_score(y, p[:, 1])}
  for name, value in want.items():
    np.testing.assert_allclose(result['metrics'][name]['estimate'], value,
                               rtol=1e-6, err_msg=name)
    low, high = (result['metrics'][name][k] for k in ('ci_low', 'ci_high'))
    assert low <= high
  assert (run / 'confidence_curves.png').stat().st_size > 1000
  # Grad-CAM overlays of the most and least confident knees, by p(true).
  p_true = p[np.arange(len(y)), y]
  shown = pd.read_csv(run / 'gradcam' / 'gradcam.csv', dtype={'knee_id': str})
  assert list(shown['kind']) == ['most', 'most', 'least', 'least']
  ids = frame['knee_id'].astype(str).to_numpy()
  order = ids[np.argsort(-p_true, kind='stable')]
  assert list(shown['knee_id']) == [*order[:2], *order[::-1][:2]]
  np.testing.assert_allclose(shown['p_true'], [*np.sort(p_true)[::-1][:2],
                                               *np.sort(p_true)[:2]],
                             rtol=1e-5)
  for name in shown['file']:
    assert (run / 'gradcam' / name).stat().st_size > 1000


def test_class_confidence_is_the_validation_mean_and_is_checkpointed(
    run, data_root):
  trainer, state = _state(run, data_root)
  c_k = state.method_state[confidence.CLASS_CONFIDENCE]
  # The last evaluation's weights are the latest checkpoint's; their
  # validation predictions, recomputed read-only, give c_k by hand.
  probs = predictor_lib.Predictor.from_runs(
      [run], checkpoint='latest').predict(
          trainer.cache, trainer.splits.val)['kl0_vs_kl2']
  y = trainer.task.index_labels(
      trainer.cache.index.iloc[trainer.splits.val])['kl0_vs_kl2']
  for k in (0, 1):
    np.testing.assert_allclose(c_k[k], probs[y == k, k].mean(), rtol=1e-5)


def test_a_killed_run_resumes_to_the_same_weights_c_k_and_report(
    run, data_root, tmp_path):
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(_command(workdir, data_root), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not any((workdir / 'checkpoints').glob('[0-9]*')) \
      and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / 'metrics.json').exists()
  subprocess.run(_command(workdir, data_root), cwd=REPO, check=True,
                 capture_output=True, timeout=600)
  a = json.loads((run / 'metrics.json').read_text())
  b = json.loads((workdir / 'metrics.json').read_text())
  assert a['metrics'] == b['metrics']
  _, full = _state(run, data_root)
  _, resumed = _state(workdir, data_root)
  jax.tree.map(np.testing.assert_array_equal, full.params, resumed.params)
  jax.tree.map(np.testing.assert_array_equal, full.method_state,
               resumed.method_state)
