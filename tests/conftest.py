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
