"""The machine a benchmark ran on, for its results table, and how steps are
timed."""

import platform
import time


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def time_steps(step, n: int) -> list[float]:
  """Seconds of each of `n` calls of `step` (which waits for its result),
  after one untimed warm-up call (caches, allocator)."""
  step()
  times = []
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def torch_device(requested: str = 'auto') -> str:
  """PyTorch's device: `requested`, or cuda when available for 'auto'."""
  if requested != 'auto':
    return requested
  import torch
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def summary() -> str:
  """One line naming the CPU, its cores and JAX's backend and devices."""
  import os
  import jax
  return (f'{cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} '
          f'({jax.default_backend()}, {jax.device_count()} devices: '
          f'{jax.devices()[0].device_kind})')


def write_json(path: str | None, results: list) -> None:
  """`results` with the machine they ran on, as JSON at `path` (if given)."""
  if not path:
    return
  import json
  import os
  import jax
  with open(path, 'w') as f:
    json.dump({'cpu': cpu_name(), 'cores': os.cpu_count(),
               'jax': jax.__version__, 'backend': jax.default_backend(),
               'device': jax.devices()[0].device_kind,
               'results': results}, f, indent=1)


def step_rates(row: dict) -> dict[str, float]:
  """Images/s of each side of a result row: batch_size / the median of its
  `<side>_step_s` timings."""
  import statistics
  return {k[:-len('_step_s')]: row['batch_size'] / statistics.median(v)
          for k, v in row.items() if k.endswith('_step_s')}


def koajax_torch_cells(rate: dict[str, float]) -> list[str]:
  """Table cells: koajax img/s, PyTorch img/s and their ratio (empty
  without a PyTorch timing)."""
  cells = [f"{rate['koajax']:.2f}"]
  if 'torch' in rate:
    return cells + [f"{rate['torch']:.2f}",
                    f"{rate['koajax'] / rate['torch']:.2f}x"]
  return cells + ['', '']
