"""The CPU device count measured per machine and step (koajax.calibrate)."""

import json
import math

import pytest

from koajax import calibrate
from koajax import runtime
from config_loader import load_config


def test_candidates_are_the_mesh_sizes_largest_first():
  # One, 4 and 16 devices per core, as the mesh would use each: the largest
  # count that divides the batch.
  assert calibrate.candidates(2, 32) == [32, 8, 2]
  assert calibrate.candidates(2, 12) == [12, 6, 2]
  assert calibrate.candidates(16, 32) == [32, 16]
  assert calibrate.candidates(1, 7) == [7, 1]


class _Stopwatch:
  """Stands in for `calibrate.measure`: the given seconds per count (None:
  gave up), and what it was asked."""

  def __init__(self, seconds):
    self.seconds, self.calls = seconds, []

  def __call__(self, config, devices, *, give_up_after=math.inf):
    del config
    self.calls.append((devices, give_up_after))
    if self.seconds[devices] == 'fails':
      raise RuntimeError(f'measuring {devices} CPU devices failed: boom')
    return {'devices': devices, 'seconds': self.seconds[devices],
            'compile_s': 1.0}


@pytest.fixture
def two_cores(monkeypatch):
  monkeypatch.setattr(runtime, 'cores', lambda: 2)
  monkeypatch.setattr(calibrate, 'machine', lambda: {
      'cpu': 'a CPU', 'features': ['avx2'], 'cores': 2, 'jax': '1',
      'jaxlib': '1'})


def test_the_fastest_count_is_kept_and_reused(tmp_path, monkeypatch,
                                              two_cores):
  del two_cores
  config = load_config('supervised', 'smoke')
  config.batch_size = 32
  cache = tmp_path / 'cpu_devices.json'
  watch = _Stopwatch({32: 3.0, 8: 2.0, 2: None})
  monkeypatch.setattr(calibrate, 'measure', watch)
  assert calibrate.cpu_devices(config, cache=cache) == 8
  # Largest first; each later count gives up at twice the best so far.
  assert watch.calls == [(32, math.inf), (8, 6.0), (2, 4.0)]
  entry, = json.loads(cache.read_text()).values()
  assert entry['cpu_devices'] == 8
  assert entry['seconds'] == {'32': 3.0, '8': 2.0, '2': None}
  assert entry['step']['batch_size'] == 32
  # Known now: not measured again, unless forced.
  assert calibrate.cpu_devices(config, cache=cache) == 8
  assert len(watch.calls) == 3
  watch.seconds = {32: 1.0, 8: 2.0, 2: 3.0}
  assert calibrate.cpu_devices(config, cache=cache, force=True) == 32
  assert calibrate.cpu_devices(config, cache=cache) == 32
  # Within 5 % of the fastest, the fewest devices.
  watch.seconds = {32: 1.0, 8: 1.04, 2: 1.06}
  assert calibrate.cpu_devices(config, cache=cache, force=True) == 8
  # Another step (batch size) or another machine is measured for itself,
  # beside what is known.
  calls = len(watch.calls)
  config.batch_size = 12
  watch.seconds = {12: 5.0, 6: 1.0, 2: 9.0}
  assert calibrate.cpu_devices(config, cache=cache) == 6
  monkeypatch.setattr(calibrate, 'machine', lambda: {
      'cpu': 'another CPU', 'features': [], 'cores': 2, 'jax': '1',
      'jaxlib': '1'})
  watch.seconds = {12: 1.0, 6: 5.0, 2: 9.0}
  assert calibrate.cpu_devices(config, cache=cache) == 12
  assert len(watch.calls) == calls + 6
  assert len(json.loads(cache.read_text())) == 3


def test_what_cannot_be_measured_falls_back_to_one_device_per_core(
    tmp_path, monkeypatch, two_cores, caplog):
  del two_cores
  config = load_config('supervised', 'smoke')
  cache = tmp_path / 'cpu_devices.json'
  watch = _Stopwatch({n: 'fails' for n in (32, 16, 8, 4, 2)})
  monkeypatch.setattr(calibrate, 'measure', watch)
  assert calibrate.cpu_devices(config, cache=cache) == 2
  assert 'boom' in caplog.text and 'one per core' in caplog.text
  assert not cache.exists()  # nothing measured, nothing kept
  # One count failing costs that count only.
  watch.seconds = {**watch.seconds, 2: 1.0}
  assert calibrate.cpu_devices(config, cache=cache) == 2
  assert cache.exists()


def test_nothing_is_measured_where_it_would_not_be_used(monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError('measured')
  monkeypatch.setattr(calibrate, 'cpu_devices', never)
  config = load_config('supervised', 'smoke')
  config.cpu_devices = 8
  assert calibrate.resolve(config) == 8  # a count given is the count
  config.cpu_devices = 0
  # XLA_FLAGS sets the count (as this suite does for its commands).
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  assert calibrate.resolve(config) == 0
  monkeypatch.setenv('XLA_FLAGS', '')
  assert calibrate.resolve(config, distributed=True) == -1
  monkeypatch.setattr(calibrate, '_accelerator_installed', lambda: True)
  assert calibrate.resolve(config) == -1
  monkeypatch.setattr(calibrate, '_accelerator_installed', lambda: False)
  with pytest.raises(AssertionError, match='measured'):
    calibrate.resolve(config)


def test_a_step_is_timed_on_the_devices_asked():
  # A child process with its own device count times the run's network on
  # a batch of the run's view, here with the keypoints the coherence
  # network takes beside the images. (The README's command, run in
  # test_readme, measures the Siamese network of the Semixup family.)
  config = load_config('coherence', 'smoke')
  result = calibrate.measure(config, 2)
  assert result['devices'] == 2 and result['backend'] == 'cpu'
  assert 0 < result['seconds'] < 60 and result['compile_s'] > 0
  # A first step over the limit is all that is timed.
  assert calibrate.measure(config, 1, give_up_after=0.0)['seconds'] is None
