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
import trace_summary  # noqa: E402  (benchmarks/trace_summary.py)


def test_step_flops_counts_a_sharded_matmul_and_a_convolution_once():
  m, k, n = 64, 96, 32
  mesh = jax.make_mesh((8,), ('data',))
  a = jax.device_put(jnp.ones((m, k)), jax.NamedSharding(mesh, jax.P('data')))
  b = jnp.ones((k, n))
  # Each of the 8 devices multiplies its 8 rows; together one m x k x n
  # product of 2 m k n operations (a multiply and an add each). (XLA's
  # count comes out 2 short with the sharding ops in the lowered module;
  # unsharded it is exact.)
  flops = step_flops(jax.jit(lambda a, b: a @ b).lower(a, b))
  assert abs(flops - 2 * m * k * n) <= 2
  # A 3 x 3 convolution without padding: 2 x every output pixel x 3 x 3 x C_in
  # per output channel.
  x, w = jnp.ones((2, 10, 12, 4)), jnp.ones((3, 3, 4, 8))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  assert step_flops(conv.lower(x, w)) == 2 * 2 * 8 * 10 * 8 * 3 * 3 * 4


def test_trace_summary_of_known_intervals():
  def op(tid, ts, dur, name):
    return {'ph': 'X', 'pid': 1, 'tid': tid, 'ts': ts, 'dur': dur,
            'name': name, 'args': {'hlo_op': name}}
  # Two streams over 2 steps (microseconds): [0, 10] and [5, 15] overlap,
  # then [20, 30] and [40, 44]: busy 15 + 10 + 4 = 29 of the span 44,
  # idle gaps of 5 and 10.
  events = [op(7, 0, 10, 'fusion.1'), op(8, 5, 10, 'convolution.3'),
            op(7, 20, 10, 'fusion.2'), op(8, 40, 4, 'convolution.9'),
            {'ph': 'X', 'pid': 2, 'tid': 1, 'ts': 0, 'dur': 6,
             'name': 'PjitFunction(jit(step))'},
            {'ph': 'X', 'pid': 2, 'tid': 1, 'ts': 1, 'dur': 3,
             'name': '$api.py:10 block'},  # a Python frame: left out
            {'ph': 'M', 'pid': 1, 'name': 'process_name',
             'args': {'name': '/device:GPU:0'}}]
  s = trace_summary.summarise(events, steps=2)
  assert s['span_ms_per_step'] == 44 / 1e3 / 2
  assert s['busy_ms_per_step'] == 29 / 1e3 / 2
  assert s['busy_share'] == 29 / 44
  assert s['gaps_per_step'] == 1.0
  assert s['largest_gaps_ms'] == [10 / 1e3, 5 / 1e3]
  assert s['device_ops'] == [
      {'name': 'fusion', 'ms_per_step': 20 / 1e3 / 2, 'calls_per_step': 1.0},
      {'name': 'convolution', 'ms_per_step': 14 / 1e3 / 2,
       'calls_per_step': 1.0}]
  assert s['host'] == [{'name': 'PjitFunction(jit(step))',
                        'ms_per_step': 6 / 1e3 / 2, 'calls_per_step': 0.5}]


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
      'Semixup network', 'multi-task OARSI', 'Siamese-GAP', 'keypoint pooling',
      'localiser fine stage'}
  localiser = next(s for s in steps if s['family'] == 'localiser fine stage')
  assert localiser['koajax_img_s'] > 0 and localiser['predict_img_s'] > 0
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
  assert [(r['stage'], r['outcome']) for r in report['stages']] == [
      (name, 'ok') for name in ('train_step_b2', 'mc_dropout', 'pipeline',
                                'oarsi_step', 'confidence_step',
                                'coherence_step', 'landmark_step')]
  # Each traced row's profile: device work found, busy no more than the span.
  assert sorted(p['trace'] for p in report['profiles']) == [
      'supervised_b2_bfloat16', 'supervised_b2_float32']
  for p in report['profiles']:
    assert 'error' not in p, p
    assert 0 < p['busy_ms_per_step'] <= p['span_ms_per_step']
    assert p['device_ops']
  table = (out / 'gpu.md').read_text()
  assert '| Semixup network | supervised | 2 | bfloat16 |' in table
  assert '| MC-dropout sweep: vmapped / loop of T passes |' in table
