"""Scalars to JSON lines and to TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricWriter:
  """Writes WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tensorboard.

  Only one process of a multi-process run should write (`enabled`).
  """

  def __init__(self, workdir: str | Path, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    workdir = Path(workdir)
    self._jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
    self._tb = SummaryWriter(str(workdir / 'tensorboard'))

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
