r"""Input pipeline and on-device augmentation throughput.

Measures
  1. knees/s delivered by the Grain pipeline (Siamese view, batch 32) with
     0, 1 and 2 worker processes: warm-up batches first (at least as many
     as the pipeline holds ready ahead, `pipeline.prefetch_batches`, so
     that the timing is of reading, not of emptying full buffers), then a
     fixed number of timed batches, repeated; the time to the first batch is
     reported separately (worker start-up);
  2. augmentations/s of the jitted, vmapped Semixup augmentation on
     (B, 128, 128) patch batches and of the coherence jitter on
     (B, 320, 320) images, with compile time reported separately.

Run:
  python benchmarks/pipeline_throughput.py                # synthetic cache
  python benchmarks/pipeline_throughput.py --cache=/data/oai_cache

Without --cache, a temporary cache of --num_knees random 400 px ROIs is built
first (about 160 kB per knee). Results print as Markdown tables and go to
--out as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from koajax.data import augment  # noqa: E402
from koajax.data import cache as cache_lib  # noqa: E402
from koajax.data import pipeline  # noqa: E402

_CACHE = flags.DEFINE_string('cache', None, 'Cache directory; default: build '
                             'a synthetic one in a temporary directory.')
_NUM_KNEES = flags.DEFINE_integer('num_knees', 2000, 'Synthetic cache size.')
_ROI_PX = flags.DEFINE_integer('roi_px', 400, 'Synthetic cache ROI size.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Pipeline batch size.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker counts.')
_THREADS = flags.DEFINE_integer(
    'read_threads', 0, 'Reading threads per process (0: as a training run '
    'reads, pipeline.reading_processes: one per core up to 16 without '
    'workers, one or two per worker).')
_WARMUP = flags.DEFINE_integer(
    'warmup', 5, 'Untimed batches per iterator, at least the batches the '
    'pipeline holds ready ahead (pipeline.prefetch_batches).')
_BATCHES = flags.DEFINE_integer('batches', 30, 'Timed batches per repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats.')
_AUG_BATCHES = flags.DEFINE_list('aug_batch_sizes', ['32', '256'],
                                 'Batch sizes for the augmentation timing.')
_AUG_CALLS = flags.DEFINE_integer('aug_calls', 10, 'Timed calls per repeat.')
_OUT = flags.DEFINE_string('out', None, 'JSON results file (rewritten after '
                           'each row, so a stopped run keeps its rows).')


def build_synthetic_cache(directory: str, num_knees: int,
                          roi_px: int) -> cache_lib.Cache:
  """Random ROIs with plausible ids and grades; 2 knees per subject."""
  rng = np.random.default_rng(0)
  with cache_lib.CacheWriter(directory, roi_mm=140, roi_px=roi_px) as writer:
    for i in range(num_knees):
      grades = np.concatenate([rng.integers(0, 5, 1), rng.integers(0, 4, 6)])
      writer.add(cache_lib.Knee(
          subject_id=f'{i // 2:07d}', visit=0, side='RL'[i % 2],
          site='ABCDE'[i % 5],
          image=rng.integers(0, 256, (roi_px, roi_px), dtype=np.uint8),
          keypoints=rng.uniform(0, roi_px, (16, 2)).astype(np.float32),
          grades=grades.astype(np.int8)))
  return cache_lib.open_cache(directory)


def _summary(rates: list[float]) -> str:
  spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
  return f'{statistics.mean(rates):,.0f} ± {spread:,.0f}'


def read_threads(workers: int) -> int | None:
  """Reading threads per process: the flag's, or a training run's."""
  return _THREADS.value or pipeline.reading_processes(
      workers, streams=1, accelerator=True)[1]


def time_pipeline(cache: cache_lib.Cache, workers: int,
                  warmup: int) -> tuple[float, list]:
  """(seconds to the first batch, knees/s of each timed repeat after
  `warmup` untimed batches)."""
  start = time.perf_counter()
  it = pipeline.to_iterator(pipeline.knee_dataset(
      cache, np.arange(len(cache)), view='siamese',
      batch_size=_BATCH.value, seed=0, num_epochs=None,
      sharding=pipeline.Sharding(0, 1)), worker_count=workers,
      read_threads=read_threads(workers))
  with contextlib.closing(it):
    next(it)
    first = time.perf_counter() - start
    for _ in range(warmup):
      next(it)
    rates = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      for _ in range(_BATCHES.value):
        next(it)
      elapsed = time.perf_counter() - start
      rates.append(_BATCH.value * _BATCHES.value / elapsed)
  return first, rates


def time_jitted(fn: Callable, make_args: Callable[[int], tuple],
                batch: int) -> tuple[float, list[float]]:
  """(compile seconds, items/s of each repeat) for jitted fn at `batch`."""
  import jax  # pylint: disable=g-import-not-at-top
  jitted = jax.jit(fn)
  args = make_args(0)
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # first run: allocations, caches
  rates = []
  for r in range(_REPEATS.value):
    calls = [make_args(1 + r * _AUG_CALLS.value + c)
             for c in range(_AUG_CALLS.value)]
    jax.block_until_ready(calls)
    start = time.perf_counter()
    for call in calls:
      out = compiled(*call)
    jax.block_until_ready(out)
    rates.append(batch * _AUG_CALLS.value / (time.perf_counter() - start))
  return compile_s, rates


def augmentation_rows() -> Iterator[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def images(size: int, batch: int) -> Callable[[int], tuple]:
    base = jax.random.randint(jax.random.key(0), (batch, size, size), 0, 256
                              ).astype(jnp.uint8)
    return lambda i: (jax.random.key(i), base)

  def semixup(key, x):
    return augment.augment_batch(augment.semixup_augment, key, x)

  def jitter(key, x):
    return augment.augment_batch(augment.jitter_augment, key, x)

  for name, fn, size in [('semixup', semixup, 128), ('jitter', jitter, 320)]:
    for batch in map(int, _AUG_BATCHES.value):
      compile_s, rates = time_jitted(fn, images(size, batch), batch)
      yield {'augmentation': name, 'size': size, 'batch_size': batch,
             'images_per_s': rates, 'compile_s': compile_s}


def load() -> str:
  """The 1-minute load average: other work on the machine skews timings."""
  return f'load average {os.getloadavg()[0]:.1f}'


def machine() -> str:
  model = 'unknown CPU'
  with contextlib.suppress(OSError):
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f
                   if line.startswith('model name'))
  return f'{model}, {os.cpu_count()} cores, Python {platform.python_version()}'


def save(results: dict) -> None:
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=1)


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  print(f'# {time.strftime("%Y-%m-%d")}, {machine()}, jax {jax.__version__}, '
        f'{jax.devices()[0].platform}, {load()}')
  results = {'date': time.strftime('%Y-%m-%d'), 'machine': machine(),
             'cpu_count': os.cpu_count(), 'jax': jax.__version__,
             'backend': jax.default_backend(),
             'device': jax.devices()[0].device_kind,
             'batch_size': _BATCH.value, 'read_threads': _THREADS.value,
             'pipeline': [], 'augmentation': []}
  with tempfile.TemporaryDirectory() as tmp:
    if _CACHE.value:
      cache = cache_lib.open_cache(_CACHE.value)
    else:
      start = time.perf_counter()
      cache = build_synthetic_cache(tmp, _NUM_KNEES.value, _ROI_PX.value)
      print(f'built {len(cache)} knees at {_ROI_PX.value} px in '
            f'{time.perf_counter() - start:.0f} s')
    # Compressed records (caches built before 2026-12-01) read slower.
    disk = os.path.getsize(cache.records_path) / len(cache) / 1e3
    results['record_kb_on_disk'] = disk
    print(f'\n{len(cache)} knees, ROI {cache.meta["roi_px"]} px ({disk:.0f} '
          f'kB per record on disk), Siamese view, batch {_BATCH.value}, '
          f'{_BATCHES.value} timed batches x {_REPEATS.value} repeats after '
          'the warm-up batches\n')
    print('| workers | knees/s (mean ± sd) | first batch (s) | warm-up '
          'batches |')
    print('|---|---|---|---|')
    for workers in map(int, _WORKERS.value):
      warmup = max(_WARMUP.value, pipeline.prefetch_batches(
          worker_count=workers, read_threads=read_threads(workers)))
      first, rates = time_pipeline(cache, workers, warmup)
      print(f'| {workers} | {_summary(rates)} | {first:.1f} | {warmup} |',
            flush=True)
      results['pipeline'].append({'workers': workers,
                                  'read_threads': read_threads(workers),
                                  'first_batch_s': first,
                                  'warmup_batches': warmup,
                                  'knees_per_s': rates})
      save(results)

  print(f'\n{_AUG_CALLS.value} calls x {_REPEATS.value} repeats, '
        'block_until_ready\n')
  print('| augmentation | batch | images/s (mean ± sd) | compile (s) |')
  print('|---|---|---|---|')
  for row in augmentation_rows():
    print(f"| {row['augmentation']} (B, {row['size']}, {row['size']}) | "
          f"{row['batch_size']} | {_summary(row['images_per_s'])} | "
          f"{row['compile_s']:.1f} |", flush=True)
    results['augmentation'].append(row)
    save(results)
  print(f'\nfinished at {load()}')


if __name__ == '__main__':
  # Grain starts workers by spawn: they re-import this file, so nothing may
  # run at import time. absl.app parses flags, which Grain workers require.
  app.run(main)
