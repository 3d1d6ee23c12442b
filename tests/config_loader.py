"""Loads a config file of configs/ the way `--config=configs/NAME.py:arg` does."""

import importlib.util
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def smoke_config(name, data_root, **overrides):
  """The `smoke` preset of configs/<name>.py on the data under `data_root`,
  with dotted-field overrides ('optimizer.learning_rate': 1e-3)."""
  config = load_config(name, 'smoke')
  config.data.root = data_root
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for part in path:
      node = node[part]
    node[leaf] = value
  return config
