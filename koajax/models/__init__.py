"""Flax NNX models of the koajax methods, found by name.

Every module of this package that defines `MODELS = {name: class}` offers
its models to configs (`config.model.name`), so adding an architecture is
adding a module. A model is built with the other fields of `config.model`
and `heads` ({head: classes}, from the task), and returns

  {'logits': {head: (B, classes)}, 'features': {name: array}}

where the features are what later stages need (feature maps for Grad-CAM,
pooled vectors, stage outputs).
"""

from __future__ import annotations

from collections.abc import Mapping
import functools

import ml_collections
from flax import nnx

from koajax import registry as registry_lib


@functools.cache
def registry() -> dict[str, type]:
  """Every model name of the package's modules -> its class."""
  return registry_lib.discover(__name__, __path__, 'MODELS')


def create(cfg: ml_collections.ConfigDict, *, heads: Mapping[str, int],
           rngs: nnx.Rngs) -> nnx.Module:
  """The model `cfg.name` names, built with the other fields of `cfg`."""
  models = registry()
  if cfg.name not in models:
    raise ValueError(f'unknown model {cfg.name!r} (config field model.name); '
                     f'choose one of {", ".join(sorted(models))}')
  kwargs = {k: v for k, v in cfg.items() if k not in ('name', 'init')}
  model = models[cfg.name](**kwargs, heads=dict(heads), rngs=rngs)
  if cfg.get('init'):  # pretrained backbone weights from a file
    from koajax.models import weights  # pylint: disable=g-import-not-at-top
    weights.load_into(model, cfg.init)
  return model
