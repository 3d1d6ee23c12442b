"""Grain input pipeline over a knee cache.

    source(cache records, restricted to a split's record indices)
      -> [bootstrap draws of the minority classes] -> shuffle (a new order every epoch) -> whole global batches per epoch
      -> this process's share -> repeat -> decode + method view -> batch
      -> to_iter_dataset -> [mp_prefetch into worker processes]

Elements are dicts of NumPy arrays, batched along axis 0:
  image      uint8, the view (siamese (2, 128, 128), whole (300, 300),
             keypoints (320, 320))
  keypoints  float32 (16, 2) (x, y) view pixels, 'keypoints' view only
             (NaN for unknown landmarks: `usable_knees` finds the knees
             that have them all)
  kl         int32 KL grade (-1 = ungraded)
  grades     int32 (7,) in schema.GRADES order (-1 = ungraded)
  labels     {head: int32} the task's labels (`koajax.tasks`; -1 = masked),
             with a task only
  index      int32 record index in the cache

`batch_size` is global: with P processes each receives batch_size / P
elements from a disjoint share of every epoch, so the per-process batches
together form one global batch (`jax.make_array_from_process_local_data`).
An epoch of the labeled stream is one pass over its subset, cut to whole
global batches (at most batch_size - 1 knees, different ones each epoch, sit
an epoch out). The unlabeled stream repeats forever with its own shuffle.

With `oversample` labels, each epoch of the labeled stream also holds, for
every class smaller than the largest, enough knees drawn from it with
replacement to make it as large (bootstrap oversampling, as the
confidence-driven paper does for KL-2). The draws are new every epoch and a
function of (seed, epoch) only, so a resumed stream draws what the
uninterrupted one would have.

Iterators are Grain `DatasetIterator`s: `get_state()` / `set_state()`, and
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` inside an
Orbax `CheckpointManager` save, resume at exactly the next batch. The state
is the index of the next batch, whatever the worker count, so a run resumes
with another count (a run moved from a CPU to an accelerator host).

Worker processes start by spawn, so a script that asks for workers needs an
`if __name__ == '__main__':` guard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import os
from typing import Any

from absl import flags
import grain
import numpy as np

from koajax.data import cache as cache_lib
from koajax.data import schema
from koajax.data import views


class _Subset:
  """Random access to the records at `indices` of a source (picklable)."""

  def __init__(self, source: Any, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> bytes:
    return self._source[int(self._indices[i])]

  def __repr__(self) -> str:
    return f'_Subset({self._source!r}, {len(self)} records)'


class DecodeView(grain.transforms.Map):
  """Record bytes -> a dict of arrays in one method view (see module doc)."""

  def __init__(self, view: str, roi_mm: float, task: Any = None,
               view_size: int = 0):
    self._view_name = view
    self._view = views.get_view(view, view_size)
    self._roi_mm = float(roi_mm)
    self._task = task

  def map(self, element: bytes) -> dict[str, Any]:
    knee = cache_lib.decode(element)
    grades = knee['grades'].astype(np.int32)
    out = {**self._view(knee, self._roi_mm), 'kl': grades[0],
           'grades': grades, 'index': np.int32(knee['index'])}
    if self._task is not None:
      out['labels'] = self._task.labels(dict(zip(schema.GRADES, grades)))
    return out

  def __repr__(self) -> str:
    return f'DecodeView({self._view_name!r})'


@dataclasses.dataclass(frozen=True)
class Sharding:
  """Which share of every epoch this process reads."""
  index: int
  count: int

  @classmethod
  def from_jax(cls) -> Sharding:
    import jax  # pylint: disable=g-import-not-at-top
    return cls(jax.process_index(), jax.process_count())


class _BatchShard(grain.MapDataset):
  """This process's rows of every global batch, as a contiguous block.

  Process p of P reads rows [p L, (p + 1) L) of each global batch of B = P L
  rows, so the global array assembled from the processes' shares has the rows
  in the order one process would have read them: a run on several processes
  sees exactly the batches of a run on one.
  """

  def __init__(self, parent: grain.MapDataset, *, batch_size: int,
               sharding: Sharding):
    super().__init__(parent)
    self._batch_size = batch_size
    self._local = batch_size // sharding.count
    self._offset = sharding.index * self._local
    self._length = len(parent) // sharding.count

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    # As in Grain's slice: indices past the end go on into the next epoch.
    epoch, offset = divmod(index, self._length)
    batch, row = divmod(offset, self._local)
    return self._parent[epoch * len(self._parent) + batch * self._batch_size
                        + self._offset + row]

  def __str__(self) -> str:
    return f'_BatchShard(rows {self._offset}+{self._local} of {self._batch_size})'


def bootstrap_counts(labels: np.ndarray) -> dict[int, int]:
  """Class -> knees drawn with replacement each epoch so that every class
  of `labels` is as large as the largest (masked labels, < 0, are never
  drawn)."""
  classes, counts = np.unique(labels[labels >= 0], return_counts=True)
  if not len(classes):
    return {}
  return {int(k): int(counts.max() - n) for k, n in zip(classes, counts)
          if n < counts.max()}


def epoch_knees(num_knees: int, oversample: np.ndarray | None = None) -> int:
  """Knees in one epoch of a stream of `num_knees` (with its bootstrap
  draws when `oversample` labels are given)."""
  if oversample is None:
    return num_knees
  return num_knees + sum(bootstrap_counts(np.asarray(oversample)).values())


class _Bootstrap(grain.MapDataset):
  """Every element of the parent once per epoch, then `bootstrap_counts`
  more of each minority class drawn with replacement, new each epoch."""

  def __init__(self, parent: grain.MapDataset, *, labels: np.ndarray,
               seed: int):
    super().__init__(parent)
    labels = np.asarray(labels)
    if len(labels) != len(parent):
      raise ValueError(f'{len(labels)} oversampling labels for '
                       f'{len(parent)} knees')
    self._pools = [(np.flatnonzero(labels == k), n) for k, n in
                   sorted(bootstrap_counts(labels).items())]
    self._seed = seed
    self._length = epoch_knees(len(parent), labels)
    self._drawn: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return self._length

  def _draws(self, epoch: int) -> np.ndarray:
    # One read of the cached epoch: reader threads may cross an epoch's end
    # at the same time, and each must use its own epoch's draws.
    drawn = self._drawn
    if drawn is None or drawn[0] != epoch:
      rng = np.random.default_rng([self._seed, epoch])
      draws = [rng.choice(pool, n) for pool, n in self._pools]
      drawn = epoch, np.concatenate(draws or [np.zeros(0, np.int64)])
      self._drawn = drawn
    return drawn[1]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._length)
    n = len(self._parent)
    position = i if i < n else int(self._draws(epoch)[i - n])
    return self._parent[epoch * n + position]

  def __str__(self) -> str:
    return f'_Bootstrap({self._length - len(self._parent)} draws per epoch)'


def _local_batch_size(batch_size: int, sharding: Sharding) -> int:
  if batch_size % sharding.count:
    raise ValueError(f'batch size {batch_size} does not split over '
                     f'{sharding.count} processes')
  return batch_size // sharding.count


def steps_per_epoch(num_knees: int, batch_size: int) -> int:
  """Global batches in one epoch of `num_knees` knees (the last part drops)."""
  return num_knees // batch_size


def knee_dataset(cache: cache_lib.Cache,
                 indices: Sequence[int] | np.ndarray, *, view: str,
                 batch_size: int, seed: int, task: Any = None,
                 view_size: int = 0, shuffle: bool = True,
                 num_epochs: int | None = 1,
                 oversample: np.ndarray | None = None,
                 sharding: Sharding | None = None) -> grain.MapDataset:
  """The batched MapDataset of this process's share of `indices`.

  Args:
    cache: an open cache.
    indices: record indices of the split (e.g. `Split.train`).
    view: one of `views.VIEWS`.
    batch_size: global batch size, divisible by the process count.
    task: a `koajax.tasks.Task` whose labels the elements carry (optional).
    view_size: the view's pixel size (0: its own).
    seed: shuffle seed; epoch e is shuffled with seed + e (Grain's rule).
    shuffle: False keeps `indices` order (evaluation).
    num_epochs: epochs to run, None for an endless stream.
    oversample: labels of `indices` whose smaller classes are bootstrapped
      up to the largest one's size every epoch (None: no oversampling).
    sharding: this process's share; default from jax.process_index/count.

  Returns:
    A MapDataset of dicts of batched arrays; every epoch has exactly
    `steps_per_epoch(epoch_knees(len(indices), oversample), batch_size)`
    batches.
  """
  sharding = sharding or Sharding.from_jax()
  local_batch = _local_batch_size(batch_size, sharding)
  knees = epoch_knees(len(indices), oversample)
  usable = steps_per_epoch(knees, batch_size) * batch_size
  if not usable:
    raise ValueError(f'{knees} knees make no batch of {batch_size}')
  ds = grain.MapDataset.source(_Subset(cache.source(), np.asarray(indices)))
  if oversample is not None:
    ds = _Bootstrap(ds, labels=oversample, seed=seed)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # Indices past an epoch's end fall through shuffle, slice and source into
  # the next epoch with a new order, so cutting and sharding here acts on
  # every epoch: each one is whole batches, and processes get disjoint shares.
  ds = _BatchShard(ds[:usable], batch_size=batch_size, sharding=sharding)
  ds = ds.repeat(num_epochs)
  ds = ds.map(DecodeView(view, cache.meta['roi_mm'], task, view_size))
  return ds.batch(local_batch, drop_remainder=True)


def knees_with_keypoints(cache: cache_lib.Cache,
                         chunk: int = 512) -> np.ndarray:
  """Boolean mask over the records of `cache`: every landmark known."""
  if cache.meta.get('source') == 'png_folders':  # built without landmarks
    return np.zeros(len(cache), bool)
  source = cache.source()
  known = np.zeros(len(cache), bool)
  for start in range(0, len(cache), chunk):
    rows = range(start, min(start + chunk, len(cache)))
    # Read together: the source reads a list of records in parallel.
    for i, record in zip(rows, source.__getitems__(list(rows))):
      known[i] = np.isfinite(cache_lib.decode(record)['keypoints']).all()
  return known


def view_keypoints(cache: cache_lib.Cache, indices: Sequence[int] | np.ndarray,
                   *, view: str, view_size: int = 0) -> np.ndarray:
  """(len(indices), K, 2) float32 (x, y) landmarks of cache rows in the
  pixels of a `views.KEYPOINT_VIEWS` view (NaN where unknown): what that
  view's batches carry as 'keypoints', without decoding images."""
  if view not in views.KEYPOINT_VIEWS:
    raise ValueError(f'the {view!r} view carries no keypoints')
  size = view_size or views.VIEW_PX[view]
  records = cache.source().__getitems__([int(i) for i in indices])
  return np.stack([
      views.rescale_keypoints(cache_lib.decode(r)['keypoints'],
                              cache.meta['roi_px'], size)
      for r in records]).reshape(len(indices), schema.NUM_LANDMARKS, 2)


def usable_knees(cache: cache_lib.Cache, view: str) -> np.ndarray | None:
  """Mask of the records `view` can be cut from; None when it is every one.

  A view of `views.KEYPOINT_VIEWS` needs every landmark of a knee. Raises
  cli.BadInput when no knee of the cache has them (a cache built from PNG
  folders, say).
  """
  if view not in views.KEYPOINT_VIEWS:
    return None
  known = knees_with_keypoints(cache)
  if len(cache) and not known.any():
    from koajax import cli  # pylint: disable=g-import-not-at-top
    raise cli.BadInput(
        f"the {view!r} view needs the knees' landmarks and the cache "
        f'{cache.dir} has none (a PNG-folder cache?): build the cache from '
        'radiographs with their landmarks (python -m koajax.data.build '
        '--manifest=... --landmarks=...), or choose another view')
  return known


def _mark_flags_parsed() -> None:
  # Grain 0.2.18 worker processes read an absl flag and crash with
  # UnparsedFlagAccessError unless flags were parsed (google/grain#1355).
  # Programs run by absl.app have parsed them already.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _read_threads(read_threads: int | None) -> int:
  return read_threads or min(16, os.cpu_count() or 1)


# Worker processes per stream an accelerator run gets at most.
MAX_AUTO_WORKERS = 8


def reading_processes(data_workers: int, *, streams: int, accelerator: bool,
                      cores: int | None = None) -> tuple[int, int | None]:
  """(worker processes per stream, reading threads per process) for a
  training run's `data_workers` (-1: chosen here).

  A process reads a few thousand knees/s however many threads it has (most
  of a knee is Python work under the GIL), and worker processes add up
  (benchmarks/README.md, "Input pipeline"). On a CPU the train step
  consumes a small share of what one process reads, so -1 means none:
  workers would cost start-up and memory for nothing. On an accelerator one
  process can fall short of the step (an H200 takes about 3,800 knees/s in
  the Semixup step at batch 256), so -1 means one worker per two cores,
  less the training loop's core, shared among the streams (at least one,
  at most `MAX_AUTO_WORKERS` each). With workers, each reads with the
  cores' share per worker, one or two threads (a process's threads share
  its GIL: the Siamese view reads fastest with one, the whole-ROI views,
  whose resizes release it, with two), rather than one thread per core
  each; without workers, None: the default, one per core.
  """
  cores = cores or os.cpu_count() or 1
  if data_workers < 0:
    data_workers = (0 if not accelerator else
                    max(1, min(MAX_AUTO_WORKERS,
                               (cores - 1) // (2 * max(1, streams)))))
  if not data_workers:
    return 0, None
  return data_workers, max(1, min(2, cores // (data_workers
                                             * max(1, streams))))


def prefetch_batches(*, worker_count: int = 0, worker_buffer_size: int = 2,
                     read_threads: int | None = None) -> int:
  """How many batches `to_iterator` with these arguments can hold ready
  ahead of the consumer: each reading process's prefetch buffer, and each
  worker's output buffer. A throughput measurement must consume this many
  before timing, or it times the buffer instead of the reading."""
  per_process = 2 * _read_threads(read_threads)
  if worker_count == 0:
    return per_process
  return worker_count * (per_process + worker_buffer_size)


class _Positioned(grain.DatasetIterator):
  """An iterator over a MapDataset whose state is where it is in it.

  Grain's own state depends on how the elements are read (with worker
  processes it is the state of each worker's share), so a run saved with
  one worker count could not resume with another: with a CPU and an
  accelerator choosing different counts, a run moved between them. Here
  the state is the index of the next element, as a plain iterator's, and
  restoring it reads on from there (`ds[i:]`) however it is read.
  """

  def __init__(self, ds: grain.MapDataset,
               open_at: Callable[[grain.MapDataset], grain.DatasetIterator]):
    super().__init__()
    self._ds = ds
    self._open = open_at
    self._next = 0
    self._it = open_at(ds)

  def __next__(self) -> Any:
    element = next(self._it)
    self._next += 1
    return element

  def get_state(self) -> dict[str, int]:
    return {'next_index': self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    position = _position(state)
    if position != self._next:
      self._it.close()
      self._it = self._open(self._ds[position:] if position else self._ds)
      self._next = position

  def start_prefetch(self) -> None:
    self._it.start_prefetch()

  def close(self) -> None:
    self._it.close()
    super().close()


def _position(state: dict[str, Any]) -> int:
  """Elements consumed, from a plain iterator's state or from the state
  of Grain's worker iterator (what runs with workers saved before
  `_Positioned`): each worker reads every W-th element, so the consumed
  ones are the sum of theirs."""
  if 'next_index' in state:
    return int(state['next_index'])
  if 'iterators_in_use_states' in state:
    return sum(int(s['next_index']) for s in state['iterators_in_use_states'])
  raise ValueError(f'not a saved input pipeline position: {sorted(state)}')


def to_iterator(ds: grain.MapDataset, *, worker_count: int = 0,
                worker_buffer_size: int = 2,
                read_threads: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over `ds`, optionally fed by worker processes.

  Args:
    ds: a MapDataset, e.g. from `knee_dataset`.
    worker_count: worker processes (0 = read and decode in this process,
      with `read_threads` threads).
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads per process reading and mapping batches (default:
      one per core, at most 16).
  """
  threads = _read_threads(read_threads)

  def open_at(part: grain.MapDataset) -> grain.DatasetIterator:
    # Grain's default buffer is 500 elements, here whole batches: thousands
    # of knees decoded ahead at every start, on the cores that compile and
    # run the first steps. Two batches per thread keep every thread busy.
    it_ds = part.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=2 * threads))
    if worker_count > 0:
      _mark_flags_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count,
          per_worker_buffer_size=worker_buffer_size))
    return iter(it_ds)

  return _Positioned(ds, open_at)


def make_streams(cache: cache_lib.Cache, *,
                 labeled: Sequence[int] | np.ndarray,
                 unlabeled: Sequence[int] | np.ndarray | None = None,
                 view: str = 'siamese', view_size: int = 0,
                 task: Any = None, batch_size: int,
                 unlabeled_batch_size: int | None = None, seed: int = 0,
                 oversample: np.ndarray | None = None,
                 num_epochs: int | None = None, worker_count: int = 0,
                 read_threads: int | None = None,
                 sharding: Sharding | None = None
                 ) -> dict[str, grain.DatasetIterator]:
  """Training streams: {'labeled': ..., 'unlabeled': ... (if given)}.

  The labeled stream runs `num_epochs` passes (None: endlessly) at
  `batch_size`; the unlabeled stream repeats endlessly at
  `unlabeled_batch_size` (default `batch_size`) with an independent shuffle,
  so one labeled epoch can see any number of unlabeled batches. Each stream
  gets `worker_count` worker processes of its own. With a `task`, elements
  carry its labels. `oversample`: labels of `labeled` whose smaller classes
  the labeled stream bootstraps (`knee_dataset`).
  """
  common = dict(view=view, view_size=view_size, task=task, sharding=sharding)
  io = dict(worker_count=worker_count, read_threads=read_threads)
  streams = {'labeled': to_iterator(knee_dataset(
      cache, labeled, batch_size=batch_size, seed=seed,
      num_epochs=num_epochs, oversample=oversample, **common), **io)}
  if unlabeled is not None:
    # A seed far from the labeled one: Grain shuffles epoch e with seed + e,
    # so nearby seeds would reuse the labeled stream's permutations.
    streams['unlabeled'] = to_iterator(knee_dataset(
        cache, unlabeled, batch_size=unlabeled_batch_size or batch_size,
        seed=(seed + 2**31) % 2**32, num_epochs=None, **common), **io)
  return streams


def eval_batches(cache: cache_lib.Cache, indices: Sequence[int] | np.ndarray,
                 *, view: str = 'siamese', view_size: int = 0,
                 batch_size: int, sharding: Sharding | None = None,
                 read_threads: int | None = None) -> grain.DatasetIterator:
  """Every knee of `indices` once, in order; the last batch may be short.

  `batch_size` is global, as in `knee_dataset`. With several processes the
  shares differ by at most one knee, so processes may see different numbers
  of batches: multi-host evaluation must pad or gather per process.
  """
  sharding = sharding or Sharding.from_jax()
  local_batch = _local_batch_size(batch_size, sharding)
  ds = grain.MapDataset.source(_Subset(cache.source(), np.asarray(indices)))
  ds = ds[sharding.index::sharding.count]
  ds = ds.map(DecodeView(view, cache.meta['roi_mm'], view_size=view_size))
  ds = ds.batch(local_batch, drop_remainder=False)
  return to_iterator(ds, read_threads=read_threads)
