"""The coherence mixture against scikit-learn and NumPy."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special
import pytest
from sklearn import mixture

from koajax import coherence
from koajax import tasks

NUM_CLASSES = tuple(tasks.get('kl_oarsi').num_classes.values())  # 5, 4 x 6
D = sum(NUM_CLASSES)


def coherent_grades(n, seed=0, ungraded=0):
  """(n, 7) grades that go together as real knees' do: every OARSI grade
  follows a latent severity that is also the KL grade; the first `ungraded`
  knees lack their fourth head."""
  rng = np.random.default_rng(seed)
  severity = rng.integers(0, 5, n)
  oarsi = [np.clip(severity - 1 + rng.integers(-1, 2, n), 0, 3)
           for _ in NUM_CLASSES[1:]]
  grades = np.stack([severity, *oarsi], axis=1)
  grades[:ungraded, 3] = -1
  return grades


def head_softmax(logits):
  """Per-head softmax of (n, 29) logits, with SciPy."""
  heads = np.split(logits, np.cumsum(NUM_CLASSES)[:-1], axis=1)
  return np.concatenate([special.softmax(z, axis=1) for z in heads], axis=1)


@pytest.fixture(scope='module')
def fitted():
  """fit_gmm's parameters and the scikit-learn model it fitted."""
  models = []

  class Recording(mixture.GaussianMixture):

    def fit(self, x, y=None):
      models.append(self)
      return super().fit(x, y)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(mixture, 'GaussianMixture', Recording)
    params = coherence.fit_gmm(coherent_grades(400, ungraded=7), NUM_CLASSES)
  (model,) = models
  return params, model


@pytest.fixture(scope='module')
def points(fitted):
  """Realistic and unrealistic inputs, float64, by name."""
  _, model = fitted
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(300, D)) * 3
  return {
      'probs': head_softmax(logits),
      'sharp_probs': head_softmax(logits * 10),
      'one_hot': coherence.one_hot_grades(coherent_grades(300, seed=2),
                                          NUM_CLASSES),
      'near_means': model.means_ + 1e-3 * rng.normal(size=model.means_.shape),
      'far': rng.normal(size=(300, D)) * 5,
  }


def f64_params(model):
  return {'weights': model.weights_, 'means': model.means_,
          'precisions_cholesky': model.precisions_cholesky_}


def test_params_are_the_fitted_model_as_float32(fitted):
  params, model = fitted
  assert set(params) == set(coherence.PARAM_KEYS)
  assert all(v.dtype == np.float32 for v in params.values())
  assert params['weights'].shape == (10,)
  assert params['means'].shape == (10, D)
  assert params['precisions_cholesky'].shape == (10, D, D)
  for key, value in f64_params(model).items():
    np.testing.assert_allclose(params[key], value, rtol=1e-6)
  assert model.covariance_type == 'full' and model.n_components == 10
  assert model.n_features_in_ == D


@pytest.mark.parametrize('name', ['probs', 'sharp_probs', 'one_hot',
                                  'near_means', 'far'])
def test_log_density_float64_equals_score_samples(fitted, points, name):
  _, model = fitted
  x = points[name]
  with jax.enable_x64(True):
    got = coherence.log_density(f64_params(model), jnp.asarray(x))
    assert got.dtype == jnp.float64
    got = np.asarray(got)
  np.testing.assert_allclose(got, model.score_samples(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', ['probs', 'sharp_probs', 'one_hot',
                                  'near_means', 'far'])
def test_log_density_float32_is_close_to_float64_sklearn(fitted, points,
                                                         name):
  # float32 parameters and inputs against float64 scikit-learn with the
  # unrounded parameters: measured <= 1e-5 of max(|g|, 1) (the rounding of
  # the parameters alone is ~1e-6); 1e-4 leaves room for other BLAS and
  # backends while still catching a lost digit or a TF32 product (~1e-3).
  params, model = fitted
  x = points[name]
  got = np.asarray(jax.jit(coherence.log_density)(
      params, x.astype(np.float32)))
  assert got.dtype == np.float32 and np.all(np.isfinite(got))
  want = model.score_samples(x)
  err = np.abs(got - want) / np.maximum(np.abs(want), 1.0)
  assert err.max() <= 1e-4, (name, err.max())


def test_log_density_float32_finite_far_from_everything(fitted):
  params, model = fitted
  x = np.random.default_rng(3).normal(size=(50, D)) * 1e3
  got = np.asarray(coherence.log_density(params, x.astype(np.float32)))
  want = model.score_samples(x)
  assert np.all(np.isfinite(got)) and want.max() < -1e6
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_log_density_gradient_matches_finite_differences(fitted, points):
  _, model = fitted
  x = np.concatenate([points['probs'][:3], points['far'][:2]])
  eps = 1e-6
  step = eps * np.eye(D)
  # Central differences of scikit-learn's density: an independent gradient.
  want = np.stack([(model.score_samples(xi + step)
                    - model.score_samples(xi - step)) / (2 * eps)
                   for xi in x])
  with jax.enable_x64(True):
    grad = jax.grad(lambda p: jnp.sum(
        coherence.log_density(f64_params(model), p)))(jnp.asarray(x))
    grad = np.asarray(grad)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)


def numpy_loss(g, tau, keep=None):
  per_knee = np.logaddexp(0.0, -tau * g) / tau
  if keep is None:
    return per_knee.mean()
  return per_knee[keep].sum() / max(keep.sum(), 1)


@pytest.mark.parametrize('tau', [0.25, 0.5, 1.0])
def test_incoherence_loss_matches_numpy(fitted, points, tau):
  params, model = fitted
  x = np.concatenate([points['probs'], points['one_hot'], points['far'][:5]])
  want = numpy_loss(model.score_samples(x), tau)
  got = jax.jit(lambda p, x: coherence.incoherence_loss(p, x, tau=tau))(
      params, x.astype(np.float32))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_incoherence_loss_mask_ignores_padding_even_nan(fitted, points):
  params, model = fitted
  x = points['probs'][:8].copy()
  keep = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
  want = numpy_loss(model.score_samples(x), 0.5, keep)
  x[~keep] = np.nan  # padding may be anything
  x32 = jnp.asarray(x, jnp.float32)
  loss, grad = jax.value_and_grad(
      lambda x: coherence.incoherence_loss(params, x, mask=keep))(x32)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)) and np.all(grad[~keep] == 0)
  assert float(coherence.incoherence_loss(
      params, x32, mask=np.zeros(8, bool))) == 0.0


def test_loss_gradient_pushes_toward_coherent_grades(fitted):
  # Probabilities saying KL 4 with no osteophyte and no narrowing: one
  # gradient step against the loss must make them more coherent.
  params, _ = fitted
  grades = np.array([[4, 0, 0, 0, 0, 0, 0]])
  p = 0.7 * coherence.one_hot_grades(grades, NUM_CLASSES) + 0.3 / 4
  p = jnp.asarray(p, jnp.float32)
  loss = lambda p: coherence.incoherence_loss(params, p)
  assert float(loss(p - 1e-3 * jax.grad(loss)(p))) < float(loss(p))


def test_concat_probs_follows_head_order():
  heads = tasks.get('kl_oarsi').head_names
  probs = {h: np.full((2, c), i, np.float32)
           for i, (h, c) in enumerate(zip(heads, NUM_CLASSES))}
  got = np.asarray(coherence.concat_probs(dict(reversed(probs.items())),
                                          heads))
  assert got.shape == (2, D)
  np.testing.assert_array_equal(
      got[0], np.repeat(np.arange(7), NUM_CLASSES).astype(np.float32))
  with pytest.raises(ValueError, match='jsn_m'):
    coherence.concat_probs({h: probs[h] for h in heads[:-1]}, heads)
  labels = {h: np.array([i, -1]) for i, h in enumerate(heads)}
  np.testing.assert_array_equal(coherence.stack_labels(labels, heads),
                                [list(range(7)), [-1] * 7])


def test_fit_is_deterministic_by_seed_and_logs_left_out_knees(caplog):
  grades = coherent_grades(150, seed=4, ungraded=12)
  with caplog.at_level(logging.INFO, logger='koajax.coherence'):
    first = coherence.fit_gmm(grades, NUM_CLASSES, components=3)
  assert '138 fully graded knees (12 knees with an ungraded head left out)' \
      in caplog.text
  again = coherence.fit_gmm(grades, NUM_CLASSES, components=3)
  other = coherence.fit_gmm(grades, NUM_CLASSES, components=3, seed=1)
  for key in coherence.PARAM_KEYS:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first['means'], other['means'])


def test_too_few_graded_knees_says_what_to_do():
  grades = coherent_grades(30, ungraded=25)
  with pytest.raises(ValueError) as error:
    coherence.fit_gmm(grades, NUM_CLASSES, components=10)
  text = str(error.value)
  assert 'only 5 training knees' in text and '25 lack a grade' in text
  assert 'lower coherence components or give more graded knees' in text
  assert '\n' not in text


def test_singular_covariance_says_to_raise_reg_covar():
  # Three distinct grade vectors, each repeated, no noise, no
  # regularisation: every component's covariance is singular.
  grades = np.repeat(coherent_grades(3, seed=5), 20, axis=0)
  with pytest.raises(ValueError) as error:
    coherence.fit_gmm(grades, NUM_CLASSES, components=3, noise=0.0,
                      reg_covar=0.0)
  text = str(error.value)
  assert 'raise reg_covar (now 0)' in text
  assert 'fewer coherence components' in text and '\n' not in text


def test_components_of_too_few_knees_are_named_with_what_to_change(caplog):
  # 40 knees for 3 components in 29 dimensions: each spans too few
  # directions, and only reg_covar keeps it invertible.
  grades = coherent_grades(40, seed=6)
  with caplog.at_level(logging.WARNING, logger='koajax.coherence'):
    coherence.fit_gmm(grades, NUM_CLASSES, components=3)
  assert 'nearly) singular covariances' in caplog.text
  assert 'Raise reg_covar (now 1e-06; e.g. 0.01)' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='koajax.coherence'):
    coherence.fit_gmm(grades, NUM_CLASSES, components=3, reg_covar=1e-2)
    coherence.fit_gmm(coherent_grades(600, seed=6), NUM_CLASSES,
                      components=1)
  assert 'singular' not in caplog.text


@pytest.mark.parametrize('grades,match', [
    (np.zeros((20, 6), int), r'\(knees, 7\)'),
    (np.full((20, 7), 4), 'head 1 must be -1 \\(ungraded\\) or 0..3'),
])
def test_bad_grades_say_what_is_wrong(grades, match):
  with pytest.raises(ValueError, match=match):
    coherence.fit_gmm(grades, NUM_CLASSES)


@pytest.mark.parametrize('kwargs', [{'components': 0}, {'noise': -0.2},
                                    {'reg_covar': -1e-6}])
def test_bad_settings_are_named(kwargs):
  with pytest.raises(ValueError, match='components must be >= 1, noise and '
                     'reg_covar >= 0'):
    coherence.fit_gmm(coherent_grades(20), NUM_CLASSES, **kwargs)
