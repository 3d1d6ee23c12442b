"""Flax NNX models of the koajax methods."""

from __future__ import annotations

import ml_collections
from flax import nnx

from koajax.models import siamese


def create(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model `cfg.name` names, built with the other fields of `cfg`."""
  kwargs = {k: v for k, v in cfg.items() if k != 'name'}
  if cfg.name == 'semixup_net':
    return siamese.SemixupNet(**kwargs, rngs=rngs)
  if cfg.name == 'kneenet':
    return siamese.KneeNet(**kwargs, rngs=rngs)
  raise ValueError(f"unknown model {cfg.name!r}; use 'semixup_net' or 'kneenet'")
