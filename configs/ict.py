"""Interpolation consistency training (weight ramped to 100 over 80 epochs, no labeled mixup).

  python -m koajax.main --config=configs/ict.py:quick --workdir=/tmp/koajax-ict

Presets (`:default`, `:quick`, `:smoke`) are Semixup's, described in
configs/semixup.py; change single fields with
`--config.split.labels_per_grade=50` and the like.
"""

from koajax import config_lib


def get_config(arg=None):
  semixup = config_lib.load_sibling('semixup', __file__)
  return semixup.family_config('ict', arg)
