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

A damaged checkpoint (a file truncated or overwritten, a folder missing
files; `damage` says which) never ends in a library traceback. Resuming
(`restore_latest`) goes on from the newest intact 'latest' step, with one
warning naming what was damaged; a writable run removes the damaged steps
(it writes them again), a read-only one leaves them. `load` raises
`DamagedCheckpoint` (a `cli.BadInput`) naming the damaged file and the
checkpoints that are intact. Orbax itself never lists a step whose save did
not finish (its `<step>.orbax-checkpoint-tmp-*` folders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import logging
import math
from pathlib import Path
import re
import sys
from typing import Any
import warnings

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from koajax import cli
from koajax.evaluation import landmarks as landmarks_lib
from koajax.evaluation import metrics as metrics_lib

log = logging.getLogger(__name__)

LATEST = 'latest'
BEST = 'best'

# Files of an Orbax step folder that hold JSON.
_JSON_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'metadata')
# What tensorstore says when a file it reads is cut short or overwritten (a
# shape that does not match the model says something else).
_DAMAGE_CODES = re.compile(r'\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b|'
                           r'Truncated|Error decoding')


class DamagedCheckpoint(cli.BadInput):
  """A checkpoint whose files cannot be read back; the message names the
  file or folder (`where`) and what is wrong with it (`why`)."""

  def __init__(self, message: str, *, step_dir: Path | None = None,
               where: Path | None = None, why: str = ''):
    super().__init__(message)
    self.step_dir, self.where, self.why = step_dir, where, why

  @classmethod
  def found(cls, step_dir: Path, where: Path, why: str) -> DamagedCheckpoint:
    return cls(f'{where}: {why}', step_dir=step_dir, where=where, why=why)

  def inside(self) -> str:
    """What is damaged, relative to the step folder."""
    try:
      where = self.where.relative_to(self.step_dir)
    except ValueError:
      where = self.where
    return f'{where}: {self.why}' if str(where) != '.' else self.why


def folder(name: str) -> str:
  """The folder of checkpoint `name` ('latest', 'best_<metric>')."""
  return 'checkpoints' if name == LATEST else name.replace('/', '-')


def lower_is_better(metric: str) -> bool:
  return metric.rsplit('/', 1)[-1] in (metrics_lib.LOWER_IS_BETTER
                                       | landmarks_lib.LOWER_IS_BETTER
                                       | {'loss'})


def damage(step_dir: str | Path, items: Sequence[str] = ('state',), *,
           step_metadata: bool = False) -> tuple[Path, str] | None:
  """(file or folder, what is wrong) of the first damage found in the
  folders of `items` of an Orbax step folder (and in its own
  _CHECKPOINT_METADATA with `step_metadata`) without reading arrays: a
  missing item folder or state metadata, a JSON file that does not parse.
  None when none is found."""
  step_dir = Path(step_dir)
  if not step_dir.is_dir():
    return step_dir, 'missing'
  for item in items:
    if not (step_dir / item).is_dir():
      return step_dir / item, 'missing'
  if 'state' in items and not (step_dir / 'state' / '_METADATA').is_file():
    return step_dir / 'state' / '_METADATA', 'missing'
  files = [p for item in items for p in sorted((step_dir / item).rglob('*'))]
  if step_metadata:
    files.insert(0, step_dir / '_CHECKPOINT_METADATA')
  for path in files:
    if not path.is_file() or not (
        path.name in _JSON_FILES or path.suffix == '.json'
        or path.parent.name == 'array_metadatas'):
      continue
    try:
      json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
      return path, f'not valid JSON ({type(e).__name__}: {e})'
  return None


def damage_in(error: BaseException, step_dir: str | Path
              ) -> tuple[Path, str] | None:
  """(file or folder, what is wrong) when `error`, raised while restoring
  from `step_dir`, says that a file there is damaged; None when it says
  something else (a model that does not match, a bug)."""
  step_dir = Path(step_dir)
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
      return step_dir, f'a file is not valid JSON ({error})'
    if isinstance(error, FileNotFoundError):
      return Path(error.filename or step_dir), 'missing'
    if isinstance(error, KeyError) and 'was not found in the checkpoint' in text:
      item = re.search(r'Item "([^"]+)"', text)
      return step_dir / (item.group(1) if item else ''), 'missing'
    found = _DAMAGE_CODES.search(text)
    if found:
      files = [f for f in re.findall(r'local file "([^"]+)"', text)
               if not f.endswith('/')]
      folders = re.findall(r'local file "([^"]+)/"', text)
      where = Path(files[-1] if files else folders[-1] if folders
                   else step_dir)
      code = re.search(r'\b([A-Z][A-Z_]{3,}):', text)
      return where, 'cannot be read' + (f' ({code.group(1)})' if code else '')
    error = error.__cause__ or error.__context__
  return None


def _is_orphaned_read(unraisable) -> bool:
  """Whether an unraisable exception is Orbax's reads that a failed
  restore left behind: their callbacks find the restore's event loop
  closed, or their coroutines are collected unfinished."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and 'Event loop is closed' in str(error):
    return True
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and ('orbax' in code.co_filename
                               or 'tensorstore' in str(error).lower())


class _QuietOrphanedReads(logging.Filter):
  """Drops asyncio's report of a read whose restore had already failed."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith(('Task exception was never retrieved',
                                    'Future exception was never retrieved'))
                and ('orbax' in message or 'tensorstore' in message.lower()))


_quiet = False


def _quiet_orphaned_reads() -> None:
  """Keeps the reads of a failed restore from printing hundreds of lines
  ('Event loop is closed') after the one line koajax says about it."""
  global _quiet
  if _quiet:
    return
  _quiet = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_orphaned_read(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_QuietOrphanedReads())


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
    _quiet_orphaned_reads()
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

  def _newest(self, name: str) -> tuple[ocp.CheckpointManager, int]:
    """The manager and newest step of checkpoint `name` (resolved)."""
    managers = self._managers()
    if name not in managers:
      raise cli.BadInput(f'unknown checkpoint {name!r}; choose one of best, '
                         f'{", ".join(managers)}')
    step = managers[name].latest_step()
    if step is None:
      raise FileNotFoundError(
          f'no {name!r} checkpoint in {self.workdir}; found: '
          f'{", ".join(self.names()) or "none (train first)"}')
    return managers[name], step

  def step_dir(self, name: str) -> Path | None:
    """The folder of the newest step of checkpoint `name`, or None."""
    manager = self._managers().get(self.resolve(name))
    step = manager.latest_step() if manager is not None else None
    return None if step is None else Path(manager.directory) / str(step)

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
        # Steps from a run that went further before it was resumed from an
        # earlier step: this run computes them again.
        for stale in [s for s in manager.all_steps() if s >= step]:
          log.info('replacing best_%s step %d, saved before the run was '
                   'resumed from an earlier step', m, stale)
          manager.delete(stale)
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state)), force=True)
        manager.wait_until_finished()

  # -- reading ----------------------------------------------------------------

  def _restore(self, manager: ocp.CheckpointManager, step: int,
               items: Mapping[str, Any], *, whole: bool = False):
    """Restores `items` of `step`; raises DamagedCheckpoint when a file of
    them (or with `whole`, of the step's own metadata) is damaged."""
    path = Path(manager.directory) / str(step)
    found = damage(path, tuple(items), step_metadata=whole)
    if found is None:
      try:
        return manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        found = damage_in(e, path)
        if found is None:
          raise
        # The reads Orbax had started are dropped unfinished; Python warns
        # about each when it collects them.
        warnings.filterwarnings('ignore', category=RuntimeWarning,
                                message="coroutine '.*' was never awaited")
        raise DamagedCheckpoint.found(path, *found) from e
    raise DamagedCheckpoint.found(path, *found)

  def restore_latest(self, abstract, streams: Mapping[str, Any]):
    """(state, step) of the newest intact 'latest' step with the streams
    restored in place, or (None, 0) when there is none.

    Damaged steps are skipped with one warning; a writable run removes them
    (training writes those steps again), a read-only one leaves them."""
    steps = sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      return None, 0
    fresh = {name: it.get_state() for name, it in streams.items()}
    damaged = []
    restored, step = None, 0
    for candidate in steps:
      items = {'state': ocp.args.StandardRestore(abstract),
               'meta': ocp.args.JsonRestore()}
      items.update({name: grain.checkpoint.CheckpointRestore(it)
                    for name, it in streams.items()})
      try:
        # Resuming needs the whole step; evaluating only its state.
        restored = self._restore(self.latest, candidate, items, whole=True)
      except DamagedCheckpoint as e:
        damaged.append((candidate, e))
        continue
      step = int(candidate)
      break
    if restored is None:  # a failed restore may have moved the iterators
      for name, it in streams.items():
        it.set_state(fresh[name])
    if damaged:
      self._drop_damaged(damaged, step)
    if restored is None:
      return None, 0
    self.best_values.update(restored['meta']['best_values'])
    return restored['state'], step

  def _drop_damaged(self, damaged: Sequence[tuple[int, DamagedCheckpoint]],
                    resumed: int) -> None:
    """Removes damaged 'latest' steps (unless read-only), with one warning."""
    if not self.read_only:
      for step, _ in damaged:
        self.latest.delete(step)
    what = ', '.join(f'{e.step_dir} ({e.inside()})' for _, e in damaged)
    several = len(damaged) > 1
    kept = ('left in place (read-only)' if self.read_only else
            'were removed' if several else 'was removed')
    then = (f'resuming from step {resumed} in '
            f'{Path(self.latest.directory) / str(resumed)}' if resumed else
            'no intact checkpoint is left: starting from step 0')
    log.warning('checkpoint folder%s %s %s damaged and %s; %s',
                's' if several else '', what, 'are' if several else 'is',
                kept, then)

  def method_state_shapes(self, name: str) -> Any:
    """Shapes of the method state saved in checkpoint `name`, read from the
    checkpoint's metadata: what restoring needs without the method. Empty
    when the checkpoint is missing or damaged (`load` says which)."""
    path = self.step_dir(name)
    if path is None or damage(path) is not None:
      return {}
    try:
      metadata = ocp.StandardCheckpointer().metadata(
          path / 'state').item_metadata
    except Exception as e:  # pylint: disable=broad-except
      if damage_in(e, path) is None:
        raise
      return {}
    if metadata is None:  # Orbax could not read it (and logged why)
      return {}
    tree = dict(getattr(metadata, 'tree', metadata))
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        tree.get('method_state', {}))

  def load(self, name: str, abstract):
    """The state saved as `name` ('latest', 'best', 'best_<metric>').

    Raises DamagedCheckpoint naming the damaged file and the checkpoints
    of the run that are intact."""
    name = self.resolve(name)
    manager, step = self._newest(name)
    items = {'state': ocp.args.StandardRestore(abstract)}
    try:
      return self._restore(manager, step, items)['state']
    except DamagedCheckpoint as e:
      intact = [f'{other} (step {self._newest(other)[1]})'
                for other in self.names()
                if other != name and self._intact(other, abstract)]
      raise DamagedCheckpoint(
          f'checkpoint {name!r} (step {step}) of {self.workdir} is damaged: '
          f'{e}. Intact checkpoints: '
          + (f'{", ".join(intact)} (choose one with --checkpoint)' if intact
             else 'none (train again)'),
          step_dir=e.step_dir, where=e.where, why=e.why) from e.__cause__

  def _intact(self, name: str, abstract) -> bool:
    """Whether the state of checkpoint `name` restores."""
    shapes = self.method_state_shapes(name)
    if hasattr(abstract, 'method_state') and hasattr(abstract, 'replace'):
      sharding = getattr(jax.tree.leaves(abstract)[0], 'sharding', None)
      abstract = abstract.replace(method_state=jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
          shapes))
    manager, step = self._newest(name)
    try:
      self._restore(manager, step,
                    {'state': ocp.args.StandardRestore(abstract)})
    except Exception:  # pylint: disable=broad-except
      return False
    return True


def abstract_of(state) -> Any:
  """Shapes, dtypes and shardings of a state, for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
