"""Scalars to JSON lines and to TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_JSONL = 'metrics.jsonl'


def _step_of(line: bytes) -> int | None:
  """The step of one complete metrics.jsonl line, or None when it is not a
  record (a line cut short by a kill, or text that is not ours)."""
  if not line.endswith(b'\n'):
    return None
  try:
    record = json.loads(line)
    return int(record['step'])
  except (ValueError, TypeError, KeyError):
    return None


def truncate_log(path: str | Path, start_step: int) -> int:
  """Drops the records of `path` logged after `start_step` (a resumed run
  logs them again) and a last line cut short; the lines kept stay
  byte-identical. The file is replaced atomically, and only if something
  is dropped. Returns the number of lines dropped."""
  path = Path(path)
  try:
    lines = path.read_bytes().splitlines(keepends=True)
  except FileNotFoundError:
    return 0
  kept = []
  for line in lines:
    step = _step_of(line)
    if step is not None and step <= start_step:
      kept.append(line)
  dropped = len(lines) - len(kept)
  if dropped:
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info('%s: dropped %d line(s) after step %d, logged again from there',
             path, dropped, start_step)
  return dropped


class MetricWriter:
  """Writes WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tensorboard.

  A run resumed from step `start_step` (0: a fresh run) logs the steps after
  it again: the writer first drops them from metrics.jsonl, so each step is
  there once, and TensorBoard hides the earlier events after it
  (`purge_step`). Only one process of a multi-process run should write
  (`enabled`).
  """

  def __init__(self, workdir: str | Path, *, start_step: int = 0,
               enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    workdir = Path(workdir)
    truncate_log(workdir / METRICS_JSONL, start_step)
    self._jsonl = open(workdir / METRICS_JSONL, 'a', encoding='utf-8')
    self._tb = SummaryWriter(
        str(workdir / 'tensorboard'),
        purge_step=start_step + 1 if start_step > 0 else None)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
