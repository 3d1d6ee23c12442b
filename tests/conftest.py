"""Test setup: 8 CPU devices in this process, 2 in the commands it starts.

In this process every run exercises sharding over 8 devices, whatever the
machine. The commands tests start in child processes (trainings, scripts)
get 2: still sharded, and on the 2-core CI machine about twice as fast per
step of a small network as 8 (the localiser's smoke run: 44 s on 8, 25 s on
2); most of the suite's time is such runs. Their configs' `cpu_devices`
(-1: one per core; 32 in the Semixup family, tuned for full-size batches)
would give 2 to 32, and 32 is slower still at smoke sizes.
"""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tests build the same programs several times (e.g. a run and its resumption);
# a compilation cache for this test session compiles each once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='koajax-jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402

# The backend starts now with 8 devices; an in-process run's `cpu_devices`
# can no longer change that (koajax.runtime logs it), and the XLA_FLAGS set
# below for child processes come too late to.
jax.config.update('jax_num_cpu_devices', 8)
assert jax.device_count() == 8, jax.devices()
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=2']).strip()

from absl import flags  # noqa: E402

# absl flags (and Grain's worker processes) need parsed flags under pytest.
flags.FLAGS.mark_as_parsed()


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def smoke_root(tmp_path_factory):
  """A data root the smoke presets generate their synthetic set into (the
  same 40 subjects, seed 0, for every config)."""
  return str(tmp_path_factory.mktemp('smoke-data'))


@pytest.fixture(scope='session')
def smoke_localizer(smoke_root, tmp_path_factory):
  """A localiser folder: the coarse and the fine stage's smoke runs
  (configs/localizer.py), shared by the localiser's and prediction's tests."""
  root = tmp_path_factory.mktemp('localizer')
  for stage, preset in (('coarse', 'coarse_smoke'), ('fine', 'smoke')):
    result = subprocess.run(
        [sys.executable, '-m', 'koajax.main',
         f'--config=configs/localizer.py:{preset}',
         f'--workdir={root / stage}', f'--config.data.root={smoke_root}'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'landmarks test: {"centre_mean_mm"' in result.stdout
  return root


@pytest.fixture(scope='session')
def smoke_grading_run(smoke_root, tmp_path_factory):
  """configs/supervised.py:smoke on the shared smoke data (Semixup's network:
  it has dropout), for prediction's tests."""
  workdir = tmp_path_factory.mktemp('sl-smoke')
  result = subprocess.run(
      [sys.executable, '-m', 'koajax.main',
       '--config=configs/supervised.py:smoke', f'--workdir={workdir}',
       f'--config.data.root={smoke_root}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir
