"""Test setup: 8 forced CPU devices so every run exercises sharding."""

import os

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

# absl flags (and Grain's worker processes) need parsed flags under pytest.
flags.FLAGS.mark_as_parsed()
