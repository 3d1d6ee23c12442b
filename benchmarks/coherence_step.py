r"""Coherence-learning train step: koajax against timm + PyTorch, alternated.

This times one optimiser step of coherence learning (Zheng et al. 2021,
configs/coherence.py): the keypoint pooling network (a ResNet whose stage-3
maps are sampled bilinearly at the knee's 16 landmarks; KL and both JSN heads
read all of them, each osteophyte head its compartment's), the 7 heads'
prevalence-weighted cross-entropies on a labeled batch, and the incoherence
loss softplus(-tau g(P)) / tau on the labeled and an unlabeled batch of the
same size (g the log-density of a 10-component full-covariance Gaussian
mixture of the 29 concatenated probabilities), Adam with L2 1e-2:
  * koajax: the trainer's own jitted step (`koajax.train.step.train_step`
    with the `coherence` method) on uint8 views and their keypoints, the
    batch sharded over the mesh the trainer would use; inside the step the
    method's jitter on the device (translation, rotation, scale; keypoints
    moved with the image), two forward passes, both losses, backward, Adam.
  * PyTorch: `timm.create_model(backbone, features_only=True,
    out_indices=(3,))` (the stem and stages 1-3, the stages after the
    sampled one not run, as in koajax), `grid_sample` at the keypoints
    (border padding, the 'receptive_field' grid of koajax.models.kpn), the
    group means, dropout + linear heads, `cross_entropy(weight=...)` and the
    mixture's log-density by the Cholesky of the precisions and logsumexp,
    eager. It starts from float views already jittered, as a DataLoader
    would hand them over: its augmentation is not timed, so the comparison
    leans in PyTorch's favour.

Before timing, guards check that both sides compute the same thing: the
keypoint sampling (`kpn.sample_bilinear` against `grid_sample` on one random
map and points) and the mixture log-density and incoherence loss
(`koajax.coherence` against the PyTorch code on the same mixture and
probabilities) agree to 1e-4. A failed guard stops the benchmark.

Rounds alternate koajax and PyTorch; each round times `--steps` steps after
one untimed warm-up step. Images/s counts labeled knees per step (each step
also reads as many unlabeled knees).

Run (CPU; timm and torch come with the test extra):
  pip install -e '.[test]'
  python benchmarks/coherence_step.py                          # ResNet-50, 320 px
  python benchmarks/coherence_step.py --backbone=resnet18 --size=128 \
    --batch_size=32                                            # the quick preset

Results print as a Markdown table and go to --out as JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machine import koajax_torch_cells, step_rates, summary, time_steps, torch_device, write_json  # noqa: E402  (benchmarks/machine.py)
from koajax_step import CompiledStep  # noqa: E402

_BACKBONE = flags.DEFINE_string('backbone', 'resnet50',
                                'ResNet (koajax and timm name).')
_BATCH = flags.DEFINE_integer('batch_size', 16,
                              'Labeled knees per step, as many unlabeled '
                              '(paper: 48).')
_SIZE = flags.DEFINE_integer('size', 320, 'View size, px (paper: 320).')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternated rounds.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype of both sides.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', -1, 'CPU devices for koajax (koajax.runtime; -1: one per '
    'core, as koajax.calibrate chooses for the ResNets on a 2-core Xeon).')
_TORCH = flags.DEFINE_bool('torch', True, 'Time timm + PyTorch.')
_TORCH_DEVICE = flags.DEFINE_string(
    'torch_device', 'auto', "PyTorch's device; auto: cuda when available.")
_OUT = flags.DEFINE_string('out', None, 'JSON results file.')

PARITY_TOL = 1e-4
TAU = 0.5
COMPONENTS = 10


def grading():
  """(heads {name: classes} in the task's order, head -> landmark indices it
  reads) of configs/coherence.py."""
  from koajax import config_lib, tasks
  from koajax.models import kpn
  config = config_lib.load_sibling(
      'coherence', os.path.join(REPO, 'configs', 'coherence.py')).get_config()
  task = tasks.from_config(config)
  groups = {g: tuple(idx) for g, idx in config.model.groups.items()}
  groups[kpn.ALL] = tuple(range(16))
  reads = {h: groups[kpn.head_group(h, dict(config.model.head_groups))]
           for h in task.head_names}
  return dict(task.num_classes), reads


def mixture(heads: dict[str, int], seed: int = 0) -> dict:
  """A coherence mixture fitted on random grades (`koajax.coherence`)."""
  import numpy as np
  from koajax import coherence
  rng = np.random.default_rng(seed)
  grades = np.stack([rng.integers(0, c, 400) for c in heads.values()], 1)
  return coherence.fit_gmm(grades, list(heads.values()),
                           components=COMPONENTS, seed=seed, reg_covar=1e-2)


def random_keypoints(rng, batch_size: int, size: int):
  import numpy as np
  return rng.uniform(0.2 * size, 0.8 * size,
                     (batch_size, 16, 2)).astype(np.float32)


def koajax_step(backbone: str, batch_size: int, size: int, dtype: str,
                heads: dict[str, int], gmm: dict) -> CompiledStep:
  """The trainer's coherence step on random uint8 views, compiled once."""
  import jax
  import numpy as np
  from koajax import config_lib, methods, tasks

  config = config_lib.load_sibling(
      'coherence', os.path.join(REPO, 'configs', 'coherence.py')).get_config()
  config.model.backbone = backbone
  config.model.dtype = dtype
  config.view_size = size
  config.batch_size = batch_size
  task = tasks.from_config(config)
  method = methods.from_config(config, task)
  rng = np.random.default_rng(0)

  def make_batch(data):
    def stream(labeled):
      out = {'image': jax.device_put(
          rng.integers(0, 256, (batch_size, size, size), dtype=np.uint8), data),
             'keypoints': jax.device_put(
                 random_keypoints(rng, batch_size, size), data)}
      if labeled:
        out['labels'] = {h: jax.device_put(
            rng.integers(0, c, batch_size, dtype=np.int32), data)
                         for h, c in heads.items()}
      return out
    return {'labeled': stream(True), 'unlabeled': stream(False)}

  weights = {h: np.linspace(0.5, 1.5, c).astype(np.float32)
             for h, c in heads.items()}
  return CompiledStep(config, task, method, make_batch, batch_size=batch_size,
                      method_state={'class_weights': weights, 'gmm': gmm})


# ---------------------------------------------------------------- PyTorch


def torch_log_density(gmm, x):
  """scikit-learn's `score_samples` (full covariance) in PyTorch."""
  import torch
  w, mu, u = gmm['weights'], gmm['means'], gmm['precisions_cholesky']
  d = mu.shape[1]
  y = torch.einsum('nd,kde->nke', x, u) - torch.einsum('kd,kde->ke', mu, u)
  log_det = torch.log(torch.diagonal(u, dim1=-2, dim2=-1)).sum(-1)
  log_prob = (-0.5 * (y ** 2).sum(-1) + torch.log(w) + log_det
              - 0.5 * d * math.log(2 * math.pi))
  return torch.logsumexp(log_prob, dim=-1)


def torch_sample(maps, points, stride: int):
  """(B, K, C) values of (B, C, h, w) maps at (B, K, 2) view-pixel points:
  map cell j at view pixel stride * j, clamped at the edges."""
  import torch
  h, w = maps.shape[-2:]
  u = points / stride
  grid = torch.stack([2 * u[..., 0] / (w - 1) - 1,
                      2 * u[..., 1] / (h - 1) - 1], dim=-1)[:, None]
  out = torch.nn.functional.grid_sample(maps, grid, mode='bilinear',
                                        padding_mode='border',
                                        align_corners=True)
  return out[:, :, 0].transpose(1, 2)


class TorchStep:
  """The same network, losses and optimiser in timm + PyTorch."""

  def __init__(self, backbone: str, batch_size: int, size: int, dtype: str,
               device: str, heads: dict[str, int], reads: dict, gmm: dict):
    import numpy as np
    import timm
    import torch

    torch.manual_seed(0)
    self.device = device
    self.reads = reads
    self.backbone = timm.create_model(backbone, features_only=True,
                                      out_indices=(3,)).to(device)
    channels = self.backbone.feature_info.channels()[-1]
    self.stride = self.backbone.feature_info.reduction()[-1]
    self.heads = torch.nn.ModuleDict({
        h: torch.nn.Linear(channels, c) for h, c in heads.items()}).to(device)
    self.dropout = torch.nn.Dropout(0.5)
    params = list(self.backbone.parameters()) + list(self.heads.parameters())
    self.opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-2)
    self.autocast = dtype == 'bfloat16'
    self.gmm = {k: torch.from_numpy(np.asarray(v)).to(device)
                for k, v in gmm.items()}
    self.class_weights = {h: torch.linspace(0.5, 1.5, c).to(device)
                          for h, c in heads.items()}
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    self.x = torch.rand(batch_size, 3, size, size, generator=gen).to(device)
    self.x_u = torch.rand(batch_size, 3, size, size, generator=gen).to(device)
    self.points = torch.from_numpy(
        random_keypoints(rng, batch_size, size)).to(device)
    self.points_u = torch.from_numpy(
        random_keypoints(rng, batch_size, size)).to(device)
    self.y = {h: torch.randint(0, c, (batch_size,), generator=gen).to(device)
              for h, c in heads.items()}
    self.backbone.train()
    self.heads.train()
    start = time.perf_counter()
    self()
    self.first_step_s = time.perf_counter() - start

  def logits(self, x, points):
    import torch
    maps = self.backbone(x)[-1]
    sampled = torch_sample(maps.float(), points, self.stride)
    pooled = {}
    for h in self.heads:
      idx = self.reads[h]
      if idx not in pooled:  # one dropout mask per landmark group
        pooled[idx] = self.dropout(sampled[:, list(idx)].mean(1))
    return {h: head(pooled[self.reads[h]]) for h, head in self.heads.items()}

  def _step(self):
    import torch
    f = torch.nn.functional
    with torch.autocast(self.device.split(':')[0], dtype=torch.bfloat16,
                        enabled=self.autocast):
      z = self.logits(self.x, self.points)
      z_u = self.logits(self.x_u, self.points_u)
      cls = sum(f.cross_entropy(z[h].float(), self.y[h],
                                weight=self.class_weights[h]) for h in z)
      probs = torch.cat([
          torch.cat([f.softmax(z[h].float(), -1) for h in z], -1),
          torch.cat([f.softmax(z_u[h].float(), -1) for h in z_u], -1)])
      g = torch_log_density(self.gmm, probs)
      loss = cls + (f.softplus(-TAU * g) / TAU).mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def __call__(self) -> None:
    self._step().item()  # waits for the device


def parity(heads: dict[str, int], gmm: dict) -> dict:
  """Largest differences of the keypoint sampling, the log-density and the
  incoherence loss between koajax and the PyTorch reference."""
  import jax
  import numpy as np
  import torch
  from koajax import coherence
  from koajax.models import kpn

  rng = np.random.default_rng(1)
  maps = rng.normal(size=(2, 20, 20, 8)).astype(np.float32)
  points = rng.uniform(-20, 340, (2, 16, 2)).astype(np.float32)  # edges too
  ours = np.asarray(kpn.sample_bilinear(maps, kpn.to_map(
      points, view_px=(320, 320), map_px=(20, 20), stage=3)))
  theirs = torch_sample(torch.from_numpy(maps).permute(0, 3, 1, 2),
                        torch.from_numpy(points), kpn.stride(3)).numpy()
  logits = rng.normal(0, 2, (64, sum(heads.values()))).astype(np.float32)
  splits = np.cumsum(list(heads.values()))[:-1]
  probs = np.concatenate([np.asarray(jax.nn.softmax(z)) for z in
                          np.split(logits, splits, axis=1)], axis=1)
  g = np.asarray(coherence.log_density(gmm, probs))
  tgmm = {k: torch.from_numpy(np.asarray(v)) for k, v in gmm.items()}
  g_torch = torch_log_density(tgmm, torch.from_numpy(probs)).numpy()
  loss = float(coherence.incoherence_loss(gmm, probs, tau=TAU))
  loss_torch = float((torch.nn.functional.softplus(
      -TAU * torch.from_numpy(g_torch)) / TAU).mean())
  scale = max(1.0, float(np.abs(g).max()))
  return {'sampling_max_abs_diff': float(np.abs(ours - theirs).max()),
          'log_density_max_rel_diff': float(np.abs(g - g_torch).max() / scale),
          'incoherence_loss_abs_diff': abs(loss - loss_torch)}


def check(guards: dict) -> None:
  bad = [f'{k} {v:.3g} > {PARITY_TOL}' for k, v in guards.items()
         if not v <= PARITY_TOL]
  if bad:
    raise SystemExit('PyTorch reference differs from koajax: ' +
                     '; '.join(bad))


def main(argv):
  del argv
  from koajax import runtime
  runtime.configure_cpu_devices(_CPU_DEVICES.value)

  heads, reads = grading()
  gmm = mixture(heads)
  guards = parity(heads, gmm) if _TORCH.value else {}
  if guards:
    check(guards)
    print(json.dumps(guards), flush=True)

  ours = koajax_step(_BACKBONE.value, _BATCH.value, _SIZE.value, _DTYPE.value,
                     heads, gmm)
  sides = {'koajax': ours}
  if _TORCH.value:
    sides['torch'] = TorchStep(_BACKBONE.value, _BATCH.value, _SIZE.value,
                               _DTYPE.value, torch_device(_TORCH_DEVICE.value),
                               heads, reads, gmm)
  times = {name: [] for name in sides}
  for _ in range(_ROUNDS.value):
    for name, step in sides.items():
      times[name] += time_steps(step, _STEPS.value)
  row = {'backbone': _BACKBONE.value, 'batch_size': _BATCH.value,
         'unlabeled_batch_size': _BATCH.value, 'size': _SIZE.value,
         'dtype': _DTYPE.value, 'mesh_devices': ours.mesh.size,
         'koajax_compile_s': ours.compile_s,
         'koajax_flops': ours.flops,
         **{f'{name}_step_s': t for name, t in times.items()},
         'koajax_includes': (
             'koajax.train.step.train_step, method coherence: uint8 views and '
             'keypoints, jitter on the device, two forward passes, weighted '
             'CE + incoherence loss, backward, Adam with L2'),
         'torch_includes': (
             'eager PyTorch: float views already jittered (augmentation not '
             'timed), two forward passes, weighted CE + incoherence loss, '
             'backward, Adam(weight_decay), loss.item()')}
  if _TORCH.value:
    import torch
    row.update(guards, torch_first_call_s=sides['torch'].first_step_s,
               torch_version=torch.__version__,
               torch_device=torch_device(_TORCH_DEVICE.value),
               torch_threads=torch.get_num_threads())
  print(json.dumps(row), flush=True)

  print(f'\n{summary()}\n')
  print('| backbone | batch (+ unlabeled) | px | dtype | koajax img/s | '
        'PyTorch img/s | koajax / PyTorch |')
  print('|---|---|---|---|---|---|---|')
  cells = [row['backbone'], f"{row['batch_size']} (+{row['batch_size']})",
           row['size'], row['dtype'], *koajax_torch_cells(step_rates(row))]
  print('| ' + ' | '.join(map(str, cells)) + ' |')
  write_json(_OUT.value, [row])


if __name__ == '__main__':
  app.run(main)
