"""Prepare the data: generate (or build) the knee cache and summarise it.

  python -m koajax.main --config=configs/data.py --workdir=/tmp/koajax-data
  python -m koajax.main --config=configs/data.py:smoke --workdir=/tmp/koajax-smoke

The default is koajax's synthetic dataset (about 3,000 knees), generated once
under $KOAJAX_DATA_DIR (default ~/.cache/koajax) and reused. To use your own
data set `--config.data.source=manifest --config.data.manifest=PATH`.
"""

import ml_collections

from koajax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_preset(arg, ('default', 'smoke'))
  config = ml_collections.ConfigDict()
  config.job = 'prepare_data'
  config.seed = 0
  if preset == 'smoke':
    config.data = config_lib.data_config(num_subjects=6, roi_px=128)
  else:
    config.data = config_lib.data_config()
  return config
