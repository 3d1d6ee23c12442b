"""Things found by name in the modules of a package (models, methods).

A module offers its things by defining a dict, e.g. `MODELS = {name: cls}`;
adding a module adds its things, with no central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any


def discover(package: str, paths: Iterable[str], attribute: str
             ) -> dict[str, Any]:
  """{name: thing} over the `attribute` dicts of every module of `package`
  (whose `__path__` is `paths`); a name defined twice is an error."""
  found = {}
  for info in pkgutil.iter_modules(list(paths)):
    module = importlib.import_module(f'{package}.{info.name}')
    for name, thing in getattr(module, attribute, {}).items():
      if name in found:
        raise ValueError(f'{name!r} is defined twice in {package} '
                         f'({attribute})')
      found[name] = thing
  return found
