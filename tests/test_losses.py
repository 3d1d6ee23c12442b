"""Losses checked against NumPy written out here and hand-worked values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from koajax import losses

C = 5  # KL grades


# ------------------------------------------------------- NumPy references


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_nll(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y]


def np_sq_l2(p, q):
  """sum over batch and classes of squared differences / (Nb * Nc)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return ((p - q) ** 2).sum() / (p.shape[0] * p.shape[1])


def np_onehot(y, n=C):
  return np.eye(n)[y]


def np_semixup(*, zl, y, y_partner, lam_l, z1, z2, zm, zp, lam,
               w=(2.0, 2.0, 4.0), interpolate='probs', labeled_mixup=True):
  if labeled_mixup:
    sup = (lam_l * np_nll(zl, y) + (1 - lam_l) * np_nll(zl, y_partner)).mean()
  else:
    sup = np_nll(zl, y).mean()
  p1, p2, pm = np_softmax(z1), np_softmax(z2), np_softmax(zm)
  if interpolate == 'probs':
    target = lam * p1 + (1 - lam) * np_softmax(zp)
  else:
    target = np_softmax(lam * np.asarray(z1) + (1 - lam) * np.asarray(zp))
  terms = {'in_manifold': np_sq_l2(p1, p2),
           'out_of_manifold': np_sq_l2(pm, p1) + np_sq_l2(pm, p2),
           'interpolation': np_sq_l2(pm, target)}
  unlabeled = (w[0] * terms['in_manifold'] + w[1] * terms['out_of_manifold']
               + w[2] * terms['interpolation'])
  return sup + unlabeled, sup, terms


# ----------------------------------------------------------------- inputs


def _logits(seed, b=6, scale=2.0):
  return np.random.default_rng(seed).normal(scale=scale, size=(b, C)).astype(
      np.float32)


def _labels(seed, b=6):
  return np.random.default_rng(seed).integers(0, C, size=b).astype(np.int32)


def _semixup_inputs(b=6):
  return dict(logits_labeled=_logits(0, b), labels=_labels(1, b),
              labels_partner=_labels(2, b), lam_labeled=np.float32(0.8),
              logits_aug1=_logits(3, b), logits_aug2=_logits(4, b),
              logits_mixed=_logits(5, b), logits_partner=_logits(6, b),
              lam=np.float32(0.65))


def _np_kwargs(kw):
  return dict(zl=kw['logits_labeled'], y=kw['labels'],
              y_partner=kw['labels_partner'], lam_l=kw['lam_labeled'],
              z1=kw['logits_aug1'], z2=kw['logits_aug2'],
              zm=kw['logits_mixed'], zp=kw['logits_partner'], lam=kw['lam'])


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                             atol=atol)


# ----------------------------------------------------------------- helpers


def _folded_beta_cdf(x, a, floor=0.0):
  # P(max(L, 1 - L) <= x) = F(x) - F(1 - x) for x >= 0.5.
  x = np.asarray(x)
  cdf = stats.beta.cdf(x, a, a) - stats.beta.cdf(1 - x, a, a)
  return np.where(x < floor, 0.0, cdf)


# One compilation serves every sampling test: alpha and floor are traced.
_sample_lambda = jax.jit(losses.sample_mix_lambda, static_argnames='shape')


@pytest.mark.parametrize('alpha', [0.75, 0.2])
def test_mix_lambda_is_folded_beta(alpha):
  # floor 0 is a no-op (folded values are >= 0.5).
  lam = np.asarray(_sample_lambda(jax.random.key(0), alpha=jnp.float32(alpha),
                                  floor=jnp.float32(0.0), shape=(20_000,)))
  assert lam.dtype == np.float32
  assert lam.min() >= 0.5 and lam.max() <= 1.0
  folded_mean = stats.beta(alpha, alpha).expect(lambda x: max(x, 1 - x))
  assert 0.5 < folded_mean < 1.0
  # Standard error of the mean is ~0.001 here.
  assert abs(lam.mean() - folded_mean) < 0.006
  # The whole distribution, not only its mean: a chi-square test on bins
  # (not KS, since float32 rounds the mass within 1e-7 of 1 to exactly 1).
  edges = np.linspace(0.5, 1.0, 11)
  observed, _ = np.histogram(lam, edges)
  expected = len(lam) * np.diff(_folded_beta_cdf(edges, alpha))
  assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_mix_lambda_floor():
  lam = np.asarray(_sample_lambda(jax.random.key(1), alpha=jnp.float32(0.75),
                                  floor=jnp.float32(0.7), shape=(20_000,)))
  assert lam.min() == pytest.approx(0.7)
  # Everything that folded below the floor sits exactly on it.
  expected = _folded_beta_cdf(0.7, 0.75)
  assert np.mean(lam == np.float32(0.7)) == pytest.approx(expected, abs=0.015)


def test_mix_lambda_default_is_one_per_batch():
  out = jax.eval_shape(losses.sample_mix_lambda, jax.random.key(2))
  assert out.shape == () and out.dtype == jnp.float32


def test_mixing_permutation():
  perm = np.asarray(losses.mixing_permutation(jax.random.key(0), 32))
  np.testing.assert_array_equal(np.sort(perm), np.arange(32))
  assert not np.array_equal(perm, np.arange(32))
  other = np.asarray(losses.mixing_permutation(jax.random.key(1), 32))
  assert not np.array_equal(perm, other)


def test_mix_scalar_and_per_sample():
  x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  y = -x
  _close(losses.mix(x, y, 0.75), 0.75 * x - 0.25 * x)
  lam = np.array([1.0, 0.5], np.float32)
  out = np.asarray(losses.mix(x, y, lam))
  np.testing.assert_array_equal(out[0], x[0])  # lam 1 keeps x
  np.testing.assert_array_equal(out[1], np.zeros_like(x[1]))  # (x - x) / 2


def test_sigmoid_rampup_values():
  # exp(-5), exp(-5 / 4), 1: worked out by hand.
  _close(losses.sigmoid_rampup(0, 80), 0.006737947, rtol=1e-6)
  _close(losses.sigmoid_rampup(40, 80), 0.2865048, rtol=1e-6)
  _close(losses.sigmoid_rampup(80, 80), 1.0)
  _close(losses.sigmoid_rampup(500, 80), 1.0)
  _close(losses.sigmoid_rampup(-3, 80), 0.006737947, rtol=1e-6)
  _close(losses.sigmoid_rampup(7, 0), 1.0)
  ramp = jax.jit(losses.sigmoid_rampup, static_argnums=1)
  values = np.array([ramp(e, 80) for e in range(0, 81, 10)])
  assert np.all(np.diff(values) > 0)


def test_sharpen_hand_values():
  # [0.6, 0.4] at T = 0.5: [0.36, 0.16] / 0.52.
  _close(losses.sharpen(jnp.array([[0.6, 0.4]]), 0.5),
         [[0.36 / 0.52, 0.16 / 0.52]])
  p = np_softmax(_logits(0))
  _close(losses.sharpen(p, 1.0), p)
  sharp = np.asarray(losses.sharpen(p, 0.5))
  _close(sharp.sum(-1), np.ones(len(p)))
  np.testing.assert_array_equal(sharp.argmax(-1), p.argmax(-1))
  assert np.all(sharp.max(-1) > p.max(-1))


def test_mixmatch_guess():
  views = np.array([[[0.6, 0.4], [0.1, 0.9]],
                    [[0.2, 0.8], [0.3, 0.7]]], np.float32)  # (K=2, B=2, C=2)
  # mean [0.4, 0.6] -> [0.16, 0.36] / 0.52; mean [0.2, 0.8] -> [0.04, 0.64].
  _close(losses.mixmatch_guess(views),
         [[0.16 / 0.52, 0.36 / 0.52], [0.04 / 0.68, 0.64 / 0.68]])
  grad = jax.grad(lambda v: losses.mixmatch_guess(v)[0, 0])(jnp.asarray(views))
  np.testing.assert_array_equal(grad, 0.0)


# ------------------------------------------------------------- supervised


def test_cross_entropy_hand_values():
  loss, aux = losses.cross_entropy(logits=jnp.zeros((1, 2)),
                                   labels=jnp.array([0]))
  _close(loss, np.log(2.0))
  assert set(aux) == {'cross_entropy'}
  # [1, 2, 3], label 2: log(1 + e^-1 + e^-2).
  loss, _ = losses.cross_entropy(logits=jnp.array([[1.0, 2.0, 3.0]]),
                                 labels=jnp.array([2]))
  _close(loss, np.log(1 + np.exp(-1) + np.exp(-2)))


def test_cross_entropy_matches_numpy():
  z, y = _logits(0), _labels(1)
  loss, _ = losses.cross_entropy(logits=z, labels=y)
  _close(loss, np_nll(z, y).mean())


def test_cross_entropy_mask_ignores_padding():
  z, y = _logits(0), _labels(1)
  padded_z = np.concatenate([z, np.full((2, C), 1e4, np.float32)])
  padded_y = np.concatenate([y, [0, 0]]).astype(np.int32)
  mask = np.array([1] * len(z) + [0, 0], np.float32)
  loss, _ = losses.cross_entropy(logits=padded_z, labels=padded_y, mask=mask)
  _close(loss, np_nll(z, y).mean())


def test_soft_cross_entropy():
  z = _logits(0)
  t = np_softmax(_logits(1))
  loss, _ = losses.soft_cross_entropy(logits=z, targets=t)
  _close(loss, -(t * np_log_softmax(z)).sum(-1).mean())
  y = _labels(2)
  one_hot, _ = losses.soft_cross_entropy(logits=z, targets=np_onehot(y))
  _close(one_hot, np_nll(z, y).mean())


def test_mixup():
  z, ya, yb = _logits(0), _labels(1), _labels(2)
  loss, aux = losses.mixup(logits_mixed=z, labels_a=ya, labels_b=yb, lam=0.7)
  _close(loss, 0.7 * np_nll(z, ya).mean() + 0.3 * np_nll(z, yb).mean())
  _close(aux['cross_entropy_a'], np_nll(z, ya).mean())
  _close(aux['cross_entropy_b'], np_nll(z, yb).mean())
  # The same as soft CE against mixed one-hot targets.
  soft = 0.7 * np_onehot(ya) + 0.3 * np_onehot(yb)
  _close(loss, -(soft * np_log_softmax(z)).sum(-1).mean())
  # Per-sample coefficients.
  lam = np.linspace(0.5, 1.0, len(z)).astype(np.float32)
  loss, _ = losses.mixup(logits_mixed=z, labels_a=ya, labels_b=yb, lam=lam)
  _close(loss, (lam * np_nll(z, ya) + (1 - lam) * np_nll(z, yb)).mean())


# -------------------------------------------------------- semi-supervised


def test_squared_l2_hand_values():
  # One example, two classes: (1 + 1) / (1 * 2).
  _close(losses.squared_l2(probs=jnp.array([[1.0, 0.0]]),
                           targets=jnp.array([[0.0, 1.0]])), 1.0)
  # Two examples: (0.0625 * 2 + 0) / (2 * 2).
  _close(losses.squared_l2(probs=jnp.array([[0.5, 0.5], [1.0, 0.0]]),
                           targets=jnp.array([[0.25, 0.75], [1.0, 0.0]])),
         0.03125)


def test_pi_model():
  zl, y = _logits(0), _labels(1)
  p1, p2 = np_softmax(_logits(2)), np_softmax(_logits(3))
  loss, aux = losses.pi_model(logits_labeled=zl, labels=y, probs_view1=p1,
                              probs_view2=p2, weight=3.0)
  _close(aux['supervised'], np_nll(zl, y).mean())
  _close(aux['consistency'], np_sq_l2(p1, p2))
  _close(loss, np_nll(zl, y).mean() + 3.0 * np_sq_l2(p1, p2))
  # Both views receive gradients (no target side).
  g1, g2 = jax.grad(
      lambda a, b: losses.pi_model(logits_labeled=zl, labels=y, probs_view1=a,
                                   probs_view2=b)[0], argnums=(0, 1))(p1, p2)
  _close(g1, -np.asarray(g2))
  assert np.abs(np.asarray(g2)).max() > 0


def test_ict():
  zl, y = _logits(0), _labels(1)
  pm = np_softmax(_logits(2))
  pt = 0.7 * np_softmax(_logits(3)) + 0.3 * np_softmax(_logits(4))
  loss, aux = losses.ict(logits_labeled=zl, labels=y, probs_mixed=pm,
                         probs_target_mixed=pt, weight=50.0)
  _close(aux['supervised'], np_nll(zl, y).mean())
  _close(aux['consistency'], np_sq_l2(pm, pt))
  _close(loss, np_nll(zl, y).mean() + 50.0 * np_sq_l2(pm, pt))
  gm, gt = jax.grad(
      lambda a, b: losses.ict(logits_labeled=zl, labels=y, probs_mixed=a,
                              probs_target_mixed=b, weight=50.0)[0],
      argnums=(0, 1))(pm, pt)
  np.testing.assert_array_equal(gt, 0.0)  # the target is a constant
  _close(gm, 50.0 * 2 * (pm - pt) / pm.size, rtol=1e-4)


def test_mixmatch():
  zx = _logits(0)
  tx = 0.75 * np_onehot(_labels(1)) + 0.25 * np_softmax(_logits(2))
  pu = np_softmax(_logits(3))
  tu = np_softmax(_logits(4))
  loss, aux = losses.mixmatch(logits_labeled_mixed=zx,
                              targets_labeled_mixed=tx,
                              probs_unlabeled_mixed=pu,
                              targets_unlabeled_mixed=tu)
  loss_x = -(tx * np_log_softmax(zx)).sum(-1).mean()
  loss_u = ((pu - tu) ** 2).sum() / (pu.shape[0] * C)  # 1 / (L |U'|)
  _close(aux['loss_x'], loss_x)
  _close(aux['loss_u'], loss_u)
  _close(loss, loss_x + 10.0 * loss_u)
  grads = jax.grad(
      lambda a, b: losses.mixmatch(logits_labeled_mixed=zx,
                                   targets_labeled_mixed=a,
                                   probs_unlabeled_mixed=pu,
                                   targets_unlabeled_mixed=b)[0],
      argnums=(0, 1))(tx, tu)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------- Semixup


def test_semixup_hand_values():
  # One unlabeled knee, two classes, logits = log p so softmax gives p back.
  p1, p2, pm, pp = [0.5, 0.5], [0.25, 0.75], [0.75, 0.25], [0.9, 0.1]

  def logit(p):
    return jnp.log(jnp.array([p]))

  loss, aux = losses.semixup(
      logits_labeled=jnp.zeros((1, 2)), labels=jnp.array([0]),
      labels_partner=jnp.array([1]), lam_labeled=0.7,
      logits_aug1=logit(p1), logits_aug2=logit(p2), logits_mixed=logit(pm),
      logits_partner=logit(pp), lam=0.75)
  # target 0.75 [0.5, 0.5] + 0.25 [0.9, 0.1] = [0.6, 0.4]; each squared norm
  # is divided by Nb * Nc = 2.
  _close(aux['in_manifold'], 0.125 / 2)
  _close(aux['out_of_manifold'], (0.125 + 0.5) / 2)
  _close(aux['interpolation'], 0.045 / 2)
  _close(aux['unlabeled'], 2 * 0.0625 + 2 * 0.3125 + 4 * 0.0225)  # 0.84
  _close(aux['supervised'], np.log(2.0))
  _close(loss, 0.84 + np.log(2.0))


@pytest.mark.parametrize('interpolate', ['probs', 'logits'])
def test_semixup_matches_numpy(interpolate):
  kw = _semixup_inputs()
  loss, aux = losses.semixup(**kw, interpolate=interpolate)
  expected, sup, terms = np_semixup(**_np_kwargs(kw), interpolate=interpolate)
  _close(loss, expected)
  _close(aux['supervised'], sup)
  for name, value in terms.items():
    _close(aux[name], value)


def test_semixup_interpolation_modes_differ():
  kw = _semixup_inputs()
  _, by_probs = losses.semixup(**kw, interpolate='probs')
  _, by_logits = losses.semixup(**kw, interpolate='logits')
  assert abs(float(by_probs['interpolation'])
             - float(by_logits['interpolation'])) > 1e-4
  with pytest.raises(ValueError, match='interpolate'):
    losses.semixup(**kw, interpolate='features')


def test_semixup_per_sample_lambda():
  kw = _semixup_inputs()
  kw['lam'] = np.linspace(0.5, 0.95, 6).astype(np.float32)
  kw['lam_labeled'] = np.linspace(0.7, 1.0, 6).astype(np.float32)
  loss, _ = losses.semixup(**kw)
  lam, lam_l = kw['lam'][:, None], kw['lam_labeled']
  expected, _, _ = np_semixup(**{**_np_kwargs(kw), 'lam': lam, 'lam_l': lam_l})
  _close(loss, expected)


@pytest.mark.parametrize('term', ['in_manifold', 'out_of_manifold',
                                  'interpolation'])
def test_semixup_ablation_removes_exactly_its_term(term):
  kw = _semixup_inputs()
  full_terms = losses.SemixupTerms()
  full, aux = losses.semixup(**kw, terms=full_terms)
  ablated, ablated_aux = losses.semixup(**kw, terms=full_terms.without(term))
  _close(full - ablated, getattr(full_terms, term) * aux[term])
  # The dropped term is still reported, everything else is unchanged.
  for name in ('supervised', 'in_manifold', 'out_of_manifold',
               'interpolation'):
    _close(ablated_aux[name], aux[name])
  weights = {'in_manifold': (0.0, 2.0, 4.0), 'out_of_manifold': (2.0, 0.0, 4.0),
             'interpolation': (2.0, 2.0, 0.0)}[term]
  expected, _, _ = np_semixup(**_np_kwargs(kw), w=weights)
  _close(ablated, expected)


def test_semixup_ablation_of_labeled_mixup():
  kw = _semixup_inputs()
  terms = losses.SemixupTerms().without('mixup_labeled')
  assert terms.mixup_labeled is False
  loss, aux = losses.semixup(**{**kw, 'labels_partner': None,
                                'lam_labeled': None}, terms=terms)
  expected, sup, _ = np_semixup(**_np_kwargs(kw), labeled_mixup=False)
  _close(aux['supervised'], sup)
  _close(loss, expected)
  with pytest.raises(ValueError, match='labels_partner'):
    losses.semixup(**{**kw, 'lam_labeled': None})
  with pytest.raises(ValueError, match='unknown'):
    losses.SemixupTerms().without('entropy')


def test_semixup_stop_gradient_only_on_the_interpolation_target():
  kw = _semixup_inputs()

  def grad_fn(stop_gradient, interpolate):
    def f(z_partner, z_aug1):
      return losses.semixup(**{**kw, 'logits_partner': z_partner,
                               'logits_aug1': z_aug1},
                            stop_gradient=stop_gradient,
                            interpolate=interpolate)[0]
    return jax.grad(f, argnums=(0, 1))

  @jax.jit
  def all_grads(z_partner, z_aug1):
    return [grad_fn(*mode)(z_partner, z_aug1)
            for mode in ((True, 'probs'), (False, 'probs'),
                         (False, 'logits'))]

  (g_partner, g_aug1), (g_partner_free, g_aug1_free), (g_partner_ref, _) = (
      all_grads(kw['logits_partner'], kw['logits_aug1']))
  # f(x_j) appears only in the target.
  np.testing.assert_array_equal(g_partner, 0.0)
  assert np.abs(np.asarray(g_partner_free)).max() > 1e-4
  assert np.abs(np.asarray(g_partner_ref)).max() > 1e-4
  # f(Tx) still learns from the in-/out-of-manifold terms; the target's share
  # of its gradient goes with the stop-gradient.
  assert np.abs(np.asarray(g_aug1)).max() > 1e-4
  assert np.abs(np.asarray(g_aug1_free - g_aug1)).max() > 1e-6


def test_semixup_unlabeled_mask():
  kw = _semixup_inputs()
  padded = dict(kw)
  for name in ('logits_aug1', 'logits_aug2', 'logits_mixed',
               'logits_partner'):
    padded[name] = np.concatenate([kw[name], 50 * _logits(9, 2)])
  mask = np.array([1] * 6 + [0, 0], np.float32)
  loss, _ = losses.semixup(**padded, mask_unlabeled=mask)
  expected, _, _ = np_semixup(**_np_kwargs(kw))
  _close(loss, expected)


# ------------------------------------------------------- jit and gradients


def _all_losses():
  zl, y, y2 = _logits(0), _labels(1), _labels(2)
  p1, p2 = np_softmax(_logits(3)), np_softmax(_logits(4))
  return {
      'cross_entropy': (losses.cross_entropy, dict(logits=zl, labels=y)),
      'soft_cross_entropy': (losses.soft_cross_entropy,
                             dict(logits=zl, targets=p1)),
      'mixup': (losses.mixup, dict(logits_mixed=zl, labels_a=y, labels_b=y2,
                                   lam=np.float32(0.6))),
      'pi_model': (losses.pi_model, dict(logits_labeled=zl, labels=y,
                                         probs_view1=p1, probs_view2=p2)),
      'ict': (losses.ict, dict(logits_labeled=zl, labels=y, probs_mixed=p1,
                               probs_target_mixed=p2, weight=np.float32(30))),
      'mixmatch': (losses.mixmatch, dict(logits_labeled_mixed=zl,
                                         targets_labeled_mixed=p2,
                                         probs_unlabeled_mixed=p1,
                                         targets_unlabeled_mixed=p2)),
      'semixup': (losses.semixup, _semixup_inputs()),
      'semixup_reference': (functools.partial(losses.semixup,
                                              interpolate='logits',
                                              stop_gradient=False),
                            _semixup_inputs()),
  }


@pytest.mark.parametrize('name', list(_all_losses()))
def test_jit_matches_eager(name):
  fn, kw = _all_losses()[name]
  eager_loss, eager_aux = fn(**kw)
  traces = []

  def step(kw):
    traces.append(None)
    return fn(**kw)

  jitted = jax.jit(step)
  for _ in range(2):
    loss, aux = jitted(kw)
  assert len(traces) == 1  # the second call reused the trace
  assert loss.shape == ()
  _close(loss, eager_loss, rtol=1e-6)
  assert set(aux) == set(eager_aux)
  for key in aux:
    assert aux[key].shape == ()
    _close(aux[key], eager_aux[key], rtol=1e-6)


@pytest.mark.parametrize('name', list(_all_losses()))
def test_gradients_finite(name):
  fn, kw = _all_losses()[name]
  # Differentiate with respect to every floating-point input.
  floats = {k: jnp.asarray(v) for k, v in kw.items()
            if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)}
  others = {k: v for k, v in kw.items() if k not in floats}

  def loss_fn(f, scale):
    # Scaled-up logits saturate the softmax.
    f = {k: v * scale if 'logits' in k else v for k, v in f.items()}
    return fn(**f, **others)[0]

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  for scale in (1.0, 1e4):
    loss, grads = value_and_grad(floats, jnp.float32(scale))
    assert np.isfinite(float(loss))
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.abs(g).max() > 0 for g in leaves)
