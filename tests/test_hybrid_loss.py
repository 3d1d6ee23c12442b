"""The confidence-driven hybrid loss against NumPy written here: the
partition (ties, absent classes, tiny batches), each term, and the same
value on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koajax import hybrid_loss


def _np_groups(conf, labels, ratios=(7, 2, 1), valid=None):
  """Sort each class by confidence (stable, descending) and cut by ratios."""
  n = len(conf)
  valid = np.ones(n, bool) if valid is None else valid
  out = np.full(n, -1)
  cuts = np.cumsum(ratios) / np.sum(ratios)
  for k in np.unique(labels[valid]):
    members = np.flatnonzero((labels == k) & valid)
    # argsort of -conf, stable: equal confidences keep batch order.
    order = members[np.argsort(-conf[members], kind='stable')]
    for r, i in enumerate(order):
      q = (r + 0.5) / len(order)
      out[i] = int(np.searchsorted(cuts, q, side='right'))
  return out


def _np_loss(logits, labels, c_k, eps=0.15, weights=(0.4, 0.5, 0.1),
             ratios=(7, 2, 1), valid=None):
  z = logits.astype(np.float64)
  z = z - z.max(1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
  n, c = log_p.shape
  conf = np.exp(log_p[np.arange(n), labels])
  groups = _np_groups(conf, labels, ratios, valid)
  terms = []
  for g in range(3):
    rows = np.flatnonzero(groups == g)
    values = []
    for i in rows:
      y = labels[i]
      if g == 0:
        t = np.full(c, eps / c)
        t[y] += 1 - eps
        values.append(-(t * log_p[i]).sum())
      elif g == 1:
        t = np.full(c, (1 - c_k[y]) / (c - 1))
        t[y] = c_k[y]
        values.append(sum(q * (np.log(q) - lp) for q, lp in zip(t, log_p[i])
                          if q > 0))
      else:
        values.append(-log_p[i, y])
    terms.append(np.mean(values) if values else 0.0)
  return float(np.dot(weights, terms)), groups


@pytest.mark.parametrize('n,classes,seed', [(10, 2, 0), (32, 2, 1), (7, 3, 2),
                                            (1, 2, 3), (2, 2, 4), (3, 2, 5)])
def test_loss_and_groups_equal_numpy(n, classes, seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, classes)).astype(np.float32) * 2
  labels = rng.integers(0, classes, n)
  c_k = rng.uniform(0.55, 0.95, classes)
  loss, aux = hybrid_loss.hybrid_loss(
      logits=jnp.asarray(logits), labels=jnp.asarray(labels),
      class_confidence=jnp.asarray(c_k, jnp.float32))
  want, groups = _np_loss(logits, labels, c_k)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  for g, name in enumerate(hybrid_loss.GROUPS):
    assert float(aux[f'{name}_size']) == np.sum(groups == g)


def test_ten_samples_of_a_class_split_seven_two_one_and_ties_keep_order():
  conf = jnp.asarray([0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1])
  labels = jnp.zeros(10, jnp.int32)
  groups = np.asarray(hybrid_loss.confidence_groups(conf, labels))
  # Ties (eight at 0.5) are ranked by batch position.
  np.testing.assert_array_equal(groups, [0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(
      groups, _np_groups(np.asarray(conf), np.asarray(labels)))


def test_an_absent_class_and_masked_samples_join_no_group():
  conf = jnp.asarray([0.2, 0.4, 0.6, 0.8, 0.3])
  labels = jnp.asarray([1, 1, 1, 1, 1])  # class 0 absent
  mask = jnp.asarray([1, 1, 0, 1, 1])
  groups = np.asarray(hybrid_loss.confidence_groups(conf, labels, mask=mask))
  assert groups[2] == -1
  np.testing.assert_array_equal(
      groups, _np_groups(np.asarray(conf), np.asarray(labels),
                         valid=np.asarray(mask) > 0))
  logits = jnp.log(jnp.stack([1 - conf, conf], 1))
  loss, aux = hybrid_loss.hybrid_loss(
      logits=logits, labels=labels, class_confidence=jnp.asarray([0.8, 0.8]),
      mask=mask)
  assert np.isfinite(float(loss))
  assert sum(float(aux[f'{g}_size']) for g in hybrid_loss.GROUPS) == 4


def test_one_and_eight_devices_give_the_same_loss():
  assert jax.device_count() >= 8  # tests/conftest.py
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(32, 2)).astype(np.float32)
  labels = rng.integers(0, 2, 32).astype(np.int32)
  c_k = jnp.asarray([0.7, 0.8])
  fn = jax.jit(lambda z, y: hybrid_loss.hybrid_loss(
      logits=z, labels=y, class_confidence=c_k)[0])
  single = float(fn(jnp.asarray(logits), jnp.asarray(labels)))
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.NamedSharding(mesh, jax.P('data'))
  with jax.set_mesh(mesh):
    sharded = float(fn(jax.device_put(logits, sharding),
                       jax.device_put(labels, sharding)))
  assert sharded == pytest.approx(single, rel=1e-6)
  want, _ = _np_loss(logits, labels, np.asarray(c_k))
  assert single == pytest.approx(want, rel=1e-5)


def test_the_default_class_confidence_is_the_smoothed_true_label():
  assert hybrid_loss.default_class_confidence(2) == pytest.approx(0.925)


def test_the_method_recomputes_class_confidence_from_validation():
  import ml_collections
  from koajax import methods, tasks
  task = tasks.get('kl0_vs_kl2')
  method = methods.from_config(ml_collections.ConfigDict(
      {'method': 'confidence', 'method_kwargs': {}}), task)
  state = method.init_state(None)
  np.testing.assert_allclose(state['class_confidence'], [0.925, 0.925])
  probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
  labels = np.array([0, 0, -1, 0])  # class 1 absent, one knee ungraded
  new = method.update_state(state, methods.Validation(
      probs={'kl0_vs_kl2': probs}, labels={'kl0_vs_kl2': labels}, epoch=1.0))
  # Class 0: mean p(0) of its three knees by hand; class 1 keeps its value.
  np.testing.assert_allclose(new['class_confidence'],
                             [(0.9 + 0.6 + 0.5) / 3, 0.925], rtol=1e-6)


@pytest.mark.parametrize('loss_kind', ['ce', 'hybrid'])
def test_the_method_takes_its_loss_of_the_logits(loss_kind):
  """Plain cross-entropy (the baseline) or the hybrid loss, both of the
  model's logits on the graded knees, against NumPy."""
  import ml_collections
  from koajax import methods, tasks
  method = methods.from_config(ml_collections.ConfigDict(
      {'method': 'confidence', 'method_kwargs': {'loss_kind': loss_kind}}),
                               tasks.get('kl0_vs_kl2'))
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(12, 2)).astype(np.float32)
  labels = rng.integers(0, 2, 12)
  labels[3] = -1  # ungraded: in no term
  batch = {'labeled': {'image': np.zeros((12, 2, 16, 16), np.uint8),
                       'labels': {'kl0_vs_kl2': jnp.asarray(labels)}}}
  forward = lambda x, key: {'logits': {'kl0_vs_kl2': jnp.asarray(logits)}}
  state = {'class_confidence': np.array([0.7, 0.8], np.float32)}
  out = method.loss(forward, batch, jax.random.key(0), epoch=0.0, state=state)
  loss = out[0] if isinstance(out, tuple) else out
  valid = labels >= 0
  if loss_kind == 'ce':
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -log_p[valid, labels[valid]].mean()
  else:
    want, _ = _np_loss(logits, np.maximum(labels, 0),
                       state['class_confidence'], valid=valid)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
