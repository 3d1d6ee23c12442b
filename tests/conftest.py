"""Test setup: 8 forced CPU devices so every run exercises sharding."""

import os
import tempfile

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tests build the same programs several times (e.g. a run and its resumption);
# a compilation cache for this test session compiles each once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='koajax-jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

from absl import flags  # noqa: E402

# absl flags (and Grain's worker processes) need parsed flags under pytest.
flags.FLAGS.mark_as_parsed()
