"""MixMatch (K = 2 augmentations, sharpening T = 0.5, Beta(0.75, 0.75), w_u = 10).

  python -m koajax.main --config=configs/mixmatch.py:quick --workdir=/tmp/koajax-mixmatch

Presets (`:default`, `:quick`, `:smoke`) are described in
`koajax.config_lib.semixup_family_config`; change single fields with
`--config.split.labels_per_grade=50` and the like.
"""

from koajax import config_lib


def get_config(arg=None):
  return config_lib.semixup_family_config('mixmatch', arg)
