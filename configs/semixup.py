"""Semixup: in-/out-of-manifold and interpolation consistency (paper Algorithm 1).

  python -m koajax.main --config=configs/semixup.py:quick --workdir=/tmp/koajax-semixup

Semixup and its baselines (supervised, mixup, pi_model, ict, mixmatch: each
config file of that name) share these presets; change single fields with
`--config.split.labels_per_grade=50` and the like.

Presets:
  default  the paper: Adam 1e-4, batch 40, 500 epochs (an epoch is a pass
           over the labeled knees), SAM-HV pooling, 100 labels per KL grade
           with 2x as many unlabeled knees. Needs a dataset the size of OAI:
           set data.source=manifest or cache.
  quick    about 10 minutes on the default synthetic data on a 2-core CPU:
           30 labels per grade, width 8, batch norm, 14 epochs.
  smoke    a few steps of a tiny network, for tests.
"""

from koajax import config_lib
from koajax.data import split_recipes


def family_config(method, arg=None):
  """The presets of `method`, one of Semixup and its baselines."""
  preset = config_lib.parse_preset(arg, ('default', 'quick', 'smoke'))
  config = config_lib.set_method(config_lib.base_config(), method)
  config.task = 'kl'
  config.split = split_recipes.split_config(
      'semixup', labels_per_grade=100,
      unlabeled_factor=2,  # unlabeled = factor x labeled knees
      labeled_fraction=0.25,  # labeled/unlabeled pools split by subject
      num_folds=5, fold=0,
      test_site='E')  # held out as the test set; '' to test on val
  config.model = config_lib.ml_collections.ConfigDict({
      'name': 'semixup_net', 'pooling': 'sam_hv', 'width': 32,
      'dropout': 0.35, 'norm': 'instance',
      'dtype': 'float32'})  # 'bfloat16': bf16 compute on accelerators
  config.optimizer.learning_rate = 1e-4
  config.batch_size = 40
  config.num_epochs = 500
  config.eval_every_epochs = 10
  config.selection = ('balanced_accuracy', 'kappa')
  if preset == 'quick':
    # About 11 minutes on a 2-core CPU: a narrow network, fewer labels and a
    # higher learning rate. The paper's instance norm without affine
    # parameters stays at chance for ~130 steps, so this preset uses batch
    # norm; the loss and augmentation are the paper's.
    config.split.labels_per_grade = 30
    config.split.unlabeled_factor = 1
    config.split.labeled_fraction = 0.5  # enough KL 4 knees for 30
    config.model.width = 8
    config.model.norm = 'batch'
    config.batch_size = 16
    config.unlabeled_batch_size = 8
    config.num_epochs = 14
    config.eval_every_epochs = 2
    config.optimizer.learning_rate = 1e-3
    config.log_every_steps = 10
  elif preset == 'smoke':
    config.data = config_lib.data_config(num_subjects=40, roi_px=160)
    config.split.labels_per_grade = 2
    config.split.unlabeled_factor = 1
    config.split.labeled_fraction = 0.5
    config.split.num_folds = 2
    config.split.test_site = ''
    config.model.width = 2
    config.batch_size = 8
    config.num_epochs = 2
    config.eval_every_epochs = 1
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.bootstrap_resamples = 20
    config.progress_bar = False
  return config


def get_config(arg=None):
  return family_config('semixup', arg)
