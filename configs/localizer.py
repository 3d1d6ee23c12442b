"""The knee localiser: 16 landmarks per knee, in two stages, as KNEEL.

  python -m koajax.main --config=configs/localizer.py:coarse_quick --workdir=/tmp/koajax-localizer/coarse
  python -m koajax.main --config=configs/localizer.py:quick --workdir=/tmp/koajax-localizer/fine
  python -m koajax.data.build --manifest=... --out=... --localizer=/tmp/koajax-localizer

The coarse stage (`coarse*` presets) finds a knee's landmarks on its side of
the film (its half of a bilateral film or a whole single-knee film, about
1 mm/px: `data.crop='side'`); the fine stage (the others) finds them again
on the 140 mm ROI the coarse points place. `koajax.localize` runs both on
films without landmarks.

A timm-layout ResNet-18 trunk (stages 1-3) with a top-down decoder to
stride 4 predicts one heatmap per landmark; their soft-argmax gives each
landmark in view pixels (`model.name=landmark_net`,
koajax/models/landmark_net.py). Training pulls the points to the truth by
their mean distance, every knee jittered on the device by a random
translation, rotation and scale (koajax/methods/landmarks.py); the view is
the knee's whole ROI with its landmarks ('keypoints'). The report is KNEEL's
(koajax/evaluation/landmarks.py): per-bone recall within 1-2.5 mm, outliers
>= 10 mm and the joint centre's error, on the held-out site's knees, with
each knee's points and distances in predictions.csv. Validation and test
views are moved by up to `predict.shift` px per axis (a fixed draw per knee,
points moved back; koajax/train/predictor.py), as a coarse stage's ROI would
be off the truth: a view cut around the true joint centre would put that
landmark at the centre for free.

Data: every knee with all 16 landmarks of the synthetic films made with
twice the standard variety of pose, exposure and collimation
(`data.synthetic.variety=2`; the smoke presets keep the standard films);
the knees of site E are the test set, one in five of the other subjects
validate.

The coarse stage has the same network, method and report on its side views
(256 mm at 1 mm/px in the cache), with larger jitter (the knee may be
anywhere in its half of a hospital film), no evaluation shift (its views
are not cut around the knee), and half its knees mirrored with their points
(`method_kwargs.mirror`), so that it reads a knee's side from its anatomy
and the localiser can check the manifest's side.

Presets (fine stage):
  default  the ROI at its cache resolution, 400 px over 140 mm
           (0.35 mm/px), batch 32, 60 epochs of Adam 1e-3 with a cosine
           decay; translation +-32 px (11 mm), rotation +-10 deg, scale
           0.9-1.1; evaluated on views moved by up to 32 px.
  quick    a first look on a 2-core CPU: 192 px (0.73 mm/px), 16 epochs,
           translation and evaluation shift +-16 px (12 mm).
  smoke    216 steps at 64 px, for tests.
Presets (coarse stage):
  coarse        256 px over 256 mm (1 mm/px), 60 epochs, translation
                +-40 px, rotation +-15 deg, scale 0.8-1.2.
  coarse_quick  128 px (2 mm/px), 16 epochs, translation +-20 px.
  coarse_smoke  216 steps at 64 px (4 mm/px), no mirrored knees.
"""

from koajax import config_lib
from koajax.data import split_recipes

PRESETS = ('default', 'quick', 'smoke', 'coarse', 'coarse_quick',
           'coarse_smoke')


def get_config(arg=None):
  preset = config_lib.parse_preset(arg, PRESETS)
  config = config_lib.set_method(config_lib.base_config(), 'landmarks')
  config.task = 'landmarks'
  config.view = 'keypoints'
  config.view_size = 400
  config.method_kwargs.max_translation = 32.0
  config.predict.shift = 32.0
  config.split = split_recipes.split_config('held_out_site', test_site='E')
  # Films with twice the standard spread of pose, exposure and collimation
  # (koajax.data.synthetic --variety=2; their own folder beside the default
  # dataset): hospital films vary more than one cohort's five sites, and a
  # localiser trained on them holds on standard films and on varied ones,
  # where one trained on standard films loses knees (README).
  config.data.synthetic.variety = 2.0
  config.model = config_lib.ml_collections.ConfigDict({
      'name': 'landmark_net', 'backbone': 'resnet18',
      'stage': 3,  # the deepest stage read (stride 16)
      'decoder_width': 64,
      'dtype': 'float32',  # 'bfloat16': bf16 compute on accelerators
      'init': ''})  # pretrained trunk weights (.pth / .safetensors)
  config.optimizer.update({'learning_rate': 1e-3, 'cosine_epochs': 60.0})
  config.batch_size = 32
  config.num_epochs = 60
  config.eval_every_epochs = 2
  config.eval_batch_size = 32
  # The joint centre first: it places the knee's ROI for grading.
  config.selection = ('landmarks/centre_mm', 'landmarks/mean_mm')
  config.log_every_steps = 20
  # How far the fine stage's two looks at a knee (10 mm apart) may disagree
  # before the localiser says there is no knee (koajax/localize.py).
  config.localize = config_lib.ml_collections.ConfigDict(
      {'max_disagreement_mm': 2.5})
  if preset.startswith('coarse'):
    return _coarse(config, preset)
  if preset == 'quick':
    config.view_size = 192
    config.method_kwargs.max_translation = 16.0
    config.predict.shift = 16.0
    config.batch_size = 16
    config.num_epochs = 16
    config.optimizer.cosine_epochs = 16.0
    config.optimizer.warmup_epochs = 1.0
  elif preset == 'smoke':
    config.data = config_lib.data_config(num_subjects=40, roi_px=160)
    config.view_size = 64
    config.method_kwargs.max_translation = 4.0
    config.predict.shift = 4.0
    # At 2.2 mm per view pixel its two looks at a knee disagree by 2-4 mm
    # (a chest's by 8-12 mm at 0.15 mm spacing): 2.5 mm would refuse knees.
    config.localize.max_disagreement_mm = 5.0
    _smoke(config)
  return config


def _coarse(config, preset: str):
  """The coarse stage on the fine stage's settings."""
  config.data.crop = 'side'
  config.data.roi_mm = 256.0
  config.data.roi_px = 256
  config.view_size = 256
  config.method_kwargs.update({'max_translation': 40.0,
                               'max_rotation_deg': 15.0,
                               'scale_range': (0.8, 1.2), 'mirror': 0.5})
  config.predict.shift = 0.0
  if preset == 'coarse_quick':
    config.view_size = 128
    config.method_kwargs.max_translation = 20.0
    config.batch_size = 16
    config.num_epochs = 16
    config.optimizer.cosine_epochs = 16.0
    config.optimizer.warmup_epochs = 1.0
  elif preset == 'coarse_smoke':
    config.data = config_lib.data_config(num_subjects=40, roi_px=128)
    config.data.update({'crop': 'side', 'roi_mm': 256.0})
    config.view_size = 64
    config.method_kwargs.max_translation = 8.0
    # Too few steps to learn a knee's side from its anatomy; without the
    # mirrored knees the localiser does not check sides.
    config.method_kwargs.mirror = 0.0
    _smoke(config)
  return config


def _smoke(config) -> None:
  """Half a minute of training on a 2-core CPU: enough for the tests'
  localiser to find most synthetic knees within a few mm and refuse what is
  not a knee (tests/test_localizer_run.py)."""
  config.batch_size = 8
  config.num_epochs = 12
  config.eval_every_epochs = 6
  config.eval_batch_size = 16
  config.log_every_steps = 18  # once an epoch
  config.progress_bar = False
