r"""MC-dropout sweep over a pool of knees: vmapped, looped, and PyTorch.

Times one MC-dropout sweep, T stochastic passes over every knee of a pool
(the Semixup paper's active-learning pool is 8,050 knees, T = 50), several
ways in one invocation, rounds alternated so that all see the same machine
state:
  * predictor: koajax's `koajax.active.mc_dropout.MCDropoutPredictor`, the
    T samples of a chunk vmapped in one jitted call, each device running its
    own knees (`shard_map`), chunk by chunk over the pool, host-to-device
    copies included;
  * loop: a Python loop over t of one jitted stochastic pass (dropout key
    `fold_in(key, t)`) over the same chunks, same mesh and sharding;
  * forward: one deterministic batched forward pass (dropout off, jitted,
    same sharding) over the pool; its time x T is the "T x one batched
    forward" reference;
  * torch: the PyTorch reference network (`benchmarks/torch_reference.py`)
    in eval mode with its Dropout modules sampling, `torch.no_grad()`, a loop
    of T passes per chunk, as many threads as cores.
Each mode runs one untimed call on one chunk first, reported as "warm-up":
compile and T samples for predictor, compile and one pass for
loop and forward, one pass for PyTorch. The pool is random
uint8 patch pairs (N, 2, 128, 128) from NumPy: the timing does not depend on
the pixels. The JAX modes take uint8 images and normalise them on the
device; PyTorch takes float pairs converted once before timing. Rates count
knees x passes per second (pool x T per sweep; T per pool for forward).

Run (CPU):
  pip install -e '.[bench]'
  python benchmarks/mc_dropout_sweep.py                # pool 8, T 50, chunk 4
  # The paper's 8,050 knees rounded up to whole chunks, for an accelerator:
  python benchmarks/mc_dropout_sweep.py --pool=8064 --chunk=64 --torch=false

Results print as a Markdown table and go to --out as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

MODES = ('predictor', 'loop', 'forward', 'torch')

_POOL = flags.DEFINE_integer(
    'pool', 8, 'Knees in the pool (paper: 8,050); a multiple of --chunk '
    'keeps every chunk full.')
_SAMPLES = flags.DEFINE_integer('samples', 50, 'MC samples T (paper: 50).')
_CHUNK = flags.DEFINE_integer(
    'chunk', 4, 'Knees per call; the mesh uses the largest device count '
    'dividing it. On a CPU the predictor\'s memory grows with chunk x mesh '
    'size (13 GB peak at chunk 4, T = 50; see benchmarks/README.md).')
_SAMPLES_PER_PASS = flags.DEFINE_integer(
    'samples_per_pass', None, 'predictor: vmap this many '
    'samples at a time (`lax.map` over groups); default all T.')
_WIDTH = flags.DEFINE_integer('width', 32, 'Network width (paper: 32).')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternated rounds.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 32, 'CPU devices for koajax (koajax.runtime).')
_MODES = flags.DEFINE_list('modes', list(MODES), f'Modes to time: {MODES}.')
_TORCH = flags.DEFINE_bool('torch', True, 'Time the PyTorch reference '
                           '(drops "torch" from --modes when false).')
_OUT = flags.DEFINE_string('out', None, 'JSON results file.')


class KoajaxModes:
  """The JAX modes over one pool, each compiled for the chunk shape."""

  def __init__(self, pool: np.ndarray, chunk: int, width: int,
               num_samples: int, samples_per_pass: int | None):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from koajax import runtime
    from koajax.active import mc_dropout
    from koajax.models import siamese

    model = siamese.SemixupNet(pooling='sam_hv', width=width, dropout=0.35,
                               norm='instance', rngs=nnx.Rngs(0))
    graphdef, self.params, self.extra = nnx.split(model, nnx.Param, ...)
    self.mesh = runtime.data_mesh(chunk)
    self.num_samples = num_samples
    self.key = jax.random.key(1)
    self.pool = pool
    self.chunk = chunk
    self.predictor = mc_dropout.MCDropoutPredictor(
        graphdef, self.mesh, num_samples=num_samples,
        samples_per_pass=samples_per_pass, chunk_size=chunk)
    data = jax.NamedSharding(self.mesh, jax.P('data'))
    # The loop and forward modes read chunks already on the devices: they
    # pass over each chunk T times and would copy it in once.
    self.device_chunks = [jax.device_put(pool[i:i + chunk], data)
                          for i in range(0, len(pool), chunk)]

    def probs(params, extra, images, key, dropout):
      m = nnx.merge(graphdef, params, extra, copy=True)
      pairs = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5
      logits = m(pairs, train=False, dropout=dropout,
                 rngs=nnx.Rngs(dropout=key))['logits']['kl']
      return jax.nn.softmax(logits.astype(jnp.float32))

    self.single = jax.jit(functools.partial(probs, dropout=True))
    self.deterministic = jax.jit(functools.partial(probs, dropout=False))

    self._jax = jax

  def predictor_sweep(self, num_chunks: int | None = None) -> np.ndarray:
    fold_in = self._jax.random.fold_in
    starts = range(0, len(self.pool), self.chunk)[:num_chunks]
    return np.concatenate(
        [self.predictor(self.params, self.extra, self.pool[s:s + self.chunk],
                        fold_in(self.key, c))
         for c, s in enumerate(starts)], axis=1)

  def loop_sweep(self, num_chunks: int | None = None) -> np.ndarray:
    fold_in = self._jax.random.fold_in
    out = []
    for t in range(self.num_samples if num_chunks is None else 1):
      key = fold_in(self.key, t)
      out.append([self.single(self.params, self.extra, x, fold_in(key, c))
                  for c, x in enumerate(self.device_chunks[:num_chunks])])
    return np.stack([np.concatenate([np.asarray(p) for p in row])
                     for row in out])

  def forward_sweep(self, num_chunks: int | None = None) -> np.ndarray:
    out = [self.deterministic(self.params, self.extra, x, self.key)
           for x in self.device_chunks[:num_chunks]]
    return np.concatenate([np.asarray(o) for o in out])[None]


class TorchMode:
  """The PyTorch reference: T passes per chunk with dropout sampling."""

  def __init__(self, pool: np.ndarray, chunk: int, width: int,
               num_samples: int):
    import torch
    import torch_reference
    torch.set_num_threads(os.cpu_count())
    self.net = torch_reference.mc_dropout_net(width)
    self.chunks = [torch_reference.uint8_to_pairs(pool[i:i + chunk])
                   for i in range(0, len(pool), chunk)]
    self.num_samples = num_samples
    self._probs = torch_reference.mc_dropout_probs

  def sweep(self, num_chunks: int | None = None) -> np.ndarray:
    import torch
    samples = self.num_samples if num_chunks is None else 1
    return torch.cat([self._probs(self.net, x, samples)
                      for x in self.chunks[:num_chunks]], dim=1).numpy()


def timed(fn, *args) -> float:
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


def main(argv):
  del argv
  from koajax import runtime
  runtime.configure_cpu_devices(_CPU_DEVICES.value)
  import flax
  import jax

  modes = [m for m in _MODES.value if _TORCH.value or m != 'torch']
  for m in modes:
    if m not in MODES:
      raise app.UsageError(f'unknown mode {m!r}; choose from {MODES}')
  pool_size, chunk, T = _POOL.value, _CHUNK.value, _SAMPLES.value
  if pool_size % chunk:
    raise app.UsageError(f'--pool={pool_size} is not a multiple of '
                         f'--chunk={chunk}')
  pool = np.random.default_rng(0).integers(
      0, 256, (pool_size, 2, 128, 128), dtype=np.uint8)
  ours = KoajaxModes(pool, chunk, _WIDTH.value, T, _SAMPLES_PER_PASS.value)
  sweeps = {'predictor': ours.predictor_sweep,
            'loop': ours.loop_sweep,
            'forward': ours.forward_sweep}
  if 'torch' in modes:
    sweeps['torch'] = TorchMode(pool, chunk, _WIDTH.value, T).sweep
  # Untimed warm-up on one chunk: compile and T samples for the vmapped
  # modes, compile and one pass for loop and forward, one pass for torch.
  warmup = {m: timed(sweeps[m], 1) for m in modes}
  print('warm-up s:', json.dumps(warmup), flush=True)
  times = {m: [] for m in modes}
  for r in range(_ROUNDS.value):
    for m in modes:
      times[m].append(timed(sweeps[m]))
      print(f'round {r} {m}: {times[m][-1]:.2f} s', flush=True)

  # Seconds for the whole sweep of pool x T knee-passes; forward is x T.
  sweep_s = {m: statistics.median(times[m]) * (T if m == 'forward' else 1)
             for m in modes}
  # round_s: one sweep per round (forward: one pass over the pool).
  rows = [{'mode': m, 'sweep_s': sweep_s[m], 'round_s': times[m],
           'warmup_s': warmup[m],
           'knee_passes_per_s': pool_size * T / sweep_s[m]} for m in modes]
  machine = (f'{cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} '
             f'({jax.default_backend()}, {jax.device_count()} devices, mesh '
             f'{ours.mesh.size}), flax {flax.__version__}')
  versions = {'jax': jax.__version__, 'flax': flax.__version__}
  if 'torch' in modes:
    import torch
    machine += f', torch {torch.__version__} ({torch.get_num_threads()} threads)'
    versions.update(torch=torch.__version__,
                    torch_threads=torch.get_num_threads())
  print(f'\n{machine}\npool {pool_size} knees, T = {T}, chunk {chunk}, '
        f'width {_WIDTH.value}, {_ROUNDS.value} rounds (median)\n')
  # Speed-up of each mode over the references (their time / its time).
  refs = [m for m in ('loop', 'forward', 'torch') if m in modes]
  names = {'forward': 'forward x T'}
  print('| mode | sweep s | knees x passes / s | warm-up s | '
        + ' | '.join(f'vs {names.get(m, m)}' for m in refs) + ' |')
  print('|---|---|---|---|' + '---|' * len(refs))
  for row in rows:
    label = names.get(row['mode'], row['mode'])
    ratios = ' | '.join(f"{sweep_s[m] / row['sweep_s']:.2f}x" for m in refs)
    print(f"| {label} | {row['sweep_s']:.1f} | "
          f"{row['knee_passes_per_s']:.1f} | {row['warmup_s']:.1f} | "
          f'{ratios} |')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'cpu': cpu_name(), 'cores': os.cpu_count(),
                 'backend': jax.default_backend(),
                 'devices': jax.device_count(), 'versions': versions,
                 'settings': {'pool': pool_size, 'samples': T,
                              'chunk': chunk,
                              'samples_per_pass': _SAMPLES_PER_PASS.value,
                              'width': _WIDTH.value,
                              'rounds': _ROUNDS.value,
                              'cpu_devices': _CPU_DEVICES.value,
                              'mesh_devices': ours.mesh.size,
                              'images': 'random uint8 (NumPy)'},
                 'results': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
