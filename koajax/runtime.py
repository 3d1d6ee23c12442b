"""Where the computation runs: CPU device count and the data-parallel mesh.

XLA's CPU convolutions keep two cores busy poorly inside one device, while
many host devices, each running its share of the batch, keep them busy: on a
2-core Xeon the Semixup network's SL step (batch 32) took 19 s on 1 CPU
device, 9.3 s on 8 and 6.0 s on 32 (see benchmarks/README.md). So on a CPU
koajax splits the host into `cpu_devices` devices and shards every batch
over them, the same data parallelism that spreads a batch over accelerators.
How many is best depends on the network and the CPU; a run measures it
(`koajax.calibrate`).
"""

from __future__ import annotations

from collections.abc import Callable
import logging
import math
import os
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar('T')

log = logging.getLogger(__name__)


def cores() -> int:
  """The CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def configure_cpu_devices(count: int) -> None:
  """Splits the host into `count` CPU devices; call before JAX starts.

  `count` 0 keeps JAX's default (one device, or what XLA_FLAGS forces);
  -1 is one device per core this process may use (`cores`); a run config
  that leaves it at 0 measures it (`koajax.calibrate.configure_host`). A
  network of large convolutions (the ResNets) keeps a core busy with one
  device's share of the batch, and smaller shares only add overhead
  (ResNet-18 at 128 px, batch 32, on a 2-core AMD EPYC: 1.08 s per step on 1
  device, 0.60 s on 2, 0.73 s on 4, 2.60 s on 32). Accelerators are
  untouched: on a GPU machine the GPUs stay the default devices. Once JAX has created its backends the count can no longer change;
  then this logs what it found and returns.
  """
  if count < 0:
    count = cores()
  if count <= 0:
    return
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return  # an explicit XLA_FLAGS setting wins
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError as e:  # backends already initialised
    log.warning('cpu_devices=%d not applied (%s); using %d devices',
                count, e, jax.device_count())


def enable_compilation_cache(directory: str) -> None:
  """Keeps compiled programs in `directory` (created if missing) across runs.

  A resumed run, the next round of an active-learning run, an evaluation or
  a rerun of the same config then loads its compiled steps instead of
  compiling them again (20-40 s each on a 2-core CPU). Empty: no cache. A
  JAX_COMPILATION_CACHE_DIR setting wins.
  """
  if not directory or os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  path = os.path.expanduser(directory)
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins the processes of a multi-process run; call before JAX starts.

  With no arguments JAX finds its peers itself where it can (SLURM, Open MPI,
  Cloud TPU); elsewhere give all three. On CPUs the processes' collectives
  (the gradient all-reduce) run over Gloo, JAX's default.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  log.info('process %d of %d: %d local, %d global devices',
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())


def process_zero_first(fn: Callable[[], T], name: str) -> T:
  """fn() on process 0, then on the others once it is done.

  For work with shared results on disk (building the dataset cache): the
  other processes then find it made instead of making it at the same time.
  """
  if jax.process_count() == 1:
    return fn()
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return result if jax.process_index() == 0 else fn()


def mesh_size(devices: int, *batch_sizes: int) -> int:
  """The most of `devices` that divide every batch size evenly."""
  g = math.gcd(*batch_sizes)
  return max(d for d in range(1, devices + 1) if g % d == 0)


def data_mesh(*batch_sizes: int) -> jax.sharding.Mesh:
  """A one-axis ('data') mesh whose size divides every batch size.

  With one process it uses the largest device count that divides the batch
  sizes, so batch 40 on 32 CPU devices runs on 20 of them. With several
  processes every device takes part and the batch sizes must divide evenly.
  """
  devices = jax.devices()
  if jax.process_count() > 1:
    for b in batch_sizes:
      if b % len(devices):
        raise ValueError(
            f'batch size {b} does not divide over {len(devices)} devices in '
            f'{jax.process_count()} processes; choose a multiple of '
            f'{len(devices)}')
    n = len(devices)
  else:
    n = mesh_size(len(devices), *batch_sizes)
  return jax.make_mesh((n,), ('data',), devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))
