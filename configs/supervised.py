"""Supervised baseline (SL): cross-entropy on the labeled knees only.

  python -m koajax.main --config=configs/supervised.py:quick --workdir=/tmp/koajax-supervised

Presets (`:default`, `:quick`, `:smoke`) are described in
`koajax.config_lib.semixup_family_config`; change single fields with
`--config.split.labels_per_grade=50` and the like.
"""

from koajax import config_lib


def get_config(arg=None):
  return config_lib.semixup_family_config('supervised', arg)
