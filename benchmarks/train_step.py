r"""Train-step throughput of koajax against a PyTorch reference, alternated.

For each method (SL and Semixup by default) this times one optimiser step of
the Semixup network at the paper's width:
  * koajax: the trainer's own jitted step (`koajax.train.step.train_step`
    with the method of `koajax.methods`), batch sharded over the data mesh the trainer
    would use, on-device augmentation of uint8 images included;
  * PyTorch: the same network and loss in eager PyTorch
    (`benchmarks/torch_reference.py`) on already-augmented float batches.
Rounds alternate koajax and PyTorch so that both see the same machine
state; each round times `--steps` steps after one untimed warm-up step. The
compile time of koajax (trace + lower + compile) and the first, untimed step
of PyTorch are reported separately. knees/s counts labeled knees per step
(Semixup also draws as many unlabeled knees and runs 7 views per knee pair).

Run (CPU):
  pip install -e '.[bench]'
  python benchmarks/train_step.py                      # SL and Semixup
  python benchmarks/train_step.py --methods=supervised --cpu_devices=8
  # on a GPU (benchmarks/gpu.sh): both batch sizes, both precisions, and
  # torch.compile as the stronger PyTorch peer
  python benchmarks/train_step.py --batch_size=32,256 \
      --dtype=float32,bfloat16 --compile

On a GPU host both sides run on the GPU (PyTorch on cuda unless
--torch_device says otherwise); timing waits for each step to finish.
bfloat16 is koajax's `model.dtype` (bf16 convolutions, float32 parameters
and optimiser) against PyTorch's bf16 autocast. Each row also has XLA's
floating-point operation count of the koajax step (`koajax_flops`), from
which benchmarks/gpu_report.py computes the share of the device's peak.

Results print as a Markdown table and go to --out as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import step_rates, summary, time_steps, torch_device, write_json  # noqa: E402  (benchmarks/machine.py)
from koajax_step import CompiledStep  # noqa: E402

_METHODS = flags.DEFINE_list('methods', ['supervised', 'semixup'],
                             'Methods to time.')
_BATCH = flags.DEFINE_list('batch_size', ['32'],
                          'Labeled knees per step; one row per size.')
_DTYPE = flags.DEFINE_list('dtype', ['float32'],
                          'Compute precisions (float32, bfloat16).')
_WIDTH = flags.DEFINE_integer('width', 32, 'Network width (paper: 32).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternated rounds.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 32, 'CPU devices for koajax (koajax.runtime); the mesh '
    'uses the largest count dividing the batch.')
_TORCH = flags.DEFINE_bool('torch', True, 'Time the PyTorch reference.')
_COMPILE = flags.DEFINE_bool('compile', False,
                             'Also time the PyTorch step under torch.compile.')
_TORCH_DEVICE = flags.DEFINE_string(
    'torch_device', 'auto', "PyTorch's device; auto: cuda when available.")
_OUT = flags.DEFINE_string('out', None, 'JSON results file (rewritten '
                           'after each row, so a stopped run keeps its rows).')
_TRACE = flags.DEFINE_string(
    'trace', None, 'Folder for a jax.profiler trace of --steps koajax steps '
    'per row (one subfolder per row), taken after the timing.')


def koajax_step(method: str, batch_size: int, width: int,
                dtype: str) -> CompiledStep:
  """The trainer's step for `method` on random uint8 knees, compiled once."""
  import jax
  import numpy as np
  from koajax import config_lib, methods, tasks

  semixup = config_lib.load_sibling(
      'semixup', os.path.join(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__))), 'configs', 'semixup.py'))
  config = semixup.family_config(method, None)
  config.model.width = width
  config.model.dtype = dtype
  config.batch_size = batch_size
  task = tasks.from_config(config)
  method_obj = methods.from_config(config, task)
  rng = np.random.default_rng(0)

  def make_batch(data):
    def knees():
      kl = rng.integers(0, 5, batch_size, dtype=np.int32)
      return {'image': jax.device_put(rng.integers(
                  0, 256, (batch_size, 2, 128, 128), dtype=np.uint8), data),
              'labels': {'kl': jax.device_put(kl, data)}}
    return {name: knees() for name in method_obj.streams}

  step = CompiledStep(config, task, method_obj, make_batch,
                      batch_size=batch_size)
  # What the input pipeline must deliver per step: every stream's knees.
  step.knees_per_step = batch_size * len(method_obj.streams)
  return step


class TorchStep:
  """The reference step, eager or under torch.compile, with bf16 autocast
  for --dtype=bfloat16."""

  def __init__(self, method: str, batch_size: int, width: int, dtype: str,
               device: str, compile_step: bool = False):
    import torch
    import torch_reference
    self.step = torch_reference.Step(method, width, device=device)
    self.batch = torch_reference.make_batch(method, batch_size, device=device)
    self.autocast = torch.autocast(device.split(':')[0], dtype=torch.bfloat16,
                                   enabled=dtype == 'bfloat16')
    self.loss = (torch.compile(self.step.loss) if compile_step
                 else self.step.loss)
    start = time.perf_counter()
    self()
    self.first_step_s = time.perf_counter() - start

  def _autocast_loss(self, net, batch):
    with self.autocast:  # the forward only; backward follows its dtypes
      return self.loss(net, batch)

  def __call__(self) -> None:
    self.step(self.batch, loss=self._autocast_loss)


def time_row(method: str, batch_size: int, dtype: str,
             device: str | None) -> dict:
  """One result row: every side's step times, alternated over rounds."""
  ours = koajax_step(method, batch_size, _WIDTH.value, dtype)
  sides = {'koajax': ours}
  if device is not None:
    sides['torch'] = TorchStep(method, batch_size, _WIDTH.value, dtype, device)
    if _COMPILE.value:
      sides['torch_compile'] = TorchStep(method, batch_size, _WIDTH.value,
                                         dtype, device, compile_step=True)
  times = {name: [] for name in sides}
  for _ in range(_ROUNDS.value):
    for name, step in sides.items():
      times[name] += time_steps(step, _STEPS.value)
  if _TRACE.value:
    ours.trace(os.path.join(_TRACE.value, f'{method}_b{batch_size}_{dtype}'),
               _STEPS.value)
  row = {'method': method, 'batch_size': batch_size, 'dtype': dtype,
         'width': _WIDTH.value, 'mesh_devices': ours.mesh.size,
         'knees_per_step': ours.knees_per_step,
         'koajax_compile_s': ours.compile_s, 'koajax_flops': ours.flops,
         **{f'{name}_step_s': t for name, t in times.items()}}
  if device is not None:
    import torch
    row.update(torch_first_call_s=sides['torch'].first_step_s,
               torch_version=torch.__version__, torch_device=device,
               torch_threads=torch.get_num_threads())
    if 'torch_compile' in sides:
      row['torch_compile_first_call_s'] = sides['torch_compile'].first_step_s
  return row


def main(argv):
  del argv
  from koajax import runtime
  runtime.configure_cpu_devices(_CPU_DEVICES.value)

  results = []
  device = torch_device(_TORCH_DEVICE.value) if _TORCH.value else None
  for method in _METHODS.value:
    for batch_size in map(int, _BATCH.value):
      for dtype in _DTYPE.value:
        results.append(time_row(method, batch_size, dtype, device))
        print(json.dumps(results[-1]), flush=True)
        write_json(_OUT.value, results)

  print(f'\n{summary()}\n')
  print('| step | batch | dtype | koajax s/step | koajax knees/s | koajax '
        'compile s | PyTorch s/step | PyTorch knees/s | koajax / PyTorch '
        '| torch.compile knees/s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in results:
    rate = step_rates(r)
    cells = [r['method'], r['batch_size'], r['dtype'],
             f"{r['batch_size'] / rate['koajax']:.3f}", f"{rate['koajax']:.2f}",
             f"{r['koajax_compile_s']:.1f}"]
    if 'torch' in rate:
      cells += [f"{r['batch_size'] / rate['torch']:.3f}",
                f"{rate['torch']:.2f}",
                f"{rate['koajax'] / rate['torch']:.2f}x"]
    else:
      cells += ['', '', '']
    cells.append(f"{rate['torch_compile']:.2f}" if 'torch_compile' in rate
                 else '')
    print('| ' + ' | '.join(map(str, cells)) + ' |')


if __name__ == '__main__':
  app.run(main)
