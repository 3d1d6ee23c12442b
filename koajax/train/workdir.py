"""A workdir holds one run: the same run resumes, any other is refused.

A rerun in a workdir goes on from its checkpoints, so it must be the run that
wrote them: same method, model, data, split, optimiser and seed. `claim`
compares the new config with the saved `config.json` before anything is
written and refuses a different run, naming the fields that differ. Fields
that cannot change the result (logging, workers, caches) may always differ;
a few may change on purpose when resuming (more epochs, a new evaluation
interval) when named in `config.resume_changed`.

`claim` also takes an exclusive lock on the workdir for this process: a
second process starting there is refused. The lock is an OS file lock
(`fcntl.flock`), so a job killed with kill -9 leaves nothing stuck.
"""

from __future__ import annotations

from collections.abc import Mapping
import fcntl
import json
import os
from pathlib import Path
import threading
import time
from typing import Any

import jax
import ml_collections

from koajax import cli
from koajax import config_lib

LOCK_FILE = '.koajax.lock'

# Fields that never change what a run computes: they may differ freely.
HARMLESS = ('log_every_steps', 'progress_bar', 'data_workers', 'cpu_devices',
            'compilation_cache', 'eval_batch_size', 'data.workers',
            'data.root', 'resume_changed')
# Fields that change the result but may be changed on resume when named in
# config.resume_changed: the run goes on with the new value.
RESUMABLE = ('num_epochs', 'eval_every_epochs', 'bootstrap_resamples',
             'predict.tta', 'predict.tta_crop', 'predict.ensemble',
             'predict.crop')

# What koajax writes into a training or active-learning workdir; a workdir
# without config.json holding anything else is someone else's folder.
# (sets.json: an active-learning round's knees, written before its run.)
_RUN_FILES = (config_lib.CONFIG_JSON, LOCK_FILE, 'splits.npz', 'plan.json',
              'checkpoints', 'tensorboard', 'metrics.jsonl', 'sets.json')



def _made_by_koajax(name: str) -> bool:
  """Whether a file or folder name is one a run writes before its
  config.json (a run stopped early leaves these)."""
  return (name in _RUN_FILES or name.startswith('best_')
          or any(name.startswith(f'{f}.tmp') for f in _RUN_FILES))


_held: dict[Path, int] = {}
_held_lock = threading.Lock()


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} of a nested mapping, values as JSON would hold them."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, f'{name}.'))
    else:
      out[name] = json.loads(json.dumps(value, default=str))
  return out


def _resume_changed(config: ml_collections.ConfigDict) -> set[str]:
  fields = {f.strip() for f in str(config.get('resume_changed', '')).split(',')
            if f.strip()}
  wrong = sorted(f for f in fields if not any(
      f == r or r.startswith(f'{f}.') for r in RESUMABLE))
  if wrong:
    raise cli.BadInput(
        f'config field resume_changed names {", ".join(wrong)}, which cannot '
        f'change on resume; fields that may: {", ".join(RESUMABLE)}')
  return fields


def _allowed(field: str, names: set[str]) -> bool:
  return any(field == n or field.startswith(f'{n}.') for n in names)


def differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict
                ) -> list[tuple[str, Any, Any]]:
  """(field, saved value, new value) for every field that differs and that
  changes the result.

  Settings the run adapted to its data (`koajax.train.plan`) are compared
  as the config gave them.
  """
  saved = dict(saved)
  adapted = saved.pop('adapted', None) or []
  old = flatten(saved)
  for a in adapted:
    old[a['field']] = a['given']
  new = {k: v for k, v in flatten(json.loads(config.to_json_best_effort()))
         .items() if k != 'adapted'}
  changed = []
  for field in sorted(set(old) | set(new)):
    if _allowed(field, set(HARMLESS)):
      continue
    a, b = old.get(field, '<absent>'), new.get(field, '<absent>')
    if a != b:
      changed.append((field, a, b))
  return changed


def check_same_run(workdir: str | Path,
                   config: ml_collections.ConfigDict) -> bool:
  """Raises BadInput unless `workdir` is empty, new or holds this run;
  returns whether a run is already there."""
  workdir = Path(workdir)
  allowed = _resume_changed(config)
  saved_path = workdir / config_lib.CONFIG_JSON
  if not saved_path.is_file():
    others = sorted(p.name for p in workdir.iterdir()
                    if not _made_by_koajax(p.name)) if workdir.is_dir() else []
    if others:
      raise cli.BadInput(
          f'{workdir} holds files that are not a koajax run ('
          f'{", ".join(others[:3])}{", ..." if len(others) > 3 else ""}); '
          'give a new or empty --workdir')
    return False
  try:
    saved = json.loads(saved_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise cli.BadInput(
        f'{saved_path} is damaged ({cli.message(e)}); the run in {workdir} '
        'cannot be checked: give a new --workdir') from e
  changed = [d for d in differences(saved, config)
             if not _allowed(d[0], allowed)]
  if not changed:
    return True
  if any(f == 'method' for f, _, _ in changed):  # its options differ too
    changed = [d for d in changed if not d[0].startswith('method_kwargs')]
  shown = '; '.join(f'{f}: {a!r} in the run, {b!r} now'
                    for f, a, b in changed[:4])
  more = f' and {len(changed) - 4} more' if len(changed) > 4 else ''
  resumable = [f for f, _, _ in changed if _allowed(f, set(RESUMABLE))]
  hint = ('give a new --workdir for another run'
          + (f', or --config.resume_changed={",".join(resumable)} to go on '
             'with the new value' if len(resumable) == len(changed) else ''))
  raise cli.BadInput(f'{workdir} holds another run ({shown}{more}); {hint}')


def lock(workdir: str | Path) -> None:
  """Holds `workdir` for this process until it exits (or `release`).

  Raises BadInput when another live process holds it.
  """
  workdir = Path(workdir).absolute()
  with _held_lock:
    if workdir in _held:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors='replace').strip()
      os.close(fd)
      raise cli.BadInput(
          f'{workdir} is in use by another koajax process ({holder or "pid ?"}'
          '); wait for it to finish or give another --workdir') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} since {time.strftime("%Y-%m-%d %H:%M:%S")}'
              .encode(), 0)
    _held[workdir] = fd


def release(workdir: str | Path) -> None:
  """Lets other processes use `workdir` again."""
  workdir = Path(workdir).absolute()
  with _held_lock:
    fd = _held.pop(workdir, None)
  if fd is not None:
    os.close(fd)  # closing drops the flock


def claim(workdir: str | Path, config: ml_collections.ConfigDict) -> bool:
  """Locks `workdir` (process 0 of a run) and checks that it holds no other
  run; returns whether it holds this one already (a resume)."""
  if jax.process_index() == 0:
    lock(workdir)
  return check_same_run(workdir, config)


def write_config(workdir: str | Path,
                 config: ml_collections.ConfigDict) -> None:
  """Saves `config` as the run's config.json, atomically."""
  path = Path(workdir) / config_lib.CONFIG_JSON
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
  tmp.write_text(config.to_json_best_effort(indent=1))
  os.replace(tmp, path)
