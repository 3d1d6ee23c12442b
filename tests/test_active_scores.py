"""Tests of the active-learning uncertainty scores and their plots.

Expected values come from hand-written NumPy (explicit loops, log with zeros
masked), never from the code under test.
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from koajax.active import SCORE_NAMES, scores
from koajax.active import plots
from koajax.active import uncertainty


def _hand_entropy(p) -> float:
  total = 0.0
  for value in p:
    if value > 0:
      total -= value * np.log(value)
  return total


def _hand_scores(probs) -> dict[str, np.ndarray]:
  probs = np.asarray(probs, np.float64)
  num_samples, num_knees, num_classes = probs.shape
  out = {name: np.zeros(num_knees) for name in SCORE_NAMES}
  for n in range(num_knees):
    mean = np.zeros(num_classes)
    expected = 0.0
    for t in range(num_samples):
      mean += probs[t, n] / num_samples
      expected += _hand_entropy(probs[t, n]) / num_samples
    out['entropy'][n] = _hand_entropy(mean)
    out['expected_entropy'][n] = expected
    out['bald'][n] = _hand_entropy(mean) - expected
    out['least_confidence'][n] = 1.0 - max(mean)
  return out


def _assert_scores_close(got, want, atol=1e-12):
  assert set(got) == set(SCORE_NAMES)
  for name in SCORE_NAMES:
    assert got[name].shape == want[name].shape, name
    assert got[name].dtype == np.float64, name
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol,
                               err_msg=name)


def test_worked_example():
  # One knee, two passes that disagree completely.
  got = scores([[[1.0, 0.0]], [[0.0, 1.0]]])
  np.testing.assert_allclose(got['entropy'], [math.log(2)])
  np.testing.assert_allclose(got['expected_entropy'], [0.0])
  np.testing.assert_allclose(got['bald'], [math.log(2)])
  np.testing.assert_allclose(got['least_confidence'], [0.5])


def test_uniform_prediction():
  got = scores(np.full((3, 2, 5), 0.2))
  np.testing.assert_allclose(got['entropy'], [math.log(5)] * 2)
  np.testing.assert_allclose(got['expected_entropy'], [math.log(5)] * 2)
  np.testing.assert_allclose(got['bald'], [0.0, 0.0], atol=1e-15)
  np.testing.assert_allclose(got['least_confidence'], [0.8, 0.8])


def test_exact_zeros_give_no_nan_and_no_warning():
  one_hot = np.zeros((4, 3, 5))
  one_hot[:, 0, 2] = 1.0  # every pass agrees: certain
  one_hot[:, 1, 0] = 1.0
  one_hot[:2, 2, 1] = 1.0  # passes split between two classes
  one_hot[2:, 2, 3] = 1.0
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    got = scores(one_hot)
  for name in SCORE_NAMES:
    assert not np.isnan(got[name]).any(), name
  np.testing.assert_array_equal(got['entropy'][:2], [0.0, 0.0])
  np.testing.assert_array_equal(got['bald'][:2], [0.0, 0.0])
  np.testing.assert_array_equal(got['expected_entropy'], [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(got['least_confidence'][:2], [0.0, 0.0])
  np.testing.assert_allclose(got['entropy'][2], math.log(2))
  np.testing.assert_allclose(got['bald'][2], math.log(2))
  _assert_scores_close(got, _hand_scores(one_hot))


def test_single_pass():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=(1, 20))
  probs[0, 3] = [0.0, 0.0, 1.0, 0.0, 0.0]
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    got = scores(probs)
  np.testing.assert_array_equal(got['bald'], np.zeros(20))
  np.testing.assert_allclose(got['entropy'], got['expected_entropy'],
                             rtol=0, atol=1e-15)
  _assert_scores_close(got, _hand_scores(probs))


@pytest.mark.parametrize('num_samples,num_classes,alpha',
                         [(2, 2, 1.0), (10, 5, 0.3), (30, 4, 5.0)])
def test_random_dirichlet_matches_hand_computation(num_samples, num_classes,
                                                   alpha):
  rng = np.random.default_rng(num_samples * 100 + num_classes)
  probs = rng.dirichlet(np.full(num_classes, alpha),
                        size=(num_samples, 17))
  got = scores(probs)
  _assert_scores_close(got, _hand_scores(probs))
  assert (got['bald'] >= 0).all()
  assert (got['least_confidence'] >= 0).all()
  assert (got['least_confidence'] <= 1 - 1 / num_classes + 1e-12).all()


def test_float32_and_jax_input():
  rng = np.random.default_rng(1)
  probs = rng.dirichlet(np.ones(5), size=(8, 12)).astype(np.float32)
  want = _hand_scores(probs)  # same float32 values, widened
  _assert_scores_close(scores(probs), want)
  _assert_scores_close(scores(jnp.asarray(probs)), want)


def test_mean_probs():
  probs = np.array([[[0.2, 0.8]], [[0.6, 0.4]]])
  np.testing.assert_allclose(uncertainty.mean_probs(probs), [[0.4, 0.6]])


def test_tolerates_softmax_round_off():
  probs = np.array([[[0.5, 0.5004]]])
  got = scores(probs)
  np.testing.assert_allclose(got['entropy'], [_hand_entropy([0.5, 0.5004])])


def test_empty_pool():
  got = scores(np.zeros((4, 0, 5)))
  for name in SCORE_NAMES:
    assert got[name].shape == (0,)


@pytest.mark.parametrize('probs,match', [
    (np.full((4, 5), 0.2), r'\(4, 5\).*\(T, N, C\)'),
    (np.full((2, 3, 4, 5), 0.2), r'\(2, 3, 4, 5\).*\(T, N, C\)'),
    (np.zeros((0, 3, 5)), r'T >= 1'),
    (np.zeros((2, 3, 0)), r'C >= 1'),
    (np.array([[[1.5, -0.5]]]), r'negative value \(-0\.5\).*logits'),
    (np.array([[[0.5, 0.5]], [[0.5, 0.6]]]), r'\(1, 0\) sum to 1\.1'),
    (np.array([[[2.0, 3.0]]]), r'sum to 5.*within 0\.001'),
    (np.array([[[np.nan, 1.0]]]), r'NaN'),
])
def test_validation(probs, match):
  with pytest.raises(ValueError, match=match):
    scores(probs)


def test_most_and_least_uncertain_order_and_ties():
  values = np.array([0.3, 0.9, 0.1, 0.9, 0.3, 0.0, 0.9])
  np.testing.assert_array_equal(uncertainty.most_uncertain(values, 4),
                                [1, 3, 6, 0])
  np.testing.assert_array_equal(uncertainty.most_uncertain(values, 7),
                                [1, 3, 6, 0, 4, 2, 5])
  np.testing.assert_array_equal(uncertainty.least_uncertain(values, 3),
                                [5, 2, 0])
  np.testing.assert_array_equal(uncertainty.least_uncertain(values, 7),
                                [5, 2, 0, 4, 1, 3, 6])
  assert uncertainty.most_uncertain(values, 0).shape == (0,)
  # All tied (e.g. bald for one pass): plain index order.
  np.testing.assert_array_equal(uncertainty.most_uncertain(np.zeros(5), 3),
                                [0, 1, 2])
  np.testing.assert_array_equal(uncertainty.least_uncertain(np.zeros(5), 3),
                                [0, 1, 2])


def test_most_uncertain_unsigned_input():
  values = np.array([3, 0, 7, 7], dtype=np.uint8)
  np.testing.assert_array_equal(uncertainty.most_uncertain(values, 3),
                                [2, 3, 0])


@pytest.mark.parametrize('values,k', [
    (np.zeros(3), 4), (np.zeros(3), -1), (np.zeros(3), 1.5),
    (np.zeros((2, 2)), 1), (np.array([0.1, np.nan]), 1)])
def test_selection_validation(values, k):
  with pytest.raises(ValueError):
    uncertainty.most_uncertain(values, k)
  with pytest.raises(ValueError):
    uncertainty.least_uncertain(values, k)


def _is_png(path) -> bool:
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_score_histograms(tmp_path):
  rng = np.random.default_rng(2)
  table = scores(rng.dirichlet(np.ones(5), size=(6, 50)))
  table['constant'] = np.zeros(50)  # e.g. bald of a single pass
  written = plots.score_histograms(tmp_path / 'hist', table)
  assert written == {name: f'hist_{name}.png' for name in table}
  for filename in written.values():
    path = tmp_path / 'hist' / filename
    assert _is_png(path)
    assert path.stat().st_size > 1000
  with pytest.raises(ValueError, match='file name'):
    plots.score_histograms(tmp_path, {'a/b': np.zeros(3)})


def test_uncertain_grid(tmp_path):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, size=(11, 2, 32, 24), dtype=np.uint8)
  titles = [f'knee {k}\n{0.1 * k:.2f}' for k in range(11)]
  path = plots.uncertain_grid(tmp_path / 'grid.png', images, titles,
                              columns=4)
  assert _is_png(path)
  assert path.stat().st_size > 1000
  # Fewer knees than columns.
  path = plots.uncertain_grid(tmp_path / 'one.png', images[:1], titles[:1])
  assert path.stat().st_size > 1000


@pytest.mark.parametrize('images,titles,match', [
    (np.zeros((0, 2, 8, 8), np.uint8), [], 'K = 0'),
    (np.zeros((3, 8, 8), np.uint8), ['a'] * 3, r'\(K, 2, H, W\)'),
    (np.zeros((3, 1, 8, 8), np.uint8), ['a'] * 3, r'\(K, 2, H, W\)'),
    (np.zeros((3, 2, 8, 8), np.float32), ['a'] * 3, 'uint8'),
    (np.zeros((3, 2, 8, 8), np.uint8), ['a'] * 2, '2 titles for 3 knees'),
])
def test_uncertain_grid_validation(tmp_path, images, titles, match):
  with pytest.raises(ValueError, match=match):
    plots.uncertain_grid(tmp_path / 'grid.png', images, titles)
  assert not (tmp_path / 'grid.png').exists()
