r"""How many CPU devices a run's step is fastest on, measured on this machine.

XLA's CPU convolutions keep the cores busy best when the host is split into
several devices, each running its share of the batch (`koajax.runtime`), and
how many is best depends on the network and on the CPU: the Semixup network
at batch 32 ran fastest on 32 devices on a 2-core Xeon (AVX-512) and on a
2-core EPYC, a ResNet-18 at 128 px on one device per core (the EPYC: 0.60 s
per step on 2 devices, 2.60 s on 32). So a run whose config leaves
`cpu_devices` at 0 measures it: its model's step at its batch size on a few
device counts, each in a child process (a process's device count is fixed
once JAX starts), and takes the fewest devices within 5 % of the fastest.
The answer is kept per machine (CPU model and features, core count, JAX
version) and per step (model, view, batch size) in
~/.cache/koajax/cpu_devices.json, so each is measured once.

The step measured is the run's network forward and backward on the labeled
batch with the run's optimiser, what the convolutions cost, without the
method's other streams and views (a Semixup step is seven such passes; on
the Xeon the count fastest for one pass was the fastest for the whole
Semixup step too: 2 against 8 devices for the quick preset, 32 against 8
and 16 for the paper's network). Nothing is measured where it would not be
used: where an accelerator plugin is installed and in a multi-process run
(one device per core, so that every host agrees), or where XLA_FLAGS sets
the device count.

Measure ahead of a run, or again (`--force`), and see every count's time:

  python -m koajax.calibrate --config=configs/semixup.py:quick
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections

log = logging.getLogger(__name__)

CACHE = Path('~/.cache/koajax/cpu_devices.json')
# A count whose first step takes this many times the best one so far is
# not timed further.
_GIVE_UP = 2.0
_STEPS = 2  # timed steps per count, after one untimed; the fastest counts
_TIE = 0.05


def machine() -> dict[str, Any]:
  """What decides how XLA runs on this CPU: its model and the vector
  features XLA's kernels choose from, the cores this process may use, and
  the JAX build."""
  from koajax import runtime
  info: dict[str, str] = {}
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      name, _, value = line.partition(':')
      if not name.strip() and info:
        break  # the first core's; the rest are alike
      info.setdefault(name.strip(), value.strip())
  except OSError:
    pass
  model = ' '.join(
      [info.get('model name', platform.processor() or platform.machine())] +
      [f'{k} {info[k]}' for k in ('cpu family', 'model') if info.get(k)])
  features = sorted(set(info.get('flags', '').split()) & {
      'avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile',
      'amx_bf16'})
  return {'cpu': model, 'features': features, 'cores': runtime.cores(),
          'jax': importlib.metadata.version('jax'),
          'jaxlib': importlib.metadata.version('jaxlib')}


def step_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What of a run config decides its step's cost."""
  return {'task': config.task, 'view': config.get('view', ''),
          'view_size': config.get('view_size', 0),
          'roi_px': config.data.get('roi_px', 0),
          'batch_size': config.batch_size,
          'model': json.loads(config.model.to_json_best_effort())}


def candidates(cores: int, batch_size: int) -> list[int]:
  """Device counts worth measuring, largest first: one per core, 4 and 16
  per core, each as the mesh would use it (the largest count that divides
  the batch, `runtime.mesh_size`)."""
  from koajax import runtime
  return sorted({runtime.mesh_size(n, batch_size)
                 for n in (16 * cores, 4 * cores, cores)}, reverse=True)


def _accelerator_installed() -> bool:
  """Whether JAX may find an accelerator (a CUDA, ROCm or TPU plugin is
  installed and JAX_PLATFORMS does not say CPU)."""
  if os.environ.get('JAX_PLATFORMS', '').split(',')[0].strip() == 'cpu':
    return False
  names = {d.metadata['Name'].lower().replace('_', '-')
           for d in importlib.metadata.distributions()}
  return any(n.startswith(('jax-cuda', 'jax-rocm', 'libtpu')) for n in names)


def _read(path: Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def measure(config: ml_collections.ConfigDict, devices: int, *,
            give_up_after: float = math.inf, timeout: float = 900.0
            ) -> dict[str, Any]:
  """The step of `config` on `devices` CPU devices, timed in a child
  process: {'devices', 'seconds' (the fastest timed step; None if given up
  after a first step over `give_up_after` s), 'compile_s'}."""
  from koajax.train import workdir as workdir_lib
  env = dict(os.environ)
  # The child sets its own count; an inherited XLA_FLAGS count would win.
  env['XLA_FLAGS'] = ' '.join(
      f for f in env.get('XLA_FLAGS', '').split()
      if 'xla_force_host_platform_device_count' not in f)
  env['JAX_PLATFORMS'] = 'cpu'
  with tempfile.TemporaryDirectory(prefix='koajax-calibrate-') as tmp:
    workdir_lib.write_config(tmp, config)
    result = subprocess.run(
        [sys.executable, '-m', 'koajax.calibrate', f'--child={tmp}',
         f'--devices={devices}', f'--give_up_after={give_up_after}'],
        env=env, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  if result.returncode or not lines:
    tail = (result.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'measuring {devices} CPU devices failed: {tail}')
  return json.loads(lines[-1])


def cpu_devices(config: ml_collections.ConfigDict, *, force: bool = False,
                cache: Path = CACHE) -> int:
  """The fastest CPU device count for `config`'s step on this machine:
  from `cache`, else measured (and kept there). Falls back to one device
  per core, with a warning, if nothing could be measured."""
  from koajax import runtime
  from koajax.data import atomic
  here, step = machine(), step_key(config)
  key = hashlib.sha256(json.dumps([here, step], sort_keys=True).encode()
                       ).hexdigest()[:16]
  path = cache.expanduser()
  known = _read(path).get(key)
  if known and not force:
    log.info('cpu_devices=%d, as measured on this machine on %s (%s)',
             known['cpu_devices'], known['measured'], path)
    return int(known['cpu_devices'])
  log.info('Measuring the step on %s CPU devices to choose cpu_devices '
           '(once for this model and batch on this machine)',
           ', '.join(map(str, candidates(here['cores'], config.batch_size))))
  seconds: dict[str, float | None] = {}
  best = math.inf
  start = time.perf_counter()
  for n in candidates(here['cores'], config.batch_size):
    try:
      result = measure(config, n, give_up_after=_GIVE_UP * best)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
      log.warning('%s', e)
      continue
    seconds[str(n)] = result['seconds']
    if result['seconds'] is not None:
      best = min(best, result['seconds'])
  timed = {int(n): s for n, s in seconds.items() if s is not None}
  if not timed:
    log.warning('cpu_devices: no device count could be measured; using one '
                'per core (%d)', here['cores'])
    return runtime.cores()
  # The fewest devices within _TIE of the fastest: closer than that is the
  # noise of a shared machine, and fewer devices hold less memory.
  best = min(timed.values())
  chosen = min(n for n, s in timed.items() if s <= best * (1 + _TIE))
  log.info('cpu_devices=%d: s/step %s (measured in %.0f s; kept in %s)',
           chosen, ', '.join(f'{n} devices {s:.2f}' if s is not None else
                             f'{n} devices slower' for n, s in
                             seconds.items()),
           time.perf_counter() - start, path)
  entries = _read(path)  # as it is now: another run may have added to it
  entries[key] = {'cpu_devices': chosen, 'seconds': seconds,
                  'measured': datetime.date.today().isoformat(),
                  'machine': here, 'step': step}
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_text(path, json.dumps(entries, indent=1, sort_keys=True))
  return chosen


def configure_host(config: ml_collections.ConfigDict, *,
                   distributed: bool = False) -> None:
  """A run config's `cpu_devices` and `compilation_cache`, before JAX starts.

  `cpu_devices` 0 (and configs saved before the field existed) is the count
  measured on this machine for the run's step (`resolve`); in a
  multi-process run (`distributed`), one device per core.
  """
  from koajax import runtime
  runtime.enable_compilation_cache(config.get('compilation_cache', ''))
  runtime.configure_cpu_devices(resolve(config, distributed=distributed))


def resolve(config: ml_collections.ConfigDict, *,
            distributed: bool = False) -> int:
  """`config.cpu_devices` as `runtime.configure_cpu_devices` takes it: 0
  (measure) becomes the measured count; or -1 (one per core) in a
  multi-process run and where an accelerator plugin is installed (its
  devices are the default; should JAX find none, it runs on the CPU);
  0 where XLA_FLAGS sets the count."""
  count = int(config.get('cpu_devices', 0))
  if count:
    return count
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return 0
  if distributed or _accelerator_installed():
    return -1
  return cpu_devices(config)


def _proxy_loss(forward, batch, key, *, epoch):
  """Every float output's mean: a loss over all of the network."""
  del epoch
  import jax
  import jax.numpy as jnp
  from koajax.train import step as step_lib
  labeled = batch['labeled']
  inputs = ({'keypoints': labeled['keypoints']} if 'keypoints' in labeled
            else {})
  out = forward(step_lib.normalise(labeled['image']), key, **inputs)
  loss = sum(jnp.mean(x.astype(jnp.float32)) for x in jax.tree.leaves(out)
             if jnp.issubdtype(x.dtype, jnp.floating))
  return loss, {}


def _time_step(config: ml_collections.ConfigDict, devices: int,
               give_up_after: float) -> dict[str, Any]:
  """In the child: the step on `devices` devices (see `measure`)."""
  from koajax import runtime
  runtime.configure_cpu_devices(devices)
  import functools
  import jax
  import numpy as np
  from koajax import methods as methods_lib
  from koajax import tasks as tasks_lib
  from koajax.data import views
  from koajax.train import step as step_lib

  task = tasks_lib.from_config(config)
  mesh = runtime.data_mesh(config.batch_size)
  rng = np.random.default_rng(0)
  roi_px = int(config.data.roi_px)
  # A knee as the cache holds it, seen through the run's view: the shapes
  # the step takes.
  knee = {'image': rng.integers(0, 256, (roi_px, roi_px), np.uint8),
          'keypoints': rng.uniform(0.3, 0.7, (16, 2)).astype(np.float32)
                       * roi_px}
  view = views.get_view(config.get('view') or task.view,
                        config.get('view_size') or task.view_size)(
                            knee, float(config.data.roi_mm))
  data = jax.NamedSharding(mesh, jax.P('data'))
  batch = {'labeled': {
      name: jax.device_put(np.repeat(value[None], config.batch_size, 0),
                           data) for name, value in view.items()}}
  with jax.set_mesh(mesh):
    graphdef, tx, state = step_lib.create_state(
        config, task, jax.random.key(0),
        sharding=jax.NamedSharding(mesh, jax.P()))
    step = jax.jit(functools.partial(
        step_lib.train_step, graphdef=graphdef, tx=tx,
        method=methods_lib.LossMethod(_proxy_loss)), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(1), 100).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(_STEPS + 1):
      start = time.perf_counter()
      state, metrics = compiled(state, batch, jax.random.key(1), 100)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      if i == 0 and times[0] > give_up_after:
        break
  timed = times[1:]
  return {'devices': mesh.size, 'backend': jax.default_backend(),
          'seconds': min(timed) if timed else None, 'compile_s': compile_s}


def main(argv):
  del argv
  from absl import flags
  from koajax import cli
  from koajax import config_checks
  from koajax import config_lib
  values = flags.FLAGS
  if values.child:
    print(json.dumps(_time_step(config_lib.load_run_config(values.child),
                                values.devices, values.give_up_after)))
    return
  if values.config is None:
    raise cli.BadInput('--config=FILE[:preset] is required')
  logging.getLogger('koajax').setLevel(logging.INFO)
  logging.basicConfig(format='%(message)s')
  config = config_checks.check(values.config)
  print(cpu_devices(config, force=values.force, cache=Path(values.cache)))


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  from koajax import cli
  config_flags.DEFINE_config_file('config', None,
                                  'Run config, FILE[:preset].',
                                  lock_config=True)
  flags.DEFINE_bool('force', False, 'Measure again, even if known.')
  flags.DEFINE_string('cache', str(CACHE), 'Where the measured counts are '
                      'kept (runs read the default).')
  flags.DEFINE_string('child', '', 'internal: a folder with the config.json '
                      'to time')
  flags.DEFINE_integer('devices', 0, 'internal: the device count to time')
  flags.DEFINE_float('give_up_after', math.inf, 'internal: stop after a '
                     'first step slower than this (s)')
  cli.run_absl('koajax.calibrate', main)
