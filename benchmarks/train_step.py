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

On a GPU host both sides run on the GPU (PyTorch on cuda unless
--torch_device says otherwise); timing waits for each step to finish.

Results print as a Markdown table and go to --out as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import summary, time_steps, torch_device, write_json  # noqa: E402  (benchmarks/machine.py)
from koajax_step import CompiledStep  # noqa: E402

_METHODS = flags.DEFINE_list('methods', ['supervised', 'semixup'],
                             'Methods to time.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Labeled knees per step.')
_WIDTH = flags.DEFINE_integer('width', 32, 'Network width (paper: 32).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternated rounds.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 32, 'CPU devices for koajax (koajax.runtime); the mesh '
    'uses the largest count dividing the batch.')
_TORCH = flags.DEFINE_bool('torch', True, 'Time the PyTorch reference.')
_TORCH_DEVICE = flags.DEFINE_string(
    'torch_device', 'auto', "PyTorch's device; auto: cuda when available.")
_OUT = flags.DEFINE_string('out', None, 'JSON results file.')


def koajax_step(method: str, batch_size: int, width: int) -> CompiledStep:
  """The trainer's step for `method` on random uint8 knees, compiled once."""
  import jax
  import numpy as np
  from koajax import config_lib, methods, tasks

  semixup = config_lib.load_sibling(
      'semixup', os.path.join(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__))), 'configs', 'semixup.py'))
  config = semixup.family_config(method, None)
  config.model.width = width
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

  return CompiledStep(config, task, method_obj, make_batch,
                      batch_size=batch_size)


class TorchStep:

  def __init__(self, method: str, batch_size: int, width: int, device: str):
    import torch_reference
    self.step = torch_reference.Step(method, width, device=device)
    self.batch = torch_reference.make_batch(method, batch_size, device=device)
    start = time.perf_counter()
    self.step(self.batch)
    self.first_step_s = time.perf_counter() - start

  def __call__(self) -> None:
    self.step(self.batch)


def main(argv):
  del argv
  from koajax import runtime
  runtime.configure_cpu_devices(_CPU_DEVICES.value)

  results = []
  for method in _METHODS.value:
    ours = koajax_step(method, _BATCH.value, _WIDTH.value)
    ref = (TorchStep(method, _BATCH.value, _WIDTH.value, torch_device(_TORCH_DEVICE.value))
           if _TORCH.value else None)
    times = {'koajax': [], 'torch': []}
    for _ in range(_ROUNDS.value):
      times['koajax'] += time_steps(ours, _STEPS.value)
      if ref is not None:
        times['torch'] += time_steps(ref, _STEPS.value)
    row = {'method': method, 'batch_size': _BATCH.value,
           'width': _WIDTH.value, 'mesh_devices': ours.mesh.size,
           'koajax_compile_s': ours.compile_s,
           'koajax_step_s': times['koajax']}
    if ref is not None:
      import torch
      row.update(torch_first_step_s=ref.first_step_s,
                 torch_step_s=times['torch'], torch_version=torch.__version__,
                 torch_device=torch_device(_TORCH_DEVICE.value),
                 torch_threads=torch.get_num_threads())
    results.append(row)
    print(json.dumps(row), flush=True)

  print(f'\n{summary()}\n')
  print('| step | batch | koajax s/step | koajax knees/s | koajax compile s '
        '| PyTorch s/step | PyTorch knees/s | koajax / PyTorch |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    ours = statistics.median(r['koajax_step_s'])
    line = (f"| {r['method']} | {r['batch_size']} | {ours:.2f} "
            f"| {r['batch_size'] / ours:.2f} | {r['koajax_compile_s']:.1f} ")
    if 'torch_step_s' in r:
      theirs = statistics.median(r['torch_step_s'])
      line += (f"| {theirs:.2f} | {r['batch_size'] / theirs:.2f} "
               f"| {theirs / ours:.2f}x |")
    else:
      line += '| | | |'
    print(line)
  write_json(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)
