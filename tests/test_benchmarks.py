"""The train-step benchmarks run at tiny sizes, so they cannot rot."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]


# train_step.py runs in tests/test_gpu_script.py (benchmarks/gpu.sh --dry).
@pytest.mark.parametrize('script,args,row_start', [
    ('oarsi_step.py', ['--networks=resnet18', '--batch_size=4', '--size=32'],
     '| resnet18 | 4 | 32 | float32 |'),
    ('confidence_step.py', ['--losses=hybrid', '--batch_size=4', '--size=32'],
     '| hybrid | 4 | 32 | float32 |'),
])
def test_benchmark_runs_and_writes_its_results(script, args, row_start,
                                               tmp_path):
  if script == 'oarsi_step.py':
    pytest.importorskip('timm')
  if script == 'confidence_step.py':
    pytest.importorskip('torch')
  out = tmp_path / 'results.json'
  result = subprocess.run(
      [sys.executable, str(REPO / 'benchmarks' / script), *args,
       '--steps=1', '--rounds=1', f'--out={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  written = json.loads(out.read_text())
  (row,) = written['results']
  assert row['koajax_step_s'] and all(t > 0 for t in row['koajax_step_s'])
  assert any(line.startswith(row_start)
             for line in result.stdout.splitlines()), result.stdout
  if script == 'oarsi_step.py':  # timm + PyTorch timed beside koajax
    assert row['torch_step_s'] and row['timm_version']
  if script == 'confidence_step.py':  # both sides time the same work
    assert row['torch_step_s'] and row['torch_includes']
    assert row['koajax_params'] == row['torch_params'] == 2_686_690
    assert row['hybrid_loss_max_abs_diff'] <= 1e-5
    assert row['hybrid_loss_grad_max_abs_diff'] <= 1e-5
    assert row['hybrid_groups_equal']


def test_gmm_density_benchmark_runs_and_checks_parity(tmp_path):
  out = tmp_path / 'results.json'
  result = subprocess.run(
      [sys.executable, str(REPO / 'benchmarks' / 'gmm_density.py'),
       '--knees=64', '--fit_knees=60', '--components=2', '--steps=1',
       '--rounds=1', f'--out={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  (row,) = json.loads(out.read_text())['results']
  assert row['koajax_s'] and row['sklearn_s']
  assert all(t > 0 for t in row['koajax_s'] + row['sklearn_s'])
  assert row['max_rel_diff'] <= 1e-4
  assert any(line.startswith('| 64 | 29 | 2 |')
             for line in result.stdout.splitlines()), result.stdout
