"""Confidence-driven early-OA detection (Wang et al. 2025): KL-0 vs KL-2.

  python -m koajax.main --config=configs/confidence.py:quick --workdir=/tmp/koajax-confidence

A Siamese network with global average pooling after each of its four
blocks (`siamese_gap`, 2.69 M parameters) reads the lateral patch and the
mirrored medial patch of a knee and tells KL-0 from KL-2 (the positive
class; knees of other grades are not in this task). It learns with the
hybrid loss (`koajax.hybrid_loss`): per class in every batch, the most
confident 70 % of knees get label-smoothed cross-entropy, the next 20 % a
KL divergence to the class's mean validation confidence c_k (method state,
recomputed at each evaluation), the least confident 10 % plain
cross-entropy. The knees are split 7:1:2 (train : validation : test) by
subject, stratified by KL, and KL-2 is bootstrapped in the training stream
up to KL-0's count every epoch (`oversample='bootstrap'`).

The test report adds, where the data has readers (manifest columns
`kl_reader_<name>`; the synthetic data has three), the model against each
reader, and Grad-CAM overlays of the most and least confident test knees.

Presets:
  default  the paper: Adam 1e-3, weight decay 3e-4 (PyTorch's Adam
           weight_decay), batch 32, 500 epochs, 128 px patches.
  quick    a first look on a 2-core CPU in about 10 minutes: the paper's
           network, loss and split on 64 px patches for 6 epochs.
  smoke    a few steps on tiny data, for tests.

Fields for the paper's comparisons:
  --config.method_kwargs.loss_kind=ce     the cross-entropy baseline
  --config.model.levels='(4,)'            single-level pooling (Table III)
  --config.model.pool=gmp                 global max pooling (Table III)
  --config.oversample=''                  no KL-2 oversampling
"""

from koajax import config_lib
from koajax.data import split_recipes

PRESETS = ('default', 'quick', 'smoke')


def get_config(arg=None):
  preset = config_lib.parse_preset(arg, PRESETS)
  config = config_lib.set_method(config_lib.base_config(), 'confidence')
  config.task = 'kl0_vs_kl2'
  config.view = 'siamese'
  config.split = split_recipes.split_config('ratio', ratios=(7, 1, 2))
  config.model = config_lib.ml_collections.ConfigDict({
      'name': 'siamese_gap', 'levels': (1, 2, 3, 4), 'pool': 'gap',
      'dropout': 0.2, 'dtype': 'float32'})
  config.oversample = 'bootstrap'
  config.optimizer.update({'learning_rate': 1e-3, 'weight_decay': 3e-4,
                           'weight_decay_mode': 'l2'})
  config.batch_size = 32
  config.num_epochs = 500
  config.eval_every_epochs = 1
  config.eval_batch_size = 64
  # Accuracy is the paper's measure; ties are broken by the validation loss.
  config.selection = ('accuracy', 'loss')
  config.log_every_steps = 20
  # The test report's Grad-CAM overlays: this many most and least
  # confident knees (koajax.evaluation.gradcam; 0: none).
  config.gradcam_knees = 4
  if preset == 'quick':
    # Against the paper: 64 px patches (2.2 mm/px of the 140 mm ROI: the
    # step costs a quarter of a 128 px one) and 6 epochs with a warm-up
    # and a cosine decay; the network, loss, split and oversampling are
    # the paper's.
    config.view_size = 64
    config.num_epochs = 6
    config.optimizer.update({'warmup_epochs': 1.0, 'cosine_epochs': 6.0})
  elif preset == 'smoke':
    config.data = config_lib.data_config(num_subjects=40, roi_px=160)
    config.view_size = 32
    config.batch_size = 8
    config.num_epochs = 2
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.bootstrap_resamples = 20
    config.gradcam_knees = 2
    config.progress_bar = False
  return config
