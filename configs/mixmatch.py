"""MixMatch (K = 2 augmentations, sharpening T = 0.5, Beta(0.75, 0.75), w_u = 10).

  python -m koajax.main --config=configs/mixmatch.py:quick --workdir=/tmp/koajax-mixmatch

Presets (`:default`, `:quick`, `:smoke`) are Semixup's, described in
configs/semixup.py; change single fields with
`--config.split.labels_per_grade=50` and the like.
"""

from koajax import config_lib


def get_config(arg=None):
  semixup = config_lib.load_sibling('semixup', __file__)
  return semixup.family_config('mixmatch', arg)
