"""Helpers shared by the files in configs/."""

from __future__ import annotations

import ml_collections


def parse_preset(arg: str | None, presets: tuple[str, ...]) -> str:
  """Returns the preset named by `--config=FILE:preset`, or 'default'.

  Presets are whole named settings (the paper's default, `quick`, `smoke`);
  single values are changed with `--config.a.b=value` instead.
  """
  name = (arg or 'default').strip()
  if name not in presets:
    raise ValueError(
        f'unknown preset {name!r}; this config has {", ".join(presets)}')
  return name


def data_config(*, num_subjects: int = 560, seed: int = 0,
                roi_px: int = 400) -> ml_collections.ConfigDict:
  """Where the knees come from and how they are preprocessed.

  With source='synthetic' koajax generates its default dataset and caches it
  under `root` (once; later runs reuse it). With source='manifest' it builds
  the cache from `manifest` (koajax manifest CSV) and `landmarks`. With
  source='cache' it reads a cache built earlier with koajax.data.build.
  """
  return ml_collections.ConfigDict({
      'source': 'synthetic',
      # Empty: $KOAJAX_DATA_DIR, else ~/.cache/koajax.
      'root': '',
      'synthetic': {'num_subjects': num_subjects, 'seed': seed},
      'manifest': '',
      'landmarks': '',
      'cache_dir': '',
      'roi_mm': 140.0,
      'roi_px': roi_px,
      # Processes used to generate and build; 0 means all cores.
      'workers': 0,
  })
