"""The trainer's jitted step on one fixed batch, compiled once: the koajax
side of the train-step benchmarks."""

from __future__ import annotations

import functools
import os
import time
from typing import Any


def step_flops(lowered) -> float | None:
  """XLA's floating-point operation count of a lowered program, over the
  whole mesh.

  Counted on the program as lowered, before XLA optimises and partitions
  it: there every convolution and matrix product is still an HLO op. The
  compiled program's count misses them on a GPU, where they become cuDNN
  and cuBLAS calls (an H200 run counted 44 GFLOP for a Semixup step whose
  lowered program has 2,629).
  """
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops else None


class CompiledStep:
  """`koajax.train.step.train_step` of `config`'s model and `method` on
  `make_batch(data_sharding)`, replicated state, compiled ahead of time
  (`compile_s`); calling it runs one step and waits for it. `flops` is
  XLA's count of the floating-point operations of one step over the whole
  mesh (`step_flops`; None where JAX gives no cost analysis)."""

  def __init__(self, config, task, method, make_batch, *, batch_size: int,
               method_state: Any = None):
    import jax
    from koajax import runtime
    from koajax.train import step as step_lib

    self.mesh = runtime.data_mesh(batch_size)
    rep = jax.NamedSharding(self.mesh, jax.P())
    data = jax.NamedSharding(self.mesh, jax.P('data'))
    with jax.set_mesh(self.mesh):
      graphdef, tx, self.state = step_lib.create_state(
          config, task, jax.random.key(0), method_state, sharding=rep)
    self.batch = make_batch(data)
    self.key = jax.random.key(1)
    step = jax.jit(functools.partial(
        step_lib.train_step, graphdef=graphdef, tx=tx, method=method,
        lr_scale=step_lib.epoch_lr_scale(config.optimizer)),
        donate_argnums=0)
    self.steps_per_epoch = 100
    start = time.perf_counter()
    with jax.set_mesh(self.mesh):
      lowered = step.lower(self.state, self.batch, self.key,
                           self.steps_per_epoch)
      self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.flops = step_flops(lowered)
    self._block = jax.block_until_ready

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, self.batch, self.key,
                                        self.steps_per_epoch)
    self._block(metrics)

  def trace(self, folder: str, steps: int) -> None:
    """A jax.profiler trace of `steps` calls into `folder` (for the
    device's top ops, idle gaps and host time)."""
    import jax
    self()  # nothing of the first call's set-up in the trace
    with jax.profiler.trace(folder):
      for _ in range(steps):
        self()
    with open(os.path.join(folder, 'steps.txt'), 'w') as f:
      f.write(f'{steps}\n')
