"""Tests for koajax.data.views and the Grain input pipeline."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from koajax.data import cache as cache_lib
from koajax.data import pipeline
from koajax.data import views

ROI_PX = 64
NUM_KNEES = 48
ONE = pipeline.Sharding(0, 1)


def _level(i: int) -> int:
  """Each knee's image is flat at this level, so a batch shows its records."""
  return (37 * i) % 250 + 3


@pytest.fixture(scope='module')
def cache(tmp_path_factory) -> cache_lib.Cache:
  directory = tmp_path_factory.mktemp('cache')
  with cache_lib.CacheWriter(directory, roi_mm=140, roi_px=ROI_PX) as w:
    for i in range(NUM_KNEES):
      grades = np.full(7, -1, np.int8)
      grades[:2] = i % 5, i % 4
      w.add(cache_lib.Knee(
          subject_id=f'S{i // 2}', visit=0, side='RL'[i % 2], site='A',
          image=np.full((ROI_PX, ROI_PX), _level(i), np.uint8),
          keypoints=np.full((16, 2), 32.0, np.float32), grades=grades))
  return cache_lib.open_cache(directory)


def test_records_are_stored_uncompressed(cache):
  # The fixture's flat images would shrink to almost nothing under any
  # compression; uncompressed, the file holds every record's bytes.
  source = cache.source()
  record_bytes = sum(len(source[i]) for i in range(len(cache)))
  assert (cache.dir / cache_lib.RECORDS).stat().st_size >= record_bytes


# --- views -------------------------------------------------------------------


def _centroid(image: np.ndarray) -> np.ndarray:
  """Intensity-weighted (row, col) of a dark image with one bright spot."""
  w = image.astype(np.float64) / image.sum()
  rows, cols = np.indices(image.shape)
  return np.array([np.sum(w * rows), np.sum(w * cols)])


@pytest.mark.parametrize('px_per_mm', [1, 2])
def test_siamese_pair_geometry(px_per_mm):
  # Two 3 mm squares centred at 75.5 mm down and 40.5 / 110.5 mm across.
  roi = np.zeros((140 * px_per_mm,) * 2, np.uint8)
  for col in (40, 110):
    roi[74 * px_per_mm:77 * px_per_mm,
        (col - 1) * px_per_mm:(col + 2) * px_per_mm] = 255
  pair = views.siamese_pair(roi, roi_mm=140)
  assert pair.shape == (2, 128, 128) and pair.dtype == np.uint8

  # By hand: the central 110 mm start 15 mm in and span 300 px, so a point
  # m mm from the ROI edge lies at (m - 15) * 300 / 110 - 0.5 px (pixel
  # centres); the patch rows start at 100, the medial cols at 172 and are
  # mirrored (col -> 127 - col).
  def to_px(mm):
    return (mm - 15) * 300 / 110 - 0.5

  row = to_px(75.5) - 100
  np.testing.assert_allclose(_centroid(pair[0]), [row, to_px(40.5)], atol=0.2)
  np.testing.assert_allclose(_centroid(pair[1]),
                             [row, 127 - (to_px(110.5) - 172)], atol=0.2)


def test_whole_knee_and_keypoints_views_agree_on_geometry():
  roi = np.zeros((100, 100), np.uint8)
  roi[29:32, 69:72] = 255  # centred at (x=70, y=30)
  image, kp = views.with_keypoints(roi, np.array([[70.0, 30.0], [np.nan] * 2]),
                                   size=320)
  assert image.shape == (320, 320) and kp.dtype == np.float32
  np.testing.assert_allclose(_centroid(image)[::-1], kp[0], atol=0.2)
  assert np.isnan(kp[1]).all()
  assert views.whole_knee(roi).shape == (300, 300)


def test_smaller_siamese_patches_sample_the_same_regions():
  # One 3 mm square at 75.5 mm down, 40.5 mm across (the lateral patch).
  roi = np.zeros((280, 280), np.uint8)
  roi[148:154, 78:84] = 255
  full = views.get_view('siamese')({'image': roi}, 140)['image']
  half = views.get_view('siamese', 64)({'image': roi}, 140)['image']
  assert full.shape == (2, 128, 128) and half.shape == (2, 64, 64)
  # A point at pixel centre c of a 128 px patch is at (c + 0.5) / 2 - 0.5
  # of the 64 px one.
  np.testing.assert_allclose(_centroid(half[0]),
                             (_centroid(full[0]) + 0.5) / 2 - 0.5, atol=0.15)
  whole = views.get_view('whole', 310)({'image': roi}, 140)['image']
  assert whole.shape == (310, 310)


def test_unknown_view_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown view'):
    views.get_view('sideways')
  with pytest.raises(ValueError, match='view size must be >= 0'):
    views.get_view('siamese', -2)


# --- pipeline ----------------------------------------------------------------


def _indices(it, n=None) -> list[np.ndarray]:
  out = []
  for batch in it:
    out.append(batch['index'])
    if n is not None and len(out) == n:
      break
  return out


def test_elements(cache):
  subset = np.arange(0, NUM_KNEES, 3)
  for view, shape in [('siamese', (2, 128, 128)), ('whole', (300, 300)),
                      ('keypoints', (320, 320))]:
    it = pipeline.to_iterator(pipeline.knee_dataset(
        cache, subset, view=view, batch_size=4, seed=0, sharding=ONE))
    batch = next(it)
    assert batch['image'].shape == (4, *shape)
    assert batch['image'].dtype == np.uint8
    assert batch['kl'].dtype == batch['grades'].dtype == np.int32
    assert batch['index'].dtype == np.int32
    assert batch['grades'].shape == (4, 7)
    assert ('keypoints' in batch) == (view == 'keypoints')
    # The image, grades and index belong to the same record of the subset.
    assert set(batch['index']) <= set(subset)
    corner = batch['image'].reshape(4, -1)[:, 0]
    np.testing.assert_array_equal(corner, [_level(i) for i in batch['index']])
    np.testing.assert_array_equal(batch['kl'], batch['index'] % 5)
    np.testing.assert_array_equal(batch['grades'][:, 1], batch['index'] % 4)
  # 64 -> 320 px: x' = (x + 0.5) * 5 - 0.5.
  np.testing.assert_allclose(batch['keypoints'][0],
                             np.full((16, 2), 32.5 * 5 - 0.5), atol=1e-4)


def test_epochs_are_fresh_permutations_of_whole_batches(cache):
  subset = np.arange(1, NUM_KNEES, 2)  # 24 knees
  it = pipeline.to_iterator(pipeline.knee_dataset(
      cache, subset, view='siamese', batch_size=5, seed=0, num_epochs=3,
      sharding=ONE))
  batches = _indices(it)
  steps = pipeline.steps_per_epoch(len(subset), 5)
  assert steps == 4 and len(batches) == 3 * steps
  epochs = [np.concatenate(batches[e * steps:(e + 1) * steps])
            for e in range(3)]
  for epoch in epochs:  # 20 distinct knees of the subset per epoch
    assert len(set(epoch)) == 20 and set(epoch) <= set(subset)
  assert not np.array_equal(epochs[0], epochs[1])

  whole = pipeline.to_iterator(pipeline.knee_dataset(
      cache, subset[:20], view='siamese', batch_size=5, seed=0, num_epochs=2,
      sharding=ONE))
  first, second = np.split(np.concatenate(_indices(whole)), 2)
  np.testing.assert_array_equal(np.sort(first), subset[:20])
  np.testing.assert_array_equal(np.sort(second), subset[:20])
  assert not np.array_equal(first, second)


def test_processes_read_disjoint_shares_of_each_epoch(cache):
  subset = np.arange(NUM_KNEES)

  def batches(sharding):
    return _indices(pipeline.to_iterator(pipeline.knee_dataset(
        cache, subset, view='siamese', batch_size=8, seed=5, num_epochs=2,
        sharding=sharding)))

  shares = [batches(pipeline.Sharding(p, 2)) for p in range(2)]
  for epoch in range(2):
    parts = [np.concatenate(s[epoch * 6:(epoch + 1) * 6]) for s in shares]
    assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), subset)
  # Side by side, the shares are the batches one process reads, in order.
  one = batches(ONE)
  assert len(one) == len(shares[0]) == 12
  for whole, a, b in zip(one, *shares):
    np.testing.assert_array_equal(np.concatenate([a, b]), whole)
  with pytest.raises(ValueError, match='does not split over 2 processes'):
    pipeline.knee_dataset(cache, subset, view='siamese', batch_size=5, seed=0,
                          sharding=pipeline.Sharding(0, 2))


def test_labeled_and_unlabeled_streams(cache):
  streams = pipeline.make_streams(
      cache, labeled=np.arange(12), unlabeled=np.arange(12, NUM_KNEES),
      batch_size=4, unlabeled_batch_size=6, num_epochs=1, sharding=ONE)
  labeled = _indices(streams['labeled'])
  assert len(labeled) == 3 and all(len(b) == 4 for b in labeled)
  # The unlabeled stream outlives the labeled epochs and reshuffles.
  unlabeled = np.concatenate(_indices(streams['unlabeled'], n=12))
  assert set(unlabeled) == set(range(12, NUM_KNEES))
  assert not np.array_equal(unlabeled[:36], unlabeled[36:])


def _fresh(cache, worker_count=0):
  return pipeline.to_iterator(pipeline.knee_dataset(
      cache, np.arange(NUM_KNEES), view='siamese', batch_size=4, seed=9,
      num_epochs=None, sharding=ONE), worker_count=worker_count)


def test_state_round_trip(cache):
  it = _fresh(cache)
  _indices(it, n=15)  # into the second epoch
  state = it.get_state()
  expected = _indices(it, n=3)
  restored = _fresh(cache)
  restored.set_state(state)
  np.testing.assert_array_equal(_indices(restored, n=3), expected)


def test_orbax_checkpoint_resumes_at_the_next_batch(cache, tmp_path):
  it = _fresh(cache)
  _indices(it, n=5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(5, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _indices(it, n=2)
  restored = _fresh(cache)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(5, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(_indices(restored, n=2), expected)


def test_worker_processes_deliver_the_same_batches(cache):
  expected = _indices(_fresh(cache), n=6)
  it = _fresh(cache, worker_count=1)
  try:
    np.testing.assert_array_equal(_indices(it, n=3), expected[:3])
    state = it.get_state()
  finally:
    it.close()
  restored = _fresh(cache, worker_count=1)
  try:
    restored.set_state(state)
    np.testing.assert_array_equal(_indices(restored, n=3), expected[3:])
  finally:
    restored.close()


def test_a_stream_resumes_with_another_worker_count(cache):
  expected = _indices(_fresh(cache), n=9)
  plain = _fresh(cache)
  _indices(plain, n=3)
  it = _fresh(cache, worker_count=2)
  try:
    it.set_state(plain.get_state())
    np.testing.assert_array_equal(_indices(it, n=3), expected[3:6])
    state = it.get_state()
  finally:
    it.close()
  plain = _fresh(cache)
  plain.set_state(state)
  np.testing.assert_array_equal(_indices(plain, n=3), expected[6:])


def test_a_position_saved_by_grains_own_worker_iterator_is_read(cache):
  # Runs saved the state of Grain's worker iterator itself before.
  expected = _indices(_fresh(cache), n=8)
  pipeline._mark_flags_parsed()  # pylint: disable=protected-access
  ds = pipeline.knee_dataset(cache, np.arange(NUM_KNEES), view='siamese',
                             batch_size=4, seed=9, num_epochs=None,
                             sharding=ONE)
  raw = iter(ds.to_iter_dataset().mp_prefetch(
      grain.MultiprocessingOptions(num_workers=2)))
  try:
    np.testing.assert_array_equal(_indices(raw, n=5), expected[:5])
    state = raw.get_state()
  finally:
    raw.close()
  assert 'next_index' not in state
  restored = _fresh(cache)
  restored.set_state(state)
  np.testing.assert_array_equal(_indices(restored, n=3), expected[5:])
  with pytest.raises(ValueError, match='not a saved input pipeline'):
    restored.set_state({'cursor': 3})


def test_eval_batches_cover_every_knee_once(cache):
  batches = _indices(pipeline.eval_batches(cache, np.arange(10),
                                           batch_size=4, sharding=ONE))
  assert [len(b) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(batches), np.arange(10))


# --- bootstrap oversampling --------------------------------------------------


def _oversampled(cache, labels, seed=9):
  return pipeline.to_iterator(pipeline.knee_dataset(
      cache, np.arange(NUM_KNEES), view='siamese', batch_size=4, seed=seed,
      num_epochs=None, oversample=labels, sharding=ONE))


def test_bootstrap_balances_every_epoch_with_new_draws(cache):
  # 30 knees of class 0, 12 of class 1, 6 masked: each epoch holds every
  # knee once and 18 more of class 1, drawn with replacement.
  labels = np.array([0] * 30 + [1] * 12 + [-1] * 6)
  labels = labels[np.random.default_rng(1).permutation(NUM_KNEES)]
  assert pipeline.bootstrap_counts(labels) == {1: 18}
  assert pipeline.epoch_knees(NUM_KNEES, labels) == 66
  steps = pipeline.steps_per_epoch(66, 4)  # 16: 64 of the 66 per epoch
  batches = np.concatenate(_indices(_oversampled(cache, labels), n=3 * steps))
  epochs = batches.reshape(3, 64)
  draws = []
  for epoch in epochs:
    counts = np.bincount(epoch, minlength=NUM_KNEES)
    # At most 2 of the 66 (one epoch's tail) sit the epoch out.
    assert (counts[labels != 1] <= 1).all() and (counts[labels != 1] == 0
                                                 ).sum() <= 2
    assert counts[labels == 1].sum() >= 28  # 12 + 18, less the tail
    assert (np.bincount(labels[epoch] + 1)[1:] >= [28, 28]).all()
    draws.append(counts[labels == 1])
  assert not np.array_equal(draws[0], draws[1])  # new draws each epoch
  # Deterministic by seed; another seed draws (and shuffles) otherwise.
  again = np.concatenate(_indices(_oversampled(cache, labels), n=steps))
  np.testing.assert_array_equal(again, epochs[0])
  other = np.concatenate(_indices(_oversampled(cache, labels, seed=10),
                                  n=steps))
  assert not np.array_equal(other, epochs[0])


def test_bootstrap_stream_resumes_at_the_next_batch(cache):
  labels = np.arange(NUM_KNEES) % 3 == 0
  it = _oversampled(cache, labels.astype(int))
  _indices(it, n=20)  # into the second epoch (64 knees = 16 batches)
  state = it.get_state()
  expected = _indices(it, n=6)
  restored = _oversampled(cache, labels.astype(int))
  restored.set_state(state)
  np.testing.assert_array_equal(_indices(restored, n=6), expected)


def test_reading_processes_by_platform():
  # A CPU run reads in its own process; an accelerator run gets a worker
  # per two cores less the loop's, shared by its streams, capped.
  assert pipeline.reading_processes(-1, streams=2, accelerator=False,
                                    cores=16) == (0, None)
  assert pipeline.reading_processes(-1, streams=2, accelerator=True,
                                    cores=16) == (3, 2)
  assert pipeline.reading_processes(-1, streams=1, accelerator=True,
                                    cores=16) == (7, 2)
  assert pipeline.reading_processes(-1, streams=1, accelerator=True,
                                    cores=96) == (pipeline.MAX_AUTO_WORKERS,
                                                  2)
  assert pipeline.reading_processes(-1, streams=2, accelerator=True,
                                    cores=2) == (1, 1)
  # What the config asks for is what it gets, on any platform.
  assert pipeline.reading_processes(0, streams=1, accelerator=True,
                                    cores=16) == (0, None)
  assert pipeline.reading_processes(2, streams=2, accelerator=False,
                                    cores=2) == (2, 1)
