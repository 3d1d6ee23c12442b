r"""Confidence-driven train step: koajax against PyTorch, alternated.

For each loss (the hybrid loss and its cross-entropy baseline) this times one
optimiser step of the confidence-driven early-OA setting (Wang et al. 2025):
the Siamese multi-level GAP network (`koajax.models.siamese_gap`, 2,686,690
parameters), KL-0 against KL-2, batch 32 of 128 px patch pairs, Adam 1e-3
with weight decay 3e-4 added to the gradient (PyTorch's `Adam(weight_decay=)`,
as the paper's code):
  * koajax: the trainer's own jitted step (`koajax.train.step.train_step`
    with the `confidence` method) on uint8 patch pairs, the batch sharded
    over the mesh the trainer would use. Inside the step: the method's
    augmentation on the device (rotation +-10 deg and gamma p 0.5 per
    patch), forward, loss, backward and the Adam update.
  * PyTorch: the same network written with nn.Conv2d / BatchNorm2d / ReLU
    (NCHW, both patches through the shared branch in one pass, the two
    pooled vectors summed, dropout, linear) and the same losses, eager, Adam
    with weight_decay. With --torch_augment (default) its step starts from
    the same uint8 pairs and augments them on its device the same way
    (rotation by `affine_grid` + bilinear `grid_sample`, gamma p 0.5,
    normalise), so both sides do the same work; with --notorch_augment it
    takes float pairs already augmented, as a DataLoader would hand them
    over, and the comparison leans in PyTorch's favour.

Before timing, two guards check that both sides time the same work: the
PyTorch network has koajax's parameter count, and the PyTorch hybrid loss
(ranking by true-class confidence per class, stable so that ties keep batch
order, split 7:2:1; LSCE eps 0.15 / KL to c_k / CE weighted .4/.5/.1) and its
gradient equal `koajax.hybrid_loss.hybrid_loss` on the same logits, labels
and c_k to 1e-5. A failed guard stops the benchmark.

Rounds alternate koajax and PyTorch; each round times `--steps` steps after
one untimed warm-up step (`machine.time_steps`). img/s counts knees (patch
pairs) per step.

Run (CPU; torch comes with the bench extra):
  pip install -e '.[bench]'
  python benchmarks/confidence_step.py
  python benchmarks/confidence_step.py --losses=hybrid --batch_size=32 \
    --steps=3 --rounds=3 --out=benchmarks/results/confidence_step_cpu.json

On a GPU host both sides run on the GPU (PyTorch on cuda unless
--torch_device says otherwise); each timed PyTorch step ends by reading its
loss, so it waits for the device. Results print as a Markdown table, and go
to --out as JSON when it is given.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machine import koajax_torch_cells, step_rates, summary, time_steps, torch_device, write_json  # noqa: E402  (benchmarks/machine.py)
from koajax_step import CompiledStep  # noqa: E402

_LOSSES = flags.DEFINE_list('losses', ['hybrid', 'ce'],
                            'Losses to time (method_kwargs.loss_kind).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Knees per step (paper: 32).')
_SIZE = flags.DEFINE_integer('size', 128, 'Patch size, px (Siamese view).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternated rounds.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype of both sides.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 32, 'CPU devices for koajax (koajax.runtime; the '
    "trainer's default until runs measured it, as in the tables of "
    'benchmarks/README.md); the mesh uses the largest count dividing the '
    'batch.')
_TORCH = flags.DEFINE_bool('torch', True, 'Time the PyTorch reference.')
_TORCH_AUGMENT = flags.DEFINE_bool(
    'torch_augment', True, "Augment inside PyTorch's timed step, as koajax "
    'does; false: start from float pairs already augmented.')
_TORCH_DEVICE = flags.DEFINE_string(
    'torch_device', 'auto', "PyTorch's device; auto: cuda when available.")
_OUT = flags.DEFINE_string('out', None, 'JSON results file (optional).')

HEAD = 'kl0_vs_kl2'
NUM_CLASSES = 2
PARAMS = 2_686_690  # koajax.models.siamese_gap's docstring, 2 classes
LEARNING_RATE = 1e-3  # configs/confidence.py, for the PyTorch side
WEIGHT_DECAY = 3e-4
PARITY_TOL = 1e-5


def config_for(loss_kind: str, batch_size: int, size: int, dtype: str,
               cpu_devices: int):
  """configs/confidence.py's paper setting (Adam 1e-3 with PyTorch-style L2
  3e-4) at this batch, patch size, dtype and loss."""
  from koajax import config_lib
  confidence = config_lib.load_sibling(
      'confidence', os.path.join(REPO, 'configs', 'confidence.py'))
  config = confidence.get_config('default')
  config.method_kwargs.loss_kind = loss_kind
  config.view_size = size
  config.model.dtype = dtype
  config.batch_size = batch_size
  config.cpu_devices = cpu_devices
  return config


def koajax_step(loss_kind: str, batch_size: int, size: int, dtype: str,
                cpu_devices: int) -> CompiledStep:
  """The trainer's confidence step on random uint8 pairs, compiled once."""
  import jax
  import numpy as np
  from koajax import methods, tasks

  config = config_for(loss_kind, batch_size, size, dtype, cpu_devices)
  task = tasks.from_config(config)
  method = methods.from_config(config, task)
  rng = np.random.default_rng(0)

  def make_batch(data):
    pairs = rng.integers(0, 256, (batch_size, 2, size, size), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int32)
    return {'labeled': {'image': jax.device_put(pairs, data),
                        'labels': {HEAD: jax.device_put(labels, data)}}}

  # c_k as before the first evaluation: the value does not change the work.
  return CompiledStep(config, task, method, make_batch, batch_size=batch_size,
                      method_state=method.init_state(None))


def koajax_param_count(step: CompiledStep) -> int:
  import jax
  return sum(int(x.size) for x in jax.tree.leaves(step.state.params))


# ---------------------------------------------------------------- PyTorch


def torch_network(dropout: float = 0.2, classes: int = NUM_CLASSES):
  """`SiameseGAP` in PyTorch: the shared branch over both patches in one
  pass, GAP after every block, the two sides' 480-d vectors summed."""
  import torch
  from torch import nn
  from koajax.models.siamese_gap import BLOCKS

  class SiameseGAP(nn.Module):

    def __init__(self):
      super().__init__()
      blocks, cin = [], 1
      for i, (layers, channels) in enumerate(BLOCKS):
        convs = []
        for j in range(layers):
          convs += [nn.Conv2d(cin if j == 0 else channels, channels, 3,
                              stride=2 if (i > 0 and j == 0) else 1,
                              padding=1, bias=False),
                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        blocks.append(nn.Sequential(*convs))
        cin = channels
      self.blocks = nn.ModuleList(blocks)
      self.dropout = nn.Dropout(dropout)
      self.head = nn.Linear(sum(c for _, c in BLOCKS), classes)
      for m in self.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
          nn.init.kaiming_normal_(m.weight, mode='fan_in',
                                  nonlinearity='relu')
        if isinstance(m, nn.Linear):
          nn.init.zeros_(m.bias)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
      b, _, h, w = pairs.shape
      x = pairs.reshape(2 * b, 1, h, w)
      pooled = []
      for block in self.blocks:
        x = block(x)
        pooled.append(x.float().mean(dim=(2, 3)))
      summed = torch.cat(pooled, dim=1).reshape(b, 2, -1).sum(dim=1)
      return self.head(self.dropout(summed))

  return SiameseGAP()


def torch_groups(confidence, labels, num_classes, ratios=(7, 2, 1)):
  """(B,) group 0 high / 1 medium / 2 low: each class ranked by confidence
  with a stable sort (ties keep batch order), the sample of rank r among n
  in the first group whose cumulative share reaches (r + 1/2) / n."""
  import torch
  n = confidence.shape[0]
  order = torch.sort(-confidence, stable=True).indices
  onehot = torch.nn.functional.one_hot(labels, num_classes).int()
  # The rank within its class of each sample in sorted order: same-class
  # samples before it in the sorted batch.
  sorted_onehot = onehot[order]
  ahead = torch.cumsum(sorted_onehot, dim=0) - sorted_onehot
  rank = torch.empty(n, dtype=torch.long, device=confidence.device)
  rank[order] = ahead.gather(1, labels[order, None])[:, 0].long()
  count = onehot.sum(dim=0)[labels].long()
  total, cumulative = sum(ratios), 0
  group = torch.zeros(n, dtype=torch.long, device=confidence.device)
  for r in ratios[:-1]:
    cumulative += r
    group += ((2 * rank + 1) * total >= 2 * count * cumulative).long()
  return group


def torch_hybrid_loss(logits, labels, class_confidence, *, ratios=(7, 2, 1),
                      weights=(0.4, 0.5, 0.1), smoothing=0.15):
  """The hybrid loss of `koajax.hybrid_loss`, written in PyTorch."""
  import torch
  import torch.nn.functional as F
  log_p = F.log_softmax(logits.float(), dim=-1)
  c = log_p.shape[-1]
  log_p_true = log_p.gather(1, labels[:, None])[:, 0]
  group = torch_groups(log_p_true.detach().exp(), labels, c, ratios)
  onehot = F.one_hot(labels, c).float()
  lsce = -(((1 - smoothing) * onehot + smoothing / c) * log_p).sum(dim=-1)
  c_k = class_confidence[labels]
  target = torch.where(onehot > 0, c_k[:, None],
                       ((1 - c_k) / max(c - 1, 1))[:, None])
  kld = F.kl_div(log_p, target, reduction='none').sum(dim=-1)
  ce = -log_p_true
  loss = logits.new_zeros((), dtype=torch.float32)
  for g, (per_sample, w) in enumerate(zip((lsce, kld, ce), weights)):
    members = (group == g).float()
    loss = loss + w * (per_sample * members).sum() / members.sum().clamp(min=1)
  return loss


def torch_augment(pairs):
  """uint8 (B, 2, H, W) -> float in [-1, 1], each patch its own draw:
  rotation +-10 deg about the centre (bilinear, zero fill), then gamma in
  [0.5, 1.5] with p 0.5, as the confidence method's augmentation."""
  import math
  import torch
  import torch.nn.functional as F
  b, two, h, w = pairs.shape
  n = b * two
  x = pairs.reshape(n, 1, h, w).float()
  angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(10.0)
  cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
  theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                       torch.stack([sin, cos, zero], 1)], 1)
  grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
  x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros',
                    align_corners=False)
  gamma = 0.5 + torch.rand(n, 1, 1, 1, device=x.device)
  bright = 255 * (x.clamp(0, 255) / 255) ** (1 / gamma)
  x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, bright, x)
  return ((x / 255 - 0.5) / 0.5).reshape(b, two, h, w)


class TorchStep:
  """The PyTorch network, loss and Adam step on one fixed batch."""

  def __init__(self, loss_kind: str, batch_size: int, size: int, dtype: str,
               device: str, augment: bool):
    import numpy as np
    import torch
    from koajax import hybrid_loss

    torch.manual_seed(0)
    self.device, self.loss_kind, self.augment = device, loss_kind, augment
    self.net = torch_network().to(device).train()
    self.opt = torch.optim.Adam(self.net.parameters(), lr=LEARNING_RATE,
                                weight_decay=WEIGHT_DECAY)
    self.autocast = dtype == 'bfloat16'
    rng = np.random.default_rng(0)
    pairs = torch.from_numpy(rng.integers(0, 256, (batch_size, 2, size, size),
                                          dtype=np.uint8)).to(device)
    # Without augmentation in the step: float pairs as a loader hands them.
    self.x = pairs if augment else torch_augment(pairs)
    self.y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch_size)).to(
        device)
    self.c_k = torch.full((NUM_CLASSES,), hybrid_loss.default_class_confidence(
        NUM_CLASSES), device=device)
    start = time.perf_counter()
    self()
    self.first_step_s = time.perf_counter() - start

  def _loss(self, logits):
    import torch.nn.functional as F
    if self.loss_kind == 'ce':
      return F.cross_entropy(logits.float(), self.y)
    return torch_hybrid_loss(logits, self.y, self.c_k)

  def __call__(self) -> None:
    import torch
    with torch.autocast(self.device.split(':')[0], dtype=torch.bfloat16,
                        enabled=self.autocast):
      x = torch_augment(self.x) if self.augment else self.x
      loss = self._loss(self.net(x))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    loss.item()  # waits for the device


# ---------------------------------------------------------------- guards


def parity(batch_size: int) -> dict:
  """The PyTorch reference against koajax: parameter counts, and the
  largest difference of the hybrid loss and of its gradient over a few
  batches (the benchmark's, with ties; 10 knees; 3 classes), and the
  confidence groups of confidences full of ties."""
  import jax
  import numpy as np
  import torch
  from flax import nnx
  from koajax import hybrid_loss
  from koajax.models import siamese_gap

  model = nnx.eval_shape(lambda: siamese_gap.SiameseGAP(
      heads={HEAD: NUM_CLASSES}, rngs=nnx.Rngs(0)))
  koajax_params = sum(int(x.size) for x in jax.tree.leaves(
      nnx.state(model, nnx.Param)))
  torch_params = sum(p.numel() for p in torch_network().parameters())

  # One jitted call per shape: eager JAX would compile every op separately.
  @jax.jit
  def ours(z, y, c_k, conf):
    value, grad = jax.value_and_grad(lambda z: hybrid_loss.hybrid_loss(
        logits=z, labels=y, class_confidence=c_k)[0])(z)
    return value, grad, hybrid_loss.confidence_groups(conf, y)

  rng = np.random.default_rng(0)
  loss_diff = grad_diff = 0.0
  groups_equal = True
  # The unit tests hold koajax's loss to NumPy on more cases (tiny batches,
  # absent classes); here a few suffice to show the two sides agree.
  for n, c in sorted({(batch_size, 2), (10, 2), (7, 3)}):
    logits = rng.normal(0, 2, (n, c)).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    if n >= 4:  # exact ties in one class: batch order decides
      labels[1] = labels[3] = labels[0]
      logits[1] = logits[3] = logits[0]
    c_k = rng.uniform(0.3, 0.95, c).astype(np.float32)

    conf = rng.choice([0.2, 0.5, 0.9], n).astype(np.float32)  # many ties
    value, grad, groups = ours(logits, labels, c_k, conf)
    z = torch.tensor(logits, requires_grad=True)
    y = torch.from_numpy(labels).long()
    theirs = torch_hybrid_loss(z, y, torch.from_numpy(c_k))
    theirs.backward()
    loss_diff = max(loss_diff, abs(float(value) - theirs.item()))
    grad_diff = max(grad_diff, float(np.abs(np.asarray(grad) -
                                            z.grad.numpy()).max()))
    groups_equal &= bool(np.array_equal(
        np.asarray(groups), torch_groups(torch.from_numpy(conf), y, c).numpy()))
  return {'koajax_params': koajax_params, 'torch_params': torch_params,
          'hybrid_loss_max_abs_diff': loss_diff,
          'hybrid_loss_grad_max_abs_diff': grad_diff,
          'hybrid_groups_equal': groups_equal}


def check(guards: dict) -> None:
  """Stops the benchmark when the two sides would not time the same work."""
  problems = []
  if not guards['koajax_params'] == guards['torch_params'] == PARAMS:
    problems.append(f"parameters: koajax {guards['koajax_params']:,}, "
                    f"PyTorch {guards['torch_params']:,}, expected {PARAMS:,}")
  for name in ('hybrid_loss_max_abs_diff', 'hybrid_loss_grad_max_abs_diff'):
    if not guards[name] <= PARITY_TOL:
      problems.append(f'{name} {guards[name]:.3g} > {PARITY_TOL}')
  if not guards['hybrid_groups_equal']:
    problems.append('the confidence groups differ')
  if problems:
    raise SystemExit('PyTorch reference differs from koajax: ' +
                     '; '.join(problems))


def includes(torch_augmented: bool) -> dict:
  """What each side's timed step does, for the results file."""
  torch_input = ('uint8 pairs, augmented inside the step (rotation +-10 deg '
                 'by affine_grid/grid_sample, gamma p 0.5, normalise)'
                 if torch_augmented else
                 'float pairs already augmented (augmentation not timed)')
  return {
      'koajax_includes': (
          'koajax.train.step.train_step, method confidence: uint8 pairs, '
          'on-device augmentation (rotation +-10 deg, gamma p 0.5), '
          'forward, loss, backward, Adam with L2'),
      'torch_includes': (f'eager PyTorch: {torch_input}, forward, loss, '
                         'backward, Adam(weight_decay), loss.item()')}


def main(argv):
  del argv
  from koajax import runtime
  runtime.configure_cpu_devices(_CPU_DEVICES.value)

  guards = parity(_BATCH.value) if _TORCH.value else {}
  if guards:
    check(guards)
    print(json.dumps(guards), flush=True)

  results = []
  for loss_kind in _LOSSES.value:
    ours = koajax_step(loss_kind, _BATCH.value, _SIZE.value, _DTYPE.value,
                       _CPU_DEVICES.value)
    koajax_params = koajax_param_count(ours)
    if koajax_params != PARAMS:
      raise SystemExit(f"koajax's step trains {koajax_params:,} parameters, "
                       f'not {PARAMS:,}')
    sides = {'koajax': ours}
    if _TORCH.value:
      sides['torch'] = TorchStep(loss_kind, _BATCH.value, _SIZE.value,
                                 _DTYPE.value,
                                 torch_device(_TORCH_DEVICE.value),
                                 _TORCH_AUGMENT.value)
    times = {name: [] for name in sides}
    for _ in range(_ROUNDS.value):
      for name, step in sides.items():
        times[name] += time_steps(step, _STEPS.value)
    row = {'loss': loss_kind, 'batch_size': _BATCH.value,
           'size': _SIZE.value, 'dtype': _DTYPE.value,
           'mesh_devices': ours.mesh.size, 'koajax_compile_s': ours.compile_s,
           'koajax_flops': ours.flops,
           'koajax_params': koajax_params,
           **{f'{name}_step_s': t for name, t in times.items()}}
    if _TORCH.value:
      import torch
      row.update(includes(_TORCH_AUGMENT.value), **guards,
                 torch_first_call_s=sides['torch'].first_step_s,
                 torch_version=torch.__version__,
                 torch_device=torch_device(_TORCH_DEVICE.value),
                 torch_threads=torch.get_num_threads())
    results.append(row)
    print(json.dumps(row), flush=True)

  print(f'\n{summary()}\n')
  print('| loss | batch | px | dtype | koajax img/s | PyTorch img/s '
        '| koajax / PyTorch |')
  print('|---|---|---|---|---|---|---|')
  for r in results:
    rate = step_rates(r)
    cells = [r['loss'], r['batch_size'], r['size'], r['dtype'],
             *koajax_torch_cells(rate)]
    print('| ' + ' | '.join(map(str, cells)) + ' |')
  write_json(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)
