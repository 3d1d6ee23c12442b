"""A classification head's metrics computed directly with scikit-learn: the
independent reference the metric and report tests compare koajax against."""

import numpy as np
from sklearn import metrics as sk_metrics
from sklearn import mixture


def sklearn_head(y, probs, positive_from=None):
  """A head's scalar metrics on its graded knees, straight from sklearn."""
  num_classes = probs.shape[1]
  probs = probs.astype(np.float64)
  pred = probs.argmax(axis=1)
  labels = list(range(num_classes))
  out = {
      'balanced_accuracy': sk_metrics.balanced_accuracy_score(y, pred),
      'kappa': sk_metrics.cohen_kappa_score(y, pred, labels=labels,
                                            weights='quadratic'),
      'mse': sk_metrics.mean_squared_error(y, pred),
      'rmse': sk_metrics.root_mean_squared_error(y, pred),
      'accuracy': sk_metrics.accuracy_score(y, pred),
      'f1_weighted': sk_metrics.f1_score(y, pred, average='weighted'),
      'log_loss': sk_metrics.log_loss(y, probs, labels=labels),
  }
  if num_classes == 2:
    out['f1'] = sk_metrics.f1_score(y, pred, pos_label=1)
  recall = sk_metrics.recall_score(y, pred, labels=labels, average=None,
                                   zero_division=np.nan)
  out.update({f'recall_{k}': r for k, r in enumerate(recall)})
  if positive_from is not None:
    positive = y >= positive_from
    score = probs[:, positive_from:].sum(axis=1)
    out['roc_auc'] = sk_metrics.roc_auc_score(positive, score)
    out['average_precision'] = sk_metrics.average_precision_score(positive,
                                                                  score)
  return out


def gaussian_mixture(params):
  """A scikit-learn GaussianMixture holding the parameters of
  `koajax.coherence.fit_gmm` (in float64), to score with `score_samples`."""
  gm = mixture.GaussianMixture(len(params['weights']), covariance_type='full')
  gm.weights_ = np.asarray(params['weights'], np.float64)
  gm.means_ = np.asarray(params['means'], np.float64)
  gm.precisions_cholesky_ = np.asarray(params['precisions_cholesky'],
                                       np.float64)
  gm.n_features_in_ = gm.means_.shape[1]
  return gm
