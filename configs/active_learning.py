"""Active learning with MC-dropout acquisition and consistency regularisation.

  python -m koajax.main --config=configs/active_learning.py:quick --workdir=/tmp/koajax-al
  python -m koajax.main --config=configs/active_learning.py:quick --workdir=/tmp/koajax-al-ent \
      --config.active.acquisition=entropy --config.active.consistency=false

Presets (`:default`, `:quick`, `:smoke`) are described in
`koajax.config_lib.active_learning_config`; acquisitions are random, entropy,
least_confidence, entropy_mcd and bald.
"""

from koajax import config_lib


def get_config(arg=None):
  return config_lib.active_learning_config(arg)
