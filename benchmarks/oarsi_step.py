r"""Multi-task OARSI train step: koajax against timm + PyTorch, alternated.

For each backbone (ResNet-50 and SE-ResNeXt50-32x4d by default) this times
one optimiser step of the paper's setting (configs/oarsi.py: 7 heads, each
GAP -> dropout 0.5 -> linear, mean of the heads' cross-entropies, Adam with
L2 1e-4, 300 px crops):
  * koajax: the trainer's own jitted step (`koajax.train.step.train_step`
    with the `multitask` method) on uint8 310 px views, the random 300 px
    crop, noise, rotation, gamma and standardisation on the device included,
    the batch sharded over the mesh the trainer would use;
  * PyTorch: `timm.create_model(name, num_classes=0)` with the same 7 heads
    and loss, eager (and `torch.compile` with --compile), on float 300 px
    batches already cropped and normalised (its augmentation would run in
    DataLoader workers).
Rounds alternate koajax and PyTorch; each round times `--steps` steps after
one untimed warm-up step. Images/s counts knees per step.

Run (CPU; timm and torch come with the test extra):
  pip install -e '.[test]'
  python benchmarks/oarsi_step.py                     # batch 32, both nets
  python benchmarks/oarsi_step.py --batch_size=16 --networks=resnet50

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
from machine import koajax_torch_cells, step_rates, summary, time_steps, torch_device, write_json  # noqa: E402  (benchmarks/machine.py)
from koajax_step import CompiledStep  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NETWORKS = flags.DEFINE_list('networks', ['resnet50', 'seresnext50_32x4d'],
                              'Backbones (koajax and timm names).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Knees per step (paper: 32).')
_SIZE = flags.DEFINE_integer('size', 300, 'Crop size, px (paper: 300).')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternated rounds.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype of both sides.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', -1, 'CPU devices for koajax (koajax.runtime; -1: one per '
    'core, as koajax.calibrate chooses for the ResNets on a 2-core Xeon).')
_TORCH = flags.DEFINE_bool('torch', True, 'Time timm + PyTorch.')
_COMPILE = flags.DEFINE_bool('compile', False,
                             'Also time torch.compile of the PyTorch step.')
_TORCH_DEVICE = flags.DEFINE_string(
    'torch_device', 'auto', "PyTorch's device; auto: cuda when available.")
_OUT = flags.DEFINE_string('out', None, 'JSON results file.')

HEADS = {'kl': 5, 'ost_tl': 4, 'ost_fl': 4, 'jsn_l': 4, 'ost_tm': 4,
         'ost_fm': 4, 'jsn_m': 4}


def koajax_step(network: str, batch_size: int, size: int,
                dtype: str) -> CompiledStep:
  """The trainer's multi-task step on random uint8 views, compiled once."""
  import jax
  import numpy as np
  from koajax import config_lib, methods, tasks

  oarsi = config_lib.load_sibling('oarsi',
                                  os.path.join(REPO, 'configs', 'oarsi.py'))
  config = oarsi.get_config('default')
  config.model.name = network
  config.model.dtype = dtype
  config.view_size = size + 10
  config.method_kwargs.crop = size
  # The whole network trains (after the paper's 2 heads-only epochs).
  config.optimizer.heads_only_epochs = 0.0
  task = tasks.from_config(config)
  method = methods.from_config(config, task)
  rng = np.random.default_rng(0)

  def make_batch(data):
    view = rng.integers(0, 256, (batch_size, size + 10, size + 10),
                        dtype=np.uint8)
    return {'labeled': {
        'image': jax.device_put(view, data),
        'labels': {h: jax.device_put(
            rng.integers(0, c, batch_size, dtype=np.int32), data)
                   for h, c in HEADS.items()}}}

  return CompiledStep(config, task, method, make_batch, batch_size=batch_size,
                      method_state={'input_norm': {'mean': np.float32(0.0),
                                                   'std': np.float32(0.5)}})


class TorchStep:
  """timm's backbone, 7 heads and the mean CE, Adam with L2, in PyTorch."""

  def __init__(self, network: str, batch_size: int, size: int, dtype: str,
               device: str, compile_step: bool):
    import timm
    import torch

    torch.manual_seed(0)
    self.device = device
    self.backbone = timm.create_model(network, num_classes=0).to(device)
    self.heads = torch.nn.ModuleDict({
        h: torch.nn.Sequential(torch.nn.Dropout(0.5),
                               torch.nn.Linear(self.backbone.num_features, c))
        for h, c in HEADS.items()}).to(device)
    params = list(self.backbone.parameters()) + list(self.heads.parameters())
    self.opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)
    self.autocast = dtype == 'bfloat16'
    gen = torch.Generator().manual_seed(0)
    self.x = torch.rand(batch_size, 3, size, size, generator=gen).to(device)
    self.y = {h: torch.randint(0, c, (batch_size,), generator=gen).to(device)
              for h, c in HEADS.items()}
    self.backbone.train()
    self.heads.train()
    self._step = torch.compile(self._eager) if compile_step else self._eager
    start = time.perf_counter()
    self()
    self.first_step_s = time.perf_counter() - start

  def _eager(self):
    import torch
    with torch.autocast(self.device.split(':')[0], dtype=torch.bfloat16,
                        enabled=self.autocast):
      features = self.backbone(self.x)
      loss = sum(torch.nn.functional.cross_entropy(head(features), self.y[h])
                 for h, head in self.heads.items()) / len(self.heads)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def __call__(self) -> None:
    import torch
    self._step()
    if self.device.startswith('cuda'):
      torch.cuda.synchronize()


def main(argv):
  del argv
  from koajax import runtime
  runtime.configure_cpu_devices(_CPU_DEVICES.value)

  results = []
  for network in _NETWORKS.value:
    ours = koajax_step(network, _BATCH.value, _SIZE.value, _DTYPE.value)
    sides = {'koajax': ours}
    if _TORCH.value:
      sides['torch'] = TorchStep(network, _BATCH.value, _SIZE.value,
                                 _DTYPE.value, torch_device(_TORCH_DEVICE.value), False)
      if _COMPILE.value:
        sides['torch_compile'] = TorchStep(
            network, _BATCH.value, _SIZE.value, _DTYPE.value, torch_device(_TORCH_DEVICE.value),
            True)
    times = {name: [] for name in sides}
    for _ in range(_ROUNDS.value):
      for name, step in sides.items():
        times[name] += time_steps(step, _STEPS.value)
    row = {'network': network, 'batch_size': _BATCH.value,
           'size': _SIZE.value, 'dtype': _DTYPE.value,
           'mesh_devices': ours.mesh.size, 'koajax_compile_s': ours.compile_s,
           'koajax_flops': ours.flops,
           **{f'{name}_step_s': t for name, t in times.items()}}
    if _TORCH.value:
      import timm
      import torch
      row.update(torch_version=torch.__version__, timm_version=timm.__version__,
                 torch_device=torch_device(_TORCH_DEVICE.value),
                 torch_threads=torch.get_num_threads())
    results.append(row)
    print(json.dumps(row), flush=True)

  print(f'\n{summary()}\n')
  print('| network | batch | px | dtype | koajax img/s | PyTorch img/s '
        '| koajax / PyTorch | torch.compile img/s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    rate = step_rates(r)
    cells = [r['network'], r['batch_size'], r['size'], r['dtype'],
             *koajax_torch_cells(rate)]
    cells.append(f"{rate['torch_compile']:.2f}" if 'torch_compile' in rate
                 else '')
    print('| ' + ' | '.join(map(str, cells)) + ' |')
  write_json(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)
