"""Mixup on the labeled knees (Beta(0.75, 0.75), lambda folded >= 0.5).

  python -m koajax.main --config=configs/mixup.py:quick --workdir=/tmp/koajax-mixup

Presets (`:default`, `:quick`, `:smoke`) are Semixup's, described in
configs/semixup.py; change single fields with
`--config.split.labels_per_grade=50` and the like.
"""

from koajax import config_lib


def get_config(arg=None):
  semixup = config_lib.load_sibling('semixup', __file__)
  return semixup.family_config('mixup', arg)
