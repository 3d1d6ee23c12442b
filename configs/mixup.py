"""Mixup on the labeled knees (Beta(0.75, 0.75), lambda folded >= 0.5).

  python -m koajax.main --config=configs/mixup.py:quick --workdir=/tmp/koajax-mixup

Presets (`:default`, `:quick`, `:smoke`) are described in
`koajax.config_lib.semixup_family_config`; change single fields with
`--config.split.labels_per_grade=50` and the like.
"""

from koajax import config_lib


def get_config(arg=None):
  return config_lib.semixup_family_config('mixup', arg)
