"""Test setup: 8 CPU devices in each test process, 2 in the commands it starts.

In this process every run exercises sharding over 8 devices, whatever the
machine. The commands tests start in child processes (trainings, scripts)
get 2: still sharded, and on the 2-core CI machine about twice as fast per
step of a small network as 8 (the localiser's smoke run: 44 s on 8, 25 s on
2); most of the suite's time is such runs. Their configs' `cpu_devices`
(-1: one per core; 32 in the Semixup family, tuned for full-size batches)
would give 2 to 32, and 32 is slower still at smoke sizes.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tests build the same programs several times (e.g. a run and its resumption);
# a compilation cache for this test session compiles each once. The process
# that makes it (pytest's controller; its workers inherit the variable)
# removes it at exit: tens of MB a run would otherwise pile up in /tmp.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='koajax-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'],
                  ignore_errors=True)
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

# The suite runs in worker processes (pytest-xdist, pyproject.toml's addopts),
# a test module's tests in one worker so that its module fixtures are made
# once. The modules that share the session's trained smoke runs below keep
# to one worker together, or each worker would train them again.
SHARED_RUNS = ('test_localizer_run', 'test_predict', 'test_web_page')

# The longest modules first (measured, 2 workers on 2 cores), so that no
# long one starts last while the other worker waits.
LONGEST = ('test_oarsi_run', 'test_readme', 'test_localizer_run',
           'test_predict', 'test_web_page', 'test_reproduction',
           'test_gpu_script', 'test_coherence_run', 'test_active_loop',
           'test_confidence_run', 'test_train', 'test_reliability')


def _module(nodeid: str) -> str:
  return Path(nodeid.split('::')[0]).stem


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST)}
  items.sort(key=lambda item: rank.get(_module(item.nodeid), len(rank)))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
  """Work units of whole modules (the shared-run modules as one), in the
  order collected. (xdist's own `loadgroup` mode names its groups through a
  node attribute that pytest 9.2 no longer reads.)"""
  from xdist.scheduler import LoadScopeScheduling

  class ByModule(LoadScopeScheduling):

    def _split_scope(self, nodeid: str) -> str:
      module = _module(nodeid)
      return 'smoke-runs' if module in SHARED_RUNS else module

  return ByModule(config, log)


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
