"""What the files in configs/ share, and a run's saved config.

Each paper's presets live in its own `configs/<paper>.py`; this module holds
only the fields and helpers common to all of them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
import types

import ml_collections

from koajax.data import split_recipes

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
      # variety > 1: films with more spread of pose, exposure and
      # collimation (koajax.data.synthetic --variety).
      'synthetic': {'num_subjects': num_subjects, 'seed': seed,
                    'variety': 1.0},
      'manifest': '',
      'landmarks': '',
      'cache_dir': '',
      'roi_mm': 140.0,
      'roi_px': roi_px,
      # 'knee': ROIs for grading; 'side': each knee's side of its film, the
      # localiser's coarse views (koajax.data.build --crop).
      'crop': 'knee',
      # A trained localiser (folder of its coarse/ and fine/ runs) that
      # finds the landmarks of knees the landmarks file lacks; '' skips them.
      'localizer': '',
      # Processes used to generate and build; 0 means all cores.
      'workers': 0,
      # Logs and summary.json name knees by id only, no file paths.
      'redact_paths': False,
  })


def load_sibling(name: str, caller: str) -> types.ModuleType:
  """The config module `name` beside the file `caller` (pass `__file__`).

  Config files are loaded by path, not imported as a package, so one paper's
  config reaches another's presets (the Semixup baselines share the Semixup
  presets) through this.
  """
  path = Path(caller).with_name(f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'koajax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_config() -> ml_collections.ConfigDict:
  """The fields every training config has, with defaults papers override.

  A paper's config file sets its task, method, model, split recipe,
  optimiser and schedule on top of this (`configs/<paper>.py`).
  """
  config = ml_collections.ConfigDict()
  config.job = 'train'
  # What the run predicts (koajax.tasks): heads, qualifying knees, view.
  config.task = 'kl'
  config.view = ''  # '' = the task's own view
  config.view_size = 0  # px; 0 = the view's own (128 px Siamese patches)
  config.method = ''
  config.method_kwargs = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_config()
  # Grain worker processes per stream; -1: none on a CPU, on an
  # accelerator one per two cores (koajax.data.pipeline.reading_processes).
  config.data_workers = -1
  # CPU only: split the host into this many devices (koajax.runtime); the
  # batch is sharded over the largest count that divides it. 0: the count
  # measured fastest for this step on this machine (koajax.calibrate, kept
  # in ~/.cache/koajax/cpu_devices.json); -1: one per core.
  config.cpu_devices = 0
  # Compiled programs kept across runs (koajax.runtime); '' for none.
  config.compilation_cache = '~/.cache/koajax/jax'
  config.split = split_recipes.split_config('semixup')
  config.model = ml_collections.ConfigDict({'name': ''})
  config.optimizer = ml_collections.ConfigDict({
      'learning_rate': 1e-4, 'b1': 0.9, 'b2': 0.999, 'weight_decay': 0.0,
      # Learning-rate factors, multiplying: piecewise constant at {step:
      # scale} and {epoch: scale} (string keys), a linear warm-up over
      # warmup_epochs and a cosine decay to 0 over cosine_epochs (0: none).
      'boundaries': {}, 'boundary_epochs': {}, 'warmup_epochs': 0.0,
      'cosine_epochs': 0.0})
  config.batch_size = 32
  config.unlabeled_batch_size = 0  # 0: same as batch_size
  config.num_epochs = 100
  config.eval_every_epochs = 10
  config.eval_batch_size = 64
  # Validation metrics that keep a best checkpoint ('best_<name>', '/' as
  # '-'), higher is better except mse, rmse and loss; the first one is the
  # checkpoint test, evaluate, sweep and active learning use. Names:
  # 'balanced_accuracy' (the task's first head), 'jsn_l/kappa' (a head),
  # 'mean/kappa' (mean over the task's mean_heads), 'loss'.
  config.selection = ('balanced_accuracy', 'kappa')
  # Prediction (koajax.train.predictor): test-time augmentation ('none' or
  # 'five_crop' of tta_crop px) and how an ensemble of runs is averaged.
  config.predict = ml_collections.ConfigDict({
      'tta': 'none', 'tta_crop': 0, 'ensemble': 'probs'})
  config.log_every_steps = 50
  config.bootstrap_resamples = 1000
  config.progress_bar = True
  # Fields of koajax.train.workdir.RESUMABLE (comma-separated) that may
  # differ from the saved run's when resuming in its workdir (more epochs).
  config.resume_changed = ''
  # Whether the split's sizes may be lowered to fit the data, said in the
  # log and config.json (koajax.train.plan): 'synthetic' (only on koajax's
  # embedded data), 'always' or 'never'.
  config.adapt_to_data = 'synthetic'
  return config


def set_method(config: ml_collections.ConfigDict, method: str,
               **overrides) -> ml_collections.ConfigDict:
  """Sets `config.method` and shows all its options as `method_kwargs`."""
  from koajax import methods
  config.method = method
  config.method_kwargs = ml_collections.ConfigDict(
      {**methods.options(method), **overrides})
  return config
