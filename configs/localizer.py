"""The knee localiser's fine stage: 16 landmarks of a knee from its 140 mm ROI.

  python -m koajax.main --config=configs/localizer.py:quick --workdir=/tmp/koajax-localizer

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

Data: every knee with all 16 landmarks; the knees of site E are the test
set, one in five of the other subjects validate.

Presets:
  default  the ROI at its cache resolution, 400 px over 140 mm
           (0.35 mm/px), batch 32, 60 epochs of Adam 1e-3 with a cosine
           decay; translation +-32 px (11 mm), rotation +-10 deg, scale
           0.9-1.1; evaluated on views moved by up to 32 px.
  quick    a first look on a 2-core CPU: 192 px (0.73 mm/px), 16 epochs,
           translation and evaluation shift +-16 px (12 mm).
  smoke    a few steps at 64 px, for tests.
"""

from koajax import config_lib
from koajax.data import split_recipes

PRESETS = ('default', 'quick', 'smoke')


def get_config(arg=None):
  preset = config_lib.parse_preset(arg, PRESETS)
  config = config_lib.set_method(config_lib.base_config(), 'landmarks')
  config.task = 'landmarks'
  config.view = 'keypoints'
  config.view_size = 400
  config.method_kwargs.max_translation = 32.0
  config.predict.shift = 32.0
  config.split = split_recipes.split_config('held_out_site', test_site='E')
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
  # One CPU device per core, as for the other ResNets (koajax.runtime).
  config.cpu_devices = -1
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
    config.batch_size = 8
    config.num_epochs = 2
    config.eval_every_epochs = 1
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.progress_bar = False
  return config
