"""How every koajax command ends: exit codes and one-line errors.

  0    done
  1    failed (a bug or a failure koajax could not foresee)
  2    bad input: a file, row, flag or config field the user can fix
  130  interrupted (Ctrl-C)

A failure prints one line naming what is wrong and what to do; for a
failure that is not bad input the traceback goes to a file named on that
line. `--verbose` (accepted by every command) prints the traceback
instead. Commands run their `main` through
`run` (argparse) or `run_absl` (absl flags).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
import os
from pathlib import Path
import signal
import sys
import threading
import tempfile
import time
import traceback
from typing import Any

OK = 0
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130

VERBOSE_FLAG = '--verbose'

_PACKAGE_DIR = Path(__file__).resolve().parent
_CONFIGS_DIR = _PACKAGE_DIR.parent / 'configs'


class BadInput(ValueError):
  """Something the user gave that koajax cannot use; the message says which
  file, row or field, and what to do."""


def _raised_by_koajax(error: BaseException) -> bool:
  """Whether the innermost frame of `error` is koajax's own code or a config
  file: its ValueErrors are checks of the user's input, whereas one from
  inside a library is a failure."""
  frames = traceback.extract_tb(error.__traceback__)
  if not frames:
    return False
  path = Path(frames[-1].filename).resolve()
  return (path.is_relative_to(_PACKAGE_DIR) or path.parent.name == 'configs'
          ) and path != Path(__file__).resolve()


def exit_code(error: BaseException) -> int:
  """The exit code of a command that stopped with `error`."""
  if isinstance(error, KeyboardInterrupt):
    return INTERRUPTED
  from koajax.data import dicom_io  # pylint: disable=g-import-not-at-top
  if isinstance(error, (BadInput, dicom_io.InputError, FileNotFoundError,
                        NotADirectoryError, IsADirectoryError)):
    return BAD_INPUT
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    from absl import app  # pylint: disable=g-import-not-at-top
    if isinstance(error, (flags.Error, app.UsageError)):
      return BAD_INPUT
  except ImportError:
    pass
  if isinstance(error, (ValueError, KeyError)) and _raised_by_koajax(error):
    return BAD_INPUT
  return FAILED


def message(error: BaseException) -> str:
  """`error` as one line."""
  text = ' '.join(str(error).split()) if str(error) else ''
  if isinstance(error, KeyError) and text.startswith(("'", '"')):
    text = text[1:-1]
  return text or type(error).__name__


def _traceback_file(program: str, error: BaseException) -> Path | None:
  """Writes the traceback of `error` to a file and returns its path."""
  try:
    directory = Path(tempfile.gettempdir()) / 'koajax-errors'
    directory.mkdir(parents=True, exist_ok=True)
    name = f'{program.replace(" ", "_").replace(".", "_")}-' \
           f'{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}.txt'
    path = directory / name
    path.write_text(''.join(traceback.format_exception(error)))
    return path
  except OSError:
    return None


def pop_verbose(argv: list[str]) -> bool:
  """Removes `--verbose` from `argv` in place; whether it was there."""
  found = False
  for flag in (VERBOSE_FLAG, '--verbose=true', '--verbose=True'):
    while flag in argv:
      argv.remove(flag)
      found = True
  return found or os.environ.get('KOAJAX_VERBOSE', '') not in ('', '0')


def report_failure(program: str, error: BaseException, verbose: bool) -> int:
  """Prints `error` as koajax's one line (and the traceback where asked);
  returns the exit code."""
  code = exit_code(error)
  if code == INTERRUPTED:
    print(f'{program}: interrupted', file=sys.stderr)
    return code
  if verbose:
    traceback.print_exception(error, file=sys.stderr)
    hint = ''
  elif code == BAD_INPUT:  # the message says what to fix
    hint = ''
  else:
    path = _traceback_file(program, error)
    hint = f' (traceback: {path}; --verbose prints it)' if path else ''
  kind = 'error' if code == BAD_INPUT else 'failed'
  print(f'{program}: {kind}: {message(error)}{hint}', file=sys.stderr)
  return code


_interrupted = False


def _on_interrupt(signum, frame):
  global _interrupted
  _interrupted = True
  signal.default_int_handler(signum, frame)


def raise_if_interrupted() -> None:
  """Raises KeyboardInterrupt if Ctrl-C came while a command ran, even if
  the KeyboardInterrupt it raised was lost: Python drops an exception raised
  in a weakref callback (the import system runs some), so a Ctrl-C that
  lands there would otherwise let the command finish and write its output.
  Called before an output replaces what was there."""
  if _interrupted:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_recorded():
  """Ctrl-C raises KeyboardInterrupt as usual and is also remembered."""
  global _interrupted
  _interrupted = False
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield  # a handler someone else chose stays
    return
  signal.signal(signal.SIGINT, _on_interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def call(program: str, main: Callable[..., Any], *args: Any,
         verbose: bool = False) -> int:
  """main(*args) as an exit code: its own int, else 0; errors as
  `report_failure` prints them."""
  try:
    with _interrupts_recorded():
      result = main(*args)
  except SystemExit as e:  # argparse's usage errors and explicit exits
    return e.code if isinstance(e.code, int) else (FAILED if e.code else OK)
  except BaseException as e:  # pylint: disable=broad-except
    return report_failure(program, e, verbose)
  return result if isinstance(result, int) and not isinstance(result, bool) \
      else OK


def run(program: str, main: Callable[[Sequence[str]], Any],
        argv: Sequence[str] | None = None) -> None:
  """Runs an argparse command `main(argv)` and exits with its code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = pop_verbose(argv)
  sys.exit(call(program, main, argv, verbose=verbose))


def run_absl(program: str, main: Callable[[list[str]], Any]) -> None:
  """Runs an absl command: flags parsed by absl, errors in parsing (a bad
  flag, a config file that fails its checks) and in `main` reported as one
  line with koajax's exit codes."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  verbose = pop_verbose(sys.argv)

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
      for name in flags.FLAGS:  # a config file that failed to load says so
        value = flags.FLAGS[name].value
        if type(value).__name__ == '_ErrorConfig':
          value.job  # pylint: disable=pointless-statement
      return rest
    except SystemExit:  # --help and friends print, then exit 0 (absl: 1)
      if set(argv) & {'--help', '-h', '-?', '--helpfull', '--helpshort',
                      '--helpxml'}:
        sys.exit(OK)
      raise
    except BaseException as e:  # pylint: disable=broad-except
      # Everything here is the command line's fault: an unknown flag or
      # config field, a bad value, a config file that refused its values.
      print(f'{program}: error: {_flag_message(e)} (--help lists the flags)',
            file=sys.stderr)
      if verbose:
        traceback.print_exception(e, file=sys.stderr)
      sys.exit(BAD_INPUT)

  def wrapped(argv):
    if len(argv) > 1:
      return report_failure(program, app.UsageError(
          f'unexpected arguments {argv[1:]}; flags are --name=value'),
                            verbose)
    return call(program, main, argv, verbose=verbose)

  app.run(wrapped, flags_parser=parse)


def _flag_message(error: BaseException) -> str:
  """One line for an error raised while parsing flags and config files."""
  if isinstance(error, AttributeError) and isinstance(error.__context__,
                                                      KeyError):
    raw = str(error.__context__.args[0] if error.__context__.args else '')
    field, _, suggestion = raw.partition('\n')
    return (f'the config has no field {field}'
            + (f' ({suggestion.strip()})' if suggestion.strip() else '')
            + '; check the spelling after --config.')
  text = str(error)
  if 'Failed loading config file' in text:
    return (f'cannot load the config file {text.rsplit(": ", 1)[-1]}: it '
            'does not exist or does not import (paths are relative to the '
            'current directory)')
  if 'Traceback (most recent call last)' in text:
    # ml_collections puts the config file's traceback in the message; its
    # last line is the config's own error.
    last = [line for line in text.splitlines() if line.strip()][-1]
    text = last.split(': ', 1)[1] if ': ' in last else last
    flag = str(error).split(':', 1)[0] if str(error).startswith('flag ') \
        else ''
    return f'{flag}: {text}' if flag else text
  return message(error)
