"""Every reproduction script of benchmarks/reproduction/ runs end to end at
smoke size (tiny data, one seed, the configs' smoke presets) and writes one
CSV row per run and its comparison (oarsi.py in test_oarsi_run.py, on that
module's trained runs); a second call reads the finished runs
instead of training them again (`runs.train`, which every script shares:
checked for two of them)."""

import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / 'benchmarks' / 'reproduction'

# script -> (its arguments beyond preset, seeds and folders, the arms a row
# names, the metric columns every row has)
CASES = {
    'confidence': ([], ('ce', 'hybrid'), ('accuracy', 'f1', 'roc_auc')),
    'active_learning': (['--acquisitions=random,bald', '--consistency=false'],
                        ('random', 'bald'),
                        ('balanced_accuracy_area', 'kappa_final')),
    'semixup': (['--labels=2'], ('supervised', 'semixup'),
                ('balanced_accuracy', 'kappa', 'roc_auc')),
    # Arms of one network: the second run loads the first one's compiled
    # programs (the session's compilation cache, conftest.py).
    'coherence': (['--arms=kpn-coh,kpn', '--fractions=1.0'],
                  ('kpn-coh', 'kpn'),
                  ('kl_accuracy', 'kl_kappa', 'oarsi_accuracy', 'log_density',
                   'incoherent')),
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _run(script, args, tmp_path, data_dir):
  env = {**os.environ, 'KOAJAX_DATA_DIR': data_dir, 'KOAJAX_VERBOSE': '1'}
  return subprocess.run(
      [sys.executable, str(SCRIPTS / f'{script}.py'), '--preset=smoke',
       '--seeds=0', f'--root={tmp_path / "runs"}', f'--out={tmp_path / "out"}',
       *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _trained(stdout):
  """The runs a script trained (`runs.train` announces each)."""
  return [line for line in stdout.splitlines() if line.startswith('training ')]


@pytest.mark.parametrize('script', sorted(CASES))
def test_script_runs_at_smoke_size_and_resumes(script, tmp_path, data_dir):
  args, arms, metrics = CASES[script]
  result = _run(script, args, tmp_path, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(_trained(result.stdout)) == len(arms)
  rows = pd.read_csv(tmp_path / 'out' / f'{script}_smoke.csv')
  column = 'loss' if script == 'confidence' else 'arm'
  assert sorted(rows[column]) == sorted(arms)
  assert (rows['seed'] == 0).all() and (rows['train_seconds'] > 0).all()
  for name in metrics:
    assert np.isfinite(rows[name]).all(), name
  table = (tmp_path / 'out' / f'{script}_smoke.md').read_text()
  assert '| metric |' in table and 'Machine:' in table
  png = tmp_path / 'out' / f'{script}_smoke.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.name in table

  if script == 'confidence':
    again = _run(script, args, tmp_path, data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not _trained(again.stdout)
    reread = pd.read_csv(tmp_path / 'out' / f'{script}_smoke.csv')
    pd.testing.assert_frame_equal(reread.drop(columns='train_seconds'),
                                  rows.drop(columns='train_seconds'))

