"""Loads a config file of configs/ the way `--config=configs/NAME.py:arg` does."""

import importlib.util
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
