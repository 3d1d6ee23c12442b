"""Active learning with MC-dropout acquisition and consistency regularisation.

  python -m koajax.main --config=configs/active_learning.py:quick --workdir=/tmp/koajax-al
  python -m koajax.main --config=configs/active_learning.py:quick --workdir=/tmp/koajax-al-ent \
      --config.active.acquisition=entropy --config.active.consistency=false

Active learning on the Semixup network (`koajax.active.loop`). Each round
trains a fresh network with cross-entropy on the labeled knees D_L (plus,
with `active.consistency`, ||f(Tx) - f(T'x)||^2 with dropout on over D_L and
U, the |D_L| least uncertain pool knees), tests it on the held-out site,
scores the pool and labels the `n_batch` most uncertain. Acquisitions are
random, entropy, least_confidence, entropy_mcd and bald.

Presets:
  default  the paper: n_init 50, 50 per round up to 800, T = 50 MC-dropout
           passes, Adam 1e-3 (betas 0.9, 0.99), batch 32, 500 epochs per
           round with the rate /10 at epochs 300 and 400. Needs an
           OAI-sized pool: set data.source=manifest or cache.
  quick    about 10 minutes on the default synthetic data on a 2-core CPU:
           a pool of 400 knees, 3 rounds of 40 up to 120, 8 epochs each
           going on from the previous round, width 8, batch norm, T = 10.
  smoke    two tiny rounds, for tests.
"""

import ml_collections

from koajax import config_lib
from koajax.data import split_recipes


def get_config(arg=None):
  preset = config_lib.parse_preset(arg, ('default', 'quick', 'smoke'))
  semixup = config_lib.load_sibling('semixup', __file__)
  config = semixup.family_config('supervised', preset)
  config.job = 'active_learning'
  # The loop sets each round's method from active.consistency.
  del config['method']
  del config['method_kwargs']
  # Test: the held-out site ('' tests on val); 1/val_folds of the other
  # sites' subjects validate (model selection by balanced accuracy); the
  # rest are the candidates.
  config.split = split_recipes.split_config(
      'active_learning', test_site='E', val_folds=5, seed=0)
  config.active = ml_collections.ConfigDict({
      'acquisition': 'bald',  # one of koajax.active.loop.ACQUISITIONS
      'consistency': True,
      'consistency_weight': 1.0,
      # False: a fresh network each round. True: go on from the previous
      # round's last weights (fewer epochs needed per round).
      'warm_start': False,
      # Candidates drawn at random as the pool (0: every training-site knee
      # not validating; the paper's pool held 8,050 knees).
      'pool_size': 0,
      'n_init': 50,
      'n_batch': 50,
      'budget': 800,
      'mc_samples': 50,  # T for entropy_mcd and bald
      'samples_per_pass': ml_collections.config_dict.placeholder(int),
      'chunk_size': 64,  # pool knees per MC-dropout call
  })
  config.model.pooling = 'sam_hv'
  config.optimizer.update({'learning_rate': 1e-3, 'b2': 0.99,
                           'boundary_epochs': {'300': 0.1, '400': 0.1}})
  config.batch_size = 32
  config.num_epochs = 500
  if preset == 'quick':
    # The network of the first quick preset, whose rounds were measured
    # (README): width 8 on the 128 px patches, a constant rate.
    config.model.width = 8
    config.view_size = 0
    config.optimizer.update({'learning_rate': 1e-3, 'warmup_epochs': 0.0,
                             'cosine_epochs': 0.0})
    config.log_every_steps = 10
    config.split.val_folds = 8
    # Each round goes on from the last: 8 epochs of a fresh network on 40
    # to 120 knees stay at chance.
    config.active.update({'pool_size': 400, 'n_init': 40, 'n_batch': 40,
                          'budget': 120, 'mc_samples': 10,
                          'warm_start': True})
    config.batch_size = 16
    config.unlabeled_batch_size = 8  # U knees per step, with consistency
    config.num_epochs = 8
    config.eval_every_epochs = 2
    config.optimizer.boundary_epochs = {}
  elif preset == 'smoke':
    config.split.test_site = ''
    config.split.val_folds = 4
    config.active.update({'n_init': 8, 'n_batch': 8, 'budget': 16,
                          'mc_samples': 3, 'chunk_size': 16})
    config.batch_size = 8
    config.num_epochs = 2
    config.optimizer.boundary_epochs = {}
  return config
