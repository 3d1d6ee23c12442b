"""configs/oarsi.py end to end on the smoke preset: training, the report of
every head against scikit-learn, an ensemble over two backbones and two
folds, and out-of-fold reports."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from koajax import evaluate
from koajax import tasks
from koajax.data import cache as cache_lib
from koajax.train import predictor as predictor_lib
import sklearn_reference

TASK = tasks.get('kl_oarsi')
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two backbones over two folds of the smoke preset, on one dataset: two
  folds of ResNet-18 (out of fold) and a ResNet-34 (the second backbone of
  the ensemble)."""
  data_root = str(tmp_path_factory.mktemp('data'))
  out = {}
  for name, fold in (('resnet18', 0), ('resnet18', 1), ('resnet34', 1)):
    workdir = tmp_path_factory.mktemp(f'{name}-fold{fold}')
    # One epoch each but the first run, whose report is checked in detail.
    epochs = 2 if (name, fold) == ('resnet18', 0) else 1
    # A command of its own: 2 devices (tests/conftest.py), half the cost
    # per step of this process's 8.
    result = subprocess.run(
        [sys.executable, '-m', 'koajax.main', '--config=configs/oarsi.py:smoke',
         f'--workdir={workdir}', f'--config.data.root={data_root}',
         f'--config.model.name={name}', f'--config.split.fold={fold}',
         f'--config.num_epochs={epochs}'],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out[name, fold] = workdir
  return out


def _check_report(out_dir: Path) -> dict:
  """metrics.json of every head equals scikit-learn on predictions.csv."""
  result = json.loads((out_dir / 'metrics.json').read_text())
  frame = pd.read_csv(out_dir / 'predictions.csv')
  assert list(result['heads']) == list(TASK.head_names)
  for head in TASK.heads:
    y = frame[head.name].to_numpy()
    probs = frame[[f'{head.name}_p{k}' for k in range(head.num_classes)]
                  ].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    graded = y >= 0
    want = sklearn_reference.sklearn_head(y[graded], probs[graded])
    got = result['heads'][head.name]['metrics']
    for name in ('balanced_accuracy', 'kappa', 'mse', 'f1_weighted',
                 'log_loss'):
      np.testing.assert_allclose(got[name]['estimate'], want[name],
                                 rtol=1e-6, err_msg=f'{head.name} {name}')
  return result


def test_a_run_writes_every_head_with_pooled_curves_and_the_table(runs):
  workdir = runs['resnet18', 0]
  result = _check_report(workdir)
  assert set(result['pooled']) == {'ost_lateral', 'ost_medial'}
  assert result['pooled']['ost_lateral']['heads'] == ['ost_tl', 'ost_fl']
  for name in ('heads_table.md', 'heads_table.png', 'roc_ost_lateral.png',
               'pr_ost_medial.png', 'confusion_matrix_jsn_m.png'):
    assert (workdir / name).stat().st_size > 100, name
  table = (workdir / 'heads_table.md').read_text()
  assert all(f'| {h} ' in table for h in TASK.head_names)
  # The training-set input statistics went into the run's log.
  config = json.loads((workdir / 'config.json').read_text())
  assert config['predict']['crop'] == 32 and config['view_size'] == 40


def test_runs_of_two_backbones_and_two_folds_evaluate_as_one_ensemble(runs, tmp_path):
  workdirs = [str(w) for w in runs.values()]
  # Every fold validates on other knees: the ensemble and its members are
  # compared on every knee of the cache.
  cache = json.loads((Path(workdirs[0]) / 'plan.json').read_text())[
      'data']['cache']
  result = evaluate.evaluate(workdirs, cache_dir=cache, out=tmp_path)
  _check_report(tmp_path)
  frame = pd.read_csv(tmp_path / 'predictions.csv')
  # The ensemble's probabilities are the mean of its members', each
  # predicted on its own.
  opened = cache_lib.open_cache(cache)
  rows = np.flatnonzero(TASK.qualifies(opened.index))
  members = []
  for w in workdirs:
    member = predictor_lib.Predictor.from_runs([w])
    with jax.set_mesh(member.mesh):
      members.append(member.predict(opened, rows))
  for head in TASK.heads:
    columns = [f'{head.name}_p{k}' for k in range(head.num_classes)]
    np.testing.assert_allclose(
        frame[columns].to_numpy(),
        np.mean([m[head.name] for m in members], axis=0), atol=1e-5)
  assert result['n_knees'] == len(frame) > 200


def test_folds_report_their_out_of_fold_predictions_together(runs, tmp_path):
  folds = [str(runs['resnet18', 0]), str(runs['resnet18', 1])]
  result = evaluate.evaluate(folds, out=tmp_path, out_of_fold=True)
  _check_report(tmp_path)
  merged = pd.read_csv(tmp_path / 'predictions.csv').set_index('knee_id')
  seen = []
  for i, fold in enumerate(folds):
    own = evaluate.evaluate([fold], split='val', out=tmp_path / f'f{i}')
    del own
    frame = pd.read_csv(tmp_path / f'f{i}' / 'predictions.csv')
    seen += list(frame['knee_id'])
    columns = [c for c in frame if '_p' in c]
    np.testing.assert_allclose(
        merged.loc[frame['knee_id'], columns].to_numpy(),
        frame[columns].to_numpy(), atol=1e-6)
  # Two folds of two validate every knee of the cross-validation once.
  assert sorted(seen) == sorted(merged.index) and result['n_knees'] == len(seen)
  with pytest.raises(ValueError, match='validate on the same knees'):
    evaluate.evaluate([folds[0], folds[0]], out=tmp_path / 'x',
                      out_of_fold=True)


def test_the_reproduction_script_ensembles_each_pair_of_folds(runs,
                                                                tmp_path):
  """benchmarks/reproduction/oarsi.py on this module's two ResNet-18 folds,
  placed where it keeps its runs: it trains nothing (a finished run is
  read; the training path is every reproduction script's, tested in
  test_reproduction.py), evaluates the pair as an ensemble and compares."""
  root = tmp_path / 'runs'
  for fold in (0, 1):
    shutil.copytree(runs['resnet18', fold], root / 'smoke' / f'fold{fold}')
  result = subprocess.run(
      [sys.executable, str(REPO / 'benchmarks' / 'reproduction' / 'oarsi.py'),
       '--preset=smoke', '--seeds=0,1', f'--root={root}',
       f'--out={tmp_path / "out"}'],
      cwd=REPO, env={**os.environ, 'KOAJAX_VERBOSE': '1'},
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'training ' not in result.stdout
  rows = pd.read_csv(tmp_path / 'out' / 'oarsi_smoke.csv')
  assert rows['arm'].tolist() == ['single', 'single', 'ensemble of 2']
  assert rows['members'].tolist() == ['fold0', 'fold1', 'fold0+fold1']
  for name in ('kl_kappa', 'mean_kappa', 'jsn_m_balanced_accuracy',
               'kl_accuracy_truth'):
    assert np.isfinite(rows[name]).all(), name
  # Each row's KL kappa is its report's.
  for workdir, kappa in zip(rows['workdir'], rows['kl_kappa']):
    report = json.loads((Path(workdir) / 'metrics.json').read_text())
    assert kappa == report['heads']['kl']['metrics']['kappa']['estimate']
  ensemble = pd.read_csv(Path(rows['workdir'][2]) / 'predictions.csv')
  first = pd.read_csv(Path(rows['workdir'][0]) / 'predictions.csv')
  assert ensemble['knee_id'].tolist() == first['knee_id'].tolist()
  table = (tmp_path / 'out' / 'oarsi_smoke.md').read_text()
  assert 'ensemble - members mean' in table and 'Machine:' in table
  # Folds without a held-out site test on their own validation knees.
  assert 'tested on different knees' in table
