"""Multi-task KL + OARSI grading (Tiulpin & Saarakkala 2019): 7 heads.

  python -m koajax.main --config=configs/oarsi.py:quick --workdir=/tmp/koajax-oarsi

One network grades KL and the six OARSI features (osteophytes of the
lateral / medial tibia and femur, lateral / medial joint-space narrowing)
with a global-average-pool -> dropout 0.5 -> linear head each, trained on
the mean of the heads' cross-entropies. The backbone is `model.name`:
resnet18, resnet34, resnet50, seresnet50, seresnext50_32x4d or the legacy
(Cadene `pretrainedmodels`) layouts legacy_seresnet50 and
legacy_seresnext50_32x4d, whose ImageNet weights the paper starts from:
give them with `--config.model.init=WEIGHTS.pth` (or .safetensors; timm,
torchvision or legacy key names). Nothing is downloaded.

Cross-validation: the knees of every site but the test site (E) are split
into 5 subject-grouped folds; `--config.split.fold=k` trains fold k, each in
its own workdir, and `python -m koajax.evaluate --workdir=A,B,...` evaluates
an ensemble of any of them (README, "Multi-task OARSI").

Presets:
  default    the paper: SE-ResNeXt50-32x4d (legacy layout), 310 px view,
             random 300 px crops (centre crop to evaluate), batch 32, 20
             epochs; heads alone for 2 epochs at Adam 1e-2, then all at
             1e-3, from epoch 4 at 1e-4; L2 1e-4 (PyTorch's Adam
             weight_decay); the snapshot of lowest validation loss. Meant
             for pretrained weights (model.init).
  reference  the reference code's variant: heads alone for 1 epoch, then 2
             at 1e-3, then 1e-4.
  scratch    from random weights: all layers at 1e-4 from the start, /10
             after epochs 10 and 15.
  quick      a first look on a 2-core CPU in about 10 minutes: ResNet-18
             from scratch on a 136 px view (128 px crops), 10 epochs at
             Adam 2e-3 with warm-up and cosine decay.
  smoke      a few steps of a tiny network, for tests.
"""

from koajax import config_lib
from koajax.data import split_recipes

PRESETS = ('default', 'reference', 'scratch', 'quick', 'smoke')


def get_config(arg=None):
  preset = config_lib.parse_preset(arg, PRESETS)
  config = config_lib.set_method(config_lib.base_config(), 'multitask')
  config.task = 'kl_oarsi'
  config.view = 'whole'
  # 140 mm -> 310 px (0.45 mm/px); the method crops 300 px.
  config.view_size = 310
  config.method_kwargs.crop = 300
  config.predict.crop = 300
  config.split = split_recipes.split_config(
      'kfold', num_folds=5, fold=0,
      test_site='E')  # held out as the test set; '' to test on val
  config.model = config_lib.ml_collections.ConfigDict({
      'name': 'legacy_seresnext50_32x4d', 'dropout': 0.5,
      'dtype': 'float32',  # 'bfloat16': bf16 compute on accelerators
      'init': ''})  # pretrained backbone weights (.pth / .safetensors)
  config.optimizer.update({
      'learning_rate': 1e-2, 'boundary_epochs': {'2': 0.1, '4': 0.1},
      'heads_only_epochs': 2.0, 'weight_decay': 1e-4,
      'weight_decay_mode': 'l2'})
  config.batch_size = 32
  config.num_epochs = 20
  config.eval_every_epochs = 1
  config.eval_batch_size = 32
  # The paper keeps each fold's snapshot of lowest validation loss (the
  # mean over the heads of their log loss).
  config.selection = ('loss', 'balanced_accuracy', 'mean/kappa')
  config.log_every_steps = 20
  if preset == 'reference':
    config.optimizer.heads_only_epochs = 1.0
    config.optimizer.boundary_epochs = {'1': 0.1, '3': 0.1}
  elif preset == 'scratch':
    _from_scratch(config)
  elif preset == 'quick':
    # Against the paper: ResNet-18 from scratch instead of a pretrained
    # SE-ResNeXt50, a 136 px view (1.03 mm/px) cropped to 128 px, 10 epochs
    # at Adam 2e-3 with a 1-epoch warm-up and a cosine decay; the loss,
    # heads, augmentation and folds are the paper's.
    _from_scratch(config)
    config.model.name = 'resnet18'
    config.view_size = 136
    config.method_kwargs.crop = 128
    config.predict.crop = 128
    config.num_epochs = 10
    config.optimizer.update({'learning_rate': 2e-3, 'boundary_epochs': {},
                             'warmup_epochs': 1.0, 'cosine_epochs': 10.0})
    config.eval_batch_size = 64
  elif preset == 'smoke':
    _from_scratch(config)
    config.data = config_lib.data_config(num_subjects=40, roi_px=160)
    config.split.num_folds = 2
    config.split.test_site = ''
    config.model.name = 'resnet18'
    config.view_size = 40
    config.method_kwargs.crop = 32
    config.predict.crop = 32
    config.batch_size = 8
    config.num_epochs = 2
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.bootstrap_resamples = 20
    config.progress_bar = False
  return config


def _from_scratch(config) -> None:
  """The paper's from-scratch schedule: every layer at 1e-4 from the start,
  /10 after epochs 10 and 15."""
  config.optimizer.update({'learning_rate': 1e-4, 'heads_only_epochs': 0.0,
                           'boundary_epochs': {'10': 0.1, '15': 0.1}})
