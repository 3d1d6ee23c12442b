"""Training and prediction: the one trainer, its step, checkpoints and the
read-only predictor.

  trainer.py      the loop (`Trainer`, `train_and_evaluate`)
  step.py         the train state and the pure jitted step
  checkpoints.py  latest and best-by-metric checkpoints
  predictor.py    finished runs, read-only: every head, ensembles, TTA
"""

from koajax.train.step import TrainState
from koajax.train.trainer import DivergedError
from koajax.train.trainer import NonFiniteLossError
from koajax.train.trainer import SPLITS_NPZ
from koajax.train.trainer import Splits
from koajax.train.trainer import Trainer
from koajax.train.trainer import headline
from koajax.train.trainer import saved_splits
from koajax.train.trainer import split_indices
from koajax.train.trainer import train_and_evaluate
from koajax.train.trainer import write_report
