"""Writing outputs so that a failure never damages what was there.

A folder is made in a sibling `<name>.partial-<pid>` and moved into place in
one rename (`new_partial`, `publish`); a file is written to a hidden sibling
`.<name>.tmp-<pid>` and renamed over the old one (`write_text`,
`write_with`). A process that stops at any moment, by an error, Ctrl-C or
kill -9, leaves the previous output as it was plus, at worst, its partial
folder or temporary file; the next run removes those (`clean_stale`) once no
live process can own them, and never one of a live process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from koajax import cli

log = logging.getLogger(__name__)

PARTIAL = 'partial'  # <name>.partial-<pid>: a folder being made
_REPLACED = 'replaced'  # <name>.replaced-<pid>: the folder being replaced
# Seconds of slack between a process's start time and the time a folder it
# made was last changed (the boot time in /proc has one-second resolution).
_CLOCK_SLACK = 2.0


def real_target(target: str | os.PathLike) -> Path:
  """`target`, or where it points if it is a symbolic link: the folder that
  is replaced, with its partial folder beside it on the same filesystem."""
  target = Path(target)
  return Path(os.path.realpath(target)) if target.is_symlink() else target


def partial_path(target: Path, pid: int | None = None,
                 kind: str = PARTIAL) -> Path:
  return target.with_name(f'{target.name}.{kind}-{pid or os.getpid()}')


def _start_time(pid: int) -> tuple[str, float] | None:
  """(state, start time in seconds since the epoch) of a Linux process."""
  try:
    stat = Path(f'/proc/{pid}/stat').read_text()
    boot = next(float(line.split()[1]) for line in
                Path('/proc/stat').read_text().splitlines()
                if line.startswith('btime '))
    fields = stat[stat.rfind(')') + 2:].split()
    return fields[0], boot + int(fields[19]) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def owner_alive(pid: int, changed: float) -> bool:
  """Whether process `pid` runs and may own something last changed at
  `changed` (seconds since the epoch).

  A zombie is not alive, and neither is a process that started after the
  change (its pid was reused). When in doubt, the process is alive.
  """
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. PermissionError: another user's live process
    return True
  started = _start_time(pid)
  if started is None:
    return True
  state, start = started
  return state != 'Z' and start <= changed + _CLOCK_SLACK


def _rmtree(path: Path, attempts: int = 5) -> None:
  """Removes a folder; another process removing it at the same time, or a
  leftover worker of a stopped run finishing a file in it, is fine."""
  for _ in range(attempts - 1):
    shutil.rmtree(path, ignore_errors=True)
    if not (path.exists() or path.is_symlink()):
      return
    time.sleep(0.1)
  try:
    shutil.rmtree(path)  # raises the real error
  except FileNotFoundError:
    pass


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    _rmtree(path)
  else:
    path.unlink(missing_ok=True)


def clean_stale(target: str | os.PathLike) -> list[str]:
  """Removes what dead processes left while writing `target`.

  That is `<target>.partial-<pid>` folders, `.<target>.tmp-<pid>` files, and
  `<target>.replaced-<pid>` (an output that was being replaced: it is put
  back if nothing took its place, else removed). Leftovers of live processes
  are not touched.

  Returns:
    The names of what was removed or restored.
  """
  target = Path(target)
  parent = target.parent
  if not parent.is_dir():
    return []
  name = re.escape(target.name)
  pattern = re.compile(
      rf'^(?:{name}\.(?P<kind>{PARTIAL}|{_REPLACED})|\.{name}\.tmp)-'
      rf'(?P<pid>\d+)$')
  found = []
  with contextlib.suppress(OSError):
    for entry in os.scandir(parent):
      match = pattern.match(entry.name)
      if match:
        found.append((match['kind'] != _REPLACED, entry.name,
                      int(match['pid'])))
  done = []
  for _, entry_name, pid in sorted(found):  # replaced folders first
    path = parent / entry_name
    try:
      changed = path.lstat().st_mtime
    except FileNotFoundError:
      continue
    if pid == os.getpid() or owner_alive(pid, changed):
      continue
    if entry_name.startswith(f'{target.name}.{_REPLACED}-') and not (
        target.exists() or target.is_symlink()):
      os.rename(path, target)
      log.warning('restored %s, which process %d was replacing when it '
                  'stopped', target.name, pid)
    else:
      _remove(path)
      log.info('removed %s, left by process %d, which has stopped',
               entry_name, pid)
    done.append(entry_name)
  return done


def new_partial(target: str | os.PathLike) -> Path:
  """A new empty folder `<target>.partial-<this pid>` to fill and `publish`."""
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = partial_path(target)
  if partial.exists() or partial.is_symlink():
    # Left by an earlier process that had this process's id (pids repeat,
    # e.g. in containers): this process has not made it yet.
    _remove(partial)
  partial.mkdir()
  return partial


def _exchange(a: Path, b: Path) -> bool:
  """Swaps two paths in one step (Linux renameat2); False where unsupported."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
               rename_exchange) == 0:
    return True
  error = ctypes.get_errno()
  if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
    return False  # a filesystem or kernel without the exchange
  raise OSError(error, os.strerror(error), str(b))


def publish(partial: str | os.PathLike, target: str | os.PathLike) -> None:
  """Puts the finished folder `partial` at `target` in one step.

  Whatever folder was at `target` stays there, whole, until the step, and is
  removed after it.
  """
  partial, target = Path(partial), Path(target)
  cli.raise_if_interrupted()
  try:
    os.rename(partial, target)  # no target, or an empty folder
    return
  except OSError as e:
    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
      raise
  if _exchange(partial, target):
    _rmtree(partial)  # now the old folder
    return
  # Two renames: a process killed between them leaves <target>.replaced-<pid>,
  # which `clean_stale` puts back.
  old = partial_path(target, kind=_REPLACED)
  os.rename(target, old)
  os.rename(partial, target)
  _rmtree(old)


def discard(partial: str | os.PathLike) -> None:
  """Removes a partial folder that will not be published."""
  _remove(Path(partial))


def discard_own(target: str | os.PathLike) -> None:
  """Removes this process's partial folder of `target`, if there is one.

  For `except` clauses: Ctrl-C can stop a process between making the folder
  and keeping a reference to it, but its name is known.
  """
  partial = partial_path(real_target(target))
  if partial.exists() or partial.is_symlink():
    _remove(partial)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
  clean_stale(path)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  try:
    yield tmp
    cli.raise_if_interrupted()
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_with(path: str | os.PathLike, write: Callable[[Path], object]
               ) -> Path:
  """Calls `write(tmp)` and renames tmp to `path`: the old file at `path`
  stays whole until the new one is complete."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with _temporary(path) as tmp:
    write(tmp)
  return path


def write_text(path: str | os.PathLike, text: str) -> Path:
  return write_with(path, lambda tmp: tmp.write_text(text, encoding='utf-8'))
