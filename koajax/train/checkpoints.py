"""A run's checkpoints: the latest (with its data iterators) and the best by
each selection metric.

  WORKDIR/checkpoints/          latest state, Grain iterators, best values
  WORKDIR/best_<metric>/        the state with the best validation <metric>
                                ('/' in a metric name becomes '-')

Metric names are those of `koajax.evaluation.heads.head_scores`
('balanced_accuracy', 'jsn_l/kappa', 'mean/kappa', 'loss'); higher is better
except the errors and losses. The first selection metric is 'best'.
Read-only use (`Checkpoints(..., read_only=True)`) writes nothing, so a
finished run can be evaluated from a read-only copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from koajax.evaluation import metrics as metrics_lib

LATEST = 'latest'
BEST = 'best'


def folder(name: str) -> str:
  """The folder of checkpoint `name` ('latest', 'best_<metric>')."""
  return 'checkpoints' if name == LATEST else name.replace('/', '-')


def lower_is_better(metric: str) -> bool:
  return metric.rsplit('/', 1)[-1] in metrics_lib.LOWER_IS_BETTER | {'loss'}


def _manager(path: Path, *, max_to_keep: int, read_only: bool):
  return ocp.CheckpointManager(path.absolute(), options=(
      ocp.CheckpointManagerOptions(read_only=True) if read_only else
      ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)))


class Checkpoints:
  """The checkpoint managers of one run directory."""

  def __init__(self, workdir: str | Path, selection: Sequence[str], *,
               read_only: bool = False):
    if not selection:
      raise ValueError('config field selection names no metric')
    self.workdir = Path(workdir)
    self.selection = tuple(selection)
    self.read_only = read_only
    self.latest = _manager(self.workdir / folder(LATEST), max_to_keep=2,
                           read_only=read_only)
    self.best = {m: _manager(self.workdir / folder(f'best_{m}'),
                             max_to_keep=1, read_only=read_only)
                 for m in self.selection}
    self.best_values = {m: math.inf if lower_is_better(m) else -math.inf
                        for m in self.selection}

  def resolve(self, name: str) -> str:
    """'best' -> 'best_<first selection metric>'; other names unchanged."""
    return f'best_{self.selection[0]}' if name == BEST else name

  def _managers(self) -> dict[str, ocp.CheckpointManager]:
    return {LATEST: self.latest,
            **{f'best_{m}': manager for m, manager in self.best.items()}}

  def names(self) -> list[str]:
    """The checkpoints that exist: 'latest' and 'best_<metric>'."""
    return [name for name, manager in self._managers().items()
            if manager.latest_step() is not None]

  # -- writing ----------------------------------------------------------------

  def save(self, step: int, state, streams: Mapping[str, Any]) -> None:
    items = {'state': ocp.args.StandardSave(state),
             'meta': ocp.args.JsonSave({'best_values': self.best_values})}
    items.update({name: grain.checkpoint.CheckpointSave(it)
                  for name, it in streams.items()})
    self.latest.save(step, args=ocp.args.Composite(**items))
    self.latest.wait_until_finished()

  def keep_if_best(self, step: int, state, scores: Mapping[str, float]) -> None:
    """Saves `state` as best_<m> for each selection metric it improves."""
    for m, manager in self.best.items():
      if m not in scores:
        raise KeyError(f'selection metric {m!r} is not a validation metric; '
                       f'choose from {", ".join(sorted(scores))}')
      value = float(scores[m])
      better = (value < self.best_values[m] if lower_is_better(m)
                else value > self.best_values[m])
      if np.isfinite(value) and better:
        self.best_values[m] = value
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state)), force=True)
        manager.wait_until_finished()

  # -- reading ----------------------------------------------------------------

  def restore_latest(self, abstract, streams: Mapping[str, Any]):
    """(state, step) of the latest checkpoint with the streams restored in
    place, or (None, 0) when there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None, 0
    items = {'state': ocp.args.StandardRestore(abstract),
             'meta': ocp.args.JsonRestore()}
    items.update({name: grain.checkpoint.CheckpointRestore(it)
                  for name, it in streams.items()})
    restored = self.latest.restore(step, args=ocp.args.Composite(**items))
    self.best_values.update(restored['meta']['best_values'])
    return restored['state'], int(step)

  def method_state_shapes(self, name: str) -> Any:
    """Shapes of the method state saved in checkpoint `name`, read from the
    checkpoint's metadata: what restoring needs without the method."""
    name = self.resolve(name)
    manager = self._managers().get(name)
    step = manager.latest_step() if manager is not None else None
    if step is None:
      return {}  # `load` explains what is missing
    metadata = ocp.StandardCheckpointer().metadata(
        Path(manager.directory) / str(step) / 'state').item_metadata
    tree = dict(getattr(metadata, 'tree', metadata))
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        tree.get('method_state', {}))

  def load(self, name: str, abstract):
    """The state saved as `name` ('latest', 'best', 'best_<metric>')."""
    name = self.resolve(name)
    managers = self._managers()
    if name not in managers:
      raise ValueError(f'unknown checkpoint {name!r}; choose one of best, '
                       f'{", ".join(managers)}')
    step = managers[name].latest_step()
    if step is None:
      raise FileNotFoundError(
          f'no {name!r} checkpoint in {self.workdir}; found: '
          f'{", ".join(self.names()) or "none (train first)"}')
    return managers[name].restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']


def abstract_of(state) -> Any:
  """Shapes, dtypes and shardings of a state, for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
