"""The coherence method's pieces against NumPy and scikit-learn: the
prevalence weights, the class-weighted cross-entropy, the state fitted
before training, the loss before and after the warm-up, the coherence
measures of a report and the data the method refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koajax import cli
from koajax import coherence
from koajax import losses
from koajax import methods
from koajax import tasks
from koajax.data import cache as cache_lib
from koajax.data import pipeline
from koajax.evaluation import grade_coherence
from koajax.methods import coherence as method_lib
import sklearn_reference

TASK = tasks.get('kl_oarsi', view='keypoints')
HEADS = TASK.head_names
CLASSES = [TASK.num_classes[h] for h in HEADS]


def test_prevalence_weights_are_inverse_frequency_of_mean_one():
  y = np.array([0, 0, 0, 1, 2, 2, -1, -1])
  # Frequencies 3/6, 1/6, 2/6 and none: 1/f = 2, 6, 3, mean 11/3.
  np.testing.assert_allclose(method_lib.prevalence_weights(y, 4),
                             [6 / 11, 18 / 11, 9 / 11, 0.0], rtol=1e-6)
  np.testing.assert_allclose(method_lib.prevalence_weights(np.arange(5), 5),
                             np.ones(5))
  assert not method_lib.prevalence_weights(np.full(3, -1), 4).any()


def _nll(logits, y):
  z = logits - logits.max(1, keepdims=True)
  return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))


def test_class_weighted_cross_entropy_is_a_weighted_mean_over_graded():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  y = np.array([0, 3, 1, -1, 3, 2])
  w = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
  got, aux = losses.class_weighted_cross_entropy(
      logits=jnp.asarray(logits), labels=jnp.asarray(y),
      class_weights=jnp.asarray(w))
  g = y >= 0
  want = np.sum(w[y[g]] * _nll(logits[g], y[g])) / np.sum(w[y[g]])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert aux['cross_entropy'] == got
  # Weights scaled together change nothing; no graded knee gives 0.
  scaled, _ = losses.class_weighted_cross_entropy(
      logits=jnp.asarray(logits), labels=jnp.asarray(y),
      class_weights=jnp.asarray(7 * w))
  np.testing.assert_allclose(scaled, got, rtol=1e-6)
  none, _ = losses.class_weighted_cross_entropy(
      logits=jnp.asarray(logits), labels=jnp.full(6, -1),
      class_weights=jnp.asarray(w))
  assert none == 0.0


def _grades(n, seed):
  """Coherent-ish grades: OARSI grades around the KL grade."""
  rng = np.random.default_rng(seed)
  kl = rng.integers(0, 5, n)
  oarsi = np.clip(kl[:, None] - 1 + rng.integers(-1, 2, (n, 6)), 0, 3)
  return np.concatenate([kl[:, None], oarsi], axis=1)


def _method(**options):
  return methods.spec('coherence').create(TASK, **{
      'components': 3, **options})


@pytest.fixture(scope='module')
def fitted():
  grades = _grades(120, 0)
  grades[:5, 3] = -1  # a few knees lack one OARSI grade
  labels = {h: grades[:, j] for j, h in enumerate(HEADS)}
  method = _method(cls_weight=0.7, coherence_weight=2.0, warmup_epochs=1.0)
  state = method.init_state(methods.TrainingData(
      index=None, labels=labels, seed=3))
  return method, state, labels


def test_state_holds_the_fitted_mixture_and_the_weights(fitted):
  method, state, labels = fitted
  want = coherence.fit_gmm(coherence.stack_labels(labels, HEADS), CLASSES,
                           components=3, seed=3)
  for key in coherence.PARAM_KEYS:
    np.testing.assert_array_equal(state['gmm'][key], want[key])
  for h in HEADS:
    np.testing.assert_array_equal(
        state['class_weights'][h],
        method_lib.prevalence_weights(labels[h], TASK.num_classes[h]))
  assert method.streams == ('labeled', 'unlabeled')
  assert _method(coherence=False).streams == ('labeled',)


def _batch(rng, n):
  return {'image': rng.integers(0, 256, (n, 32, 32)).astype(np.uint8),
          'keypoints': rng.uniform(8, 24, (n, 16, 2)).astype(np.float32)}


def test_loss_adds_the_weighted_incoherence_after_the_warm_up(fitted):
  method, state, _ = fitted
  rng = np.random.default_rng(1)
  labeled, unlabeled = _batch(rng, 4), _batch(rng, 6)
  y = _grades(4, 2)
  y[1, 0] = -1  # an ungraded KL
  labeled['labels'] = {h: jnp.asarray(y[:, j]) for j, h in enumerate(HEADS)}
  # Logits that do not depend on the images: the loss's pieces are then
  # known in advance; the forward also records what it was given.
  logits = {n: {h: rng.normal(size=(n, c)).astype(np.float32) * 2
                for h, c in zip(HEADS, CLASSES)} for n in (4, 6)}
  seen = []

  def forward(images, key, **inputs):
    del key
    seen.append((images.shape, inputs['keypoints'].shape,
                 bool(jnp.all(jnp.isfinite(inputs['keypoints'])))))
    return {'logits': {h: jnp.asarray(v) for h, v in
                       logits[images.shape[0]].items()}}

  batch = {'labeled': labeled, 'unlabeled': unlabeled}
  key = jax.random.key(0)
  before, aux_before = method.loss(forward, batch, key, epoch=jnp.float32(0.5),
                                   state=state)
  after, aux_after = method.loss(forward, batch, key, epoch=jnp.float32(1.0),
                                 state=state)
  assert seen == [((4, 32, 32), (4, 16, 2), True),
                  ((6, 32, 32), (6, 16, 2), True)] * 2

  cls = 0.0
  for j, h in enumerate(HEADS):
    g = y[:, j] >= 0
    w = state['class_weights'][h][y[g, j]]
    cls += np.sum(w * _nll(logits[4][h][g], y[g, j])) / np.sum(w)

  def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  p = np.concatenate([np.concatenate([softmax(logits[n][h]) for h in HEADS],
                                     axis=1) for n in (4, 6)])
  g = sklearn_reference.gaussian_mixture(state['gmm']).score_samples(p)
  incoherence = np.mean(np.log1p(np.exp(-0.5 * g)) / 0.5)
  np.testing.assert_allclose(aux_before['classification'], cls, rtol=1e-5)
  np.testing.assert_allclose(aux_after['incoherence'], incoherence, rtol=1e-4)
  np.testing.assert_allclose(aux_after['log_density'], g.mean(), rtol=1e-4)
  assert aux_before['coherence_on'] == 0 and aux_after['coherence_on'] == 1
  np.testing.assert_allclose(before, 0.7 * cls, rtol=1e-5)
  np.testing.assert_allclose(after, 0.7 * cls + 2.0 * incoherence, rtol=1e-4)


def test_the_ablation_has_no_incoherence_term(fitted):
  _, state, _ = fitted
  method = _method(coherence=False)
  rng = np.random.default_rng(4)
  labeled = _batch(rng, 2)
  labeled['labels'] = {h: jnp.zeros(2, jnp.int32) for h in HEADS}
  out = {h: jnp.zeros((2, c)) for h, c in zip(HEADS, CLASSES)}
  loss, aux = method.loss(lambda x, k, **i: {'logits': out},
                          {'labeled': labeled}, jax.random.key(0),
                          epoch=jnp.float32(5.0), state=state)
  assert 'incoherence' not in aux
  # Uniform predictions: each head's CE is log(classes), whatever the
  # weights; the heads add up.
  np.testing.assert_allclose(loss, np.log(5) + 6 * np.log(4), rtol=1e-5)


def test_report_measures_equal_scikit_learn(fitted):
  method, state, _ = fitted
  rng = np.random.default_rng(5)
  probs = {h: rng.dirichlet(np.ones(c), 30) for h, c in zip(HEADS, CLASSES)}
  truth = _grades(30, 6)
  truth[0, 2] = -1
  labels = {h: truth[:, j] for j, h in enumerate(HEADS)}
  got = method.report_sections(state, probs, labels)['coherence']
  gm = sklearn_reference.gaussian_mixture(state['gmm'])
  p = np.concatenate([probs[h] for h in HEADS], axis=1)
  pred = np.stack([probs[h].argmax(1) for h in HEADS], axis=1)
  onehot = coherence.one_hot_grades(pred, CLASSES)
  np.testing.assert_allclose(got['predicted']['mean_log_density'],
                             gm.score_samples(p).mean(), rtol=1e-4)
  np.testing.assert_allclose(got['predicted']['mean_log_density_onehot'],
                             gm.score_samples(onehot).mean(), rtol=1e-4)
  rule = (pred[:, 0] >= 2) & (pred[:, 1:] == 0).all(1)
  assert got['predicted']['incoherent']['kl_without_findings'] == rule.mean()
  assert got['true']['n_knees'] == 29
  kl_only = np.array([[2, 0, 0, 0, 0, 0, 0], [0, 0, 2, 0, 0, 0, 0],
                      [3, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
  masks = grade_coherence.incoherent(kl_only, HEADS)
  np.testing.assert_array_equal(masks['kl_without_findings'],
                                [True, False, False, False])
  np.testing.assert_array_equal(masks['findings_without_kl'],
                                [False, True, False, False])
  np.testing.assert_array_equal(masks['any'], [True, True, False, False])


def test_the_method_refuses_a_view_without_keypoints_and_a_kl_task():
  with pytest.raises(cli.BadInput, match="view='keypoints'"):
    methods.spec('coherence').create(tasks.get('kl_oarsi'))
  with pytest.raises(cli.BadInput, match="task 'kl_oarsi'"):
    methods.spec('coherence').create(tasks.get('kl', view='keypoints'))


def _tiny_cache(tmp_path, keypoints, **meta):
  with cache_lib.CacheWriter(tmp_path / 'cache', roi_mm=140, roi_px=32,
                             extra_meta=meta) as writer:
    for i, k in enumerate(keypoints):
      writer.add(cache_lib.Knee(
          subject_id=str(i), visit=0, side='R', site='A',
          image=np.zeros((32, 32), np.uint8), keypoints=k,
          grades=np.zeros(7, np.int8)))
  return cache_lib.open_cache(tmp_path / 'cache')


def test_knees_without_landmarks_are_found_and_a_cache_of_none_refused(
    tmp_path):
  known = np.full((16, 2), 10.0, np.float32)
  partly = known.copy()
  partly[3] = np.nan
  cache = _tiny_cache(tmp_path / 'a', [known, partly, known])
  np.testing.assert_array_equal(pipeline.usable_knees(cache, 'keypoints'),
                                [True, False, True])
  assert pipeline.usable_knees(cache, 'whole') is None
  png = _tiny_cache(tmp_path / 'b', [known], source='png_folders')
  with pytest.raises(cli.BadInput,
                     match="'keypoints' view needs the knees' landmarks"):
    pipeline.usable_knees(png, 'keypoints')
