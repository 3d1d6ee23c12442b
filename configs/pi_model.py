"""Pi-model: cross-entropy + consistency between two augmentations (w = 1).

  python -m koajax.main --config=configs/pi_model.py:quick --workdir=/tmp/koajax-pi_model

Presets (`:default`, `:quick`, `:smoke`) are Semixup's, described in
configs/semixup.py; change single fields with
`--config.split.labels_per_grade=50` and the like.
"""

from koajax import config_lib


def get_config(arg=None):
  semixup = config_lib.load_sibling('semixup', __file__)
  return semixup.family_config('pi_model', arg)
