"""Helpers shared by the files in configs/, and a run's saved config."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import ml_collections

# A training workdir's copy of its config: what rebuilds the run later.
CONFIG_JSON = 'config.json'


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a `python -m koajax.main` run saved in `workdir`."""
  path = Path(workdir) / CONFIG_JSON
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} not found: {workdir} is not a koajax training workdir '
        '(python -m koajax.main --config=... --workdir=... writes it)')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def parse_preset(arg: str | None, presets: tuple[str, ...]) -> str:
  """Returns the preset named by `--config=FILE:preset`, or 'default'.

  Presets are whole named settings (the paper's default, `quick`, `smoke`);
  single values are changed with `--config.a.b=value` instead.
  """
  name = (arg or 'default').strip()
  if name not in presets:
    raise ValueError(
        f'unknown preset {name!r}; this config has {", ".join(presets)}')
  return name


def data_config(*, num_subjects: int = 560, seed: int = 0,
                roi_px: int = 400) -> ml_collections.ConfigDict:
  """Where the knees come from and how they are preprocessed.

  With source='synthetic' koajax generates its default dataset and caches it
  under `root` (once; later runs reuse it). With source='manifest' it builds
  the cache from `manifest` (koajax manifest CSV) and `landmarks`. With
  source='cache' it reads a cache built earlier with koajax.data.build.
  """
  return ml_collections.ConfigDict({
      'source': 'synthetic',
      # Empty: $KOAJAX_DATA_DIR, else ~/.cache/koajax.
      'root': '',
      'synthetic': {'num_subjects': num_subjects, 'seed': seed},
      'manifest': '',
      'landmarks': '',
      'cache_dir': '',
      'roi_mm': 140.0,
      'roi_px': roi_px,
      # Processes used to generate and build; 0 means all cores.
      'workers': 0,
  })


def method_defaults(method: str) -> dict:
  """The keyword options of `koajax.methods.METHODS[method]` and their
  defaults, so that every one shows in the config and can be overridden."""
  from koajax import methods
  if method not in methods.METHODS:
    raise ValueError(f'unknown method {method!r}; choose one of '
                     f'{", ".join(methods.METHODS)}')
  options = {}
  for name, p in inspect.signature(methods.METHODS[method]).parameters.items():
    if p.kind is not p.KEYWORD_ONLY or name == 'epoch':
      continue
    value = p.default
    if dataclasses.is_dataclass(value):
      value = dataclasses.asdict(value)
    elif value is None:  # the optional lambda floors: settable floats
      value = ml_collections.config_dict.placeholder(float)
    options[name] = value
  return options


def semixup_family_config(method: str, arg: str | None,
                          method_kwargs: dict | None = None
                          ) -> ml_collections.ConfigDict:
  """Semixup and its baselines: one Siamese network, one trainer.

  Presets:
    default  the paper: Adam 1e-4, batch 40, 500 epochs (an epoch is a pass
             over the labeled knees), SAM-HV pooling, 100 labels per KL grade
             with 2x as many unlabeled knees. Needs a dataset the size of OAI:
             set data.source=manifest or cache.
    quick    about 10 minutes on the default synthetic data on a 2-core CPU:
             30 labels per grade, width 8, batch norm, 14 epochs.
    smoke    a few steps of a tiny network, for tests.
  """
  preset = parse_preset(arg, ('default', 'quick', 'smoke'))
  config = ml_collections.ConfigDict()
  config.job = 'train'
  config.method = method
  config.method_kwargs = ml_collections.ConfigDict(
      {**method_defaults(method), **(method_kwargs or {})})
  config.seed = 0
  config.data = data_config()
  config.data_workers = 0  # Grain worker processes per stream
  # CPU only: split the host into this many devices (koajax.runtime); the
  # batch is sharded over the largest count that divides it. 0: JAX default.
  config.cpu_devices = 32
  # Compiled programs kept across runs (koajax.runtime); '' for none.
  config.compilation_cache = '~/.cache/koajax/jax'
  config.split = ml_collections.ConfigDict({
      'labels_per_grade': 100,
      'unlabeled_factor': 2,  # unlabeled = factor x labeled knees
      'labeled_fraction': 0.25,  # labeled/unlabeled pools split by subject
      'num_folds': 5,
      'fold': 0,
      'test_site': 'E',  # held out as the test set; '' to test on val
      'seed': 0,
  })
  config.model = ml_collections.ConfigDict({
      'name': 'semixup_net', 'pooling': 'sam_hv', 'width': 32,
      'dropout': 0.35, 'norm': 'instance',
      'dtype': 'float32'})  # 'bfloat16': bf16 compute on accelerators
  config.optimizer = ml_collections.ConfigDict({
      'learning_rate': 1e-4, 'b1': 0.9, 'b2': 0.999, 'weight_decay': 0.0,
      # Piecewise-constant learning rate: {step: scale} and {epoch: scale}
      # (string keys), the scales multiplying.
      'boundaries': {}, 'boundary_epochs': {}})
  config.batch_size = 40
  config.unlabeled_batch_size = 0  # 0: same as batch_size
  config.num_epochs = 500
  config.eval_every_epochs = 10
  config.eval_batch_size = 64
  config.log_every_steps = 50
  config.bootstrap_resamples = 1000
  config.progress_bar = True
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
    config.data = data_config(num_subjects=40, roi_px=160)
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


ACQUISITIONS = ('random', 'entropy', 'least_confidence', 'entropy_mcd', 'bald')


def active_learning_config(arg: str | None) -> ml_collections.ConfigDict:
  """Active learning on the Semixup network (`koajax.active.loop`).

  Each round trains a fresh network with cross-entropy on the labeled knees
  D_L (plus, with `active.consistency`, ||f(Tx) - f(T'x)||^2 with dropout
  on over D_L and U, the |D_L| least uncertain pool knees), tests it on the
  held-out site, scores the pool and labels the `n_batch` most uncertain.

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
  preset = parse_preset(arg, ('default', 'quick', 'smoke'))
  config = semixup_family_config('supervised', preset)
  config.job = 'active_learning'
  # The loop sets each round's method from active.consistency.
  del config['method']
  del config['method_kwargs']
  config.split = ml_collections.ConfigDict({
      'test_site': 'E',  # held out as the test set ('' tests on val)
      # 1/val_folds of the other sites' subjects validate (model selection
      # by balanced accuracy); the rest is the pool.
      'val_folds': 5,
      'seed': 0,
  })
  config.active = ml_collections.ConfigDict({
      'acquisition': 'bald',  # one of ACQUISITIONS
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
