"""benchmarks/gpu.sh in its CPU dry mode (every stage at tiny sizes, no
PyTorch), so the GPU script cannot rot; and XLA's operation count that its
share-of-peak figures rest on, against a count by hand."""

import json
import os
from pathlib import Path
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
from koajax_step import step_flops  # noqa: E402  (benchmarks/koajax_step.py)


def test_step_flops_counts_a_sharded_matmul_once():
  m, k, n = 64, 96, 32
  mesh = jax.make_mesh((8,), ('data',))
  a = jax.device_put(jnp.ones((m, k)), jax.NamedSharding(mesh, jax.P('data')))
  b = jnp.ones((k, n))
  compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  # Each of the 8 devices multiplies its 8 rows; together one m x k x n
  # product of 2 m k n operations (a multiply and an add each).
  assert step_flops(compiled, mesh.size) == 2 * m * k * n


def test_dry_mode_runs_every_stage_and_reports(tmp_path):
  out = tmp_path / 'gpu'
  env = {**os.environ, 'PYTHON': sys.executable}
  result = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu.sh'),
                           '--dry', str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  report = json.loads((out / 'gpu.json').read_text())
  steps = report['steps']
  assert {s['family'] for s in steps} == {
      'Semixup network', 'multi-task OARSI', 'Siamese-GAP', 'keypoint pooling'}
  assert {(s['step'], s['dtype']) for s in steps
          if s['family'] == 'Semixup network'} == {
              ('supervised', 'float32'), ('supervised', 'bfloat16')}
  # Rates and achieved TFLOP/s recomputed from the raw timings.
  raw = json.loads((out / 'train_step_b2.json').read_text())['results'][0]
  row = next(s for s in steps if s['step'] == 'supervised'
             and s['dtype'] == raw['dtype'])
  median = statistics.median(raw['koajax_step_s'])
  assert abs(row['koajax_img_s'] - raw['batch_size'] / median) < 1e-9
  assert raw['koajax_flops'] > 0
  assert abs(row['koajax_tflop_s'] - raw['koajax_flops'] / median / 1e12) < 1e-12
  assert 'peak_share' not in row  # a CPU has no peak in the table
  assert all('torch_img_s' not in s for s in steps)  # no PyTorch when dry
  assert [r['mode'] for r in report['mc_dropout']] == [
      'predictor', 'loop', 'forward']
  loop = next(r for r in report['mc_dropout'] if r['mode'] == 'loop')
  assert loop['vs_loop'] == 1.0
  assert [p['workers'] for p in report['pipeline']] == [0, 1]
  assert all(p['vs_step'] > 0 for p in report['pipeline'])
  assert len(report['targets']) == 4
  table = (out / 'gpu.md').read_text()
  assert '| Semixup network | supervised | 2 | bfloat16 |' in table
  assert '| MC-dropout sweep: vmapped / loop of T passes |' in table
