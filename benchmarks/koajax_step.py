"""The trainer's jitted step on one fixed batch, compiled once: the koajax
side of the train-step benchmarks."""

from __future__ import annotations

import functools
import time
from typing import Any


def step_flops(compiled, devices: int) -> float | None:
  """XLA's floating-point operation count of a compiled program, summed
  over the `devices` that each run their partition of it."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) * devices if flops else None


class CompiledStep:
  """`koajax.train.step.train_step` of `config`'s model and `method` on
  `make_batch(data_sharding)`, replicated state, compiled ahead of time
  (`compile_s`); calling it runs one step and waits for it. `flops` is
  XLA's count of the floating-point operations of one step over the whole
  mesh (None where the backend gives no cost analysis)."""

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
      self.compiled = step.lower(self.state, self.batch, self.key,
                                 self.steps_per_epoch).compile()
    self.compile_s = time.perf_counter() - start
    self.flops = step_flops(self.compiled, self.mesh.size)
    self._block = jax.block_until_ready

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, self.batch, self.key,
                                        self.steps_per_epoch)
    self._block(metrics)
