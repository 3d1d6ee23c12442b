r"""The localiser's fine stage: its train step and its prediction, koajax only.

For the landmark network of configs/localizer.py (timm-layout ResNet-18
stages 1-3, decoder to stride 4, soft-argmax) this times
  * one optimiser step of the trainer's jitted step (`landmarks` method:
    jitter of the uint8 views and their points on the device, the mean
    point distance, Adam), the batch sharded over the mesh the trainer
    would use;
  * prediction (`koajax.train.predictor.Predictor.predict_images`, the
    evaluation shift included) of a batch of views, the throughput of
    localising knees once the coarse stage has cut their ROIs.
Each round times `--steps` calls after one untimed warm-up call; compile
time is reported separately. There is no PyTorch reference: KNEEL's
hourglass networks are another architecture.

Run:
  python benchmarks/landmark_step.py                       # 400 px, batch 32
  python benchmarks/landmark_step.py --size=192 --batch_size=16   # quick

Results print as a Markdown table and go to --out as JSON (the rows of
benchmarks/gpu_report.py's step table).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import summary, time_steps, write_json  # noqa: E402  (benchmarks/machine.py)
from koajax_step import CompiledStep  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SIZE = flags.DEFINE_integer('size', 400, 'View size, px (default preset: '
                             '400 px over the 140 mm ROI).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Knees per step.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute precision (model.dtype).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed calls per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Rounds.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', -1, 'CPU devices (koajax.runtime); -1: one per core, as '
    'koajax.calibrate chooses for the localiser on a 2-core Xeon.')
_OUT = flags.DEFINE_string('out', None, 'JSON results file.')


def _config(size: int, batch_size: int, dtype: str):
  from koajax import config_lib
  localizer = config_lib.load_sibling(
      'localizer', os.path.join(REPO, 'configs', 'localizer.py'))
  config = localizer.get_config('default')
  config.view_size = size
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.model.dtype = dtype
  config.predict.shift = size / 12.5  # the default preset's 32 px at 400
  return config


def _views(rng, batch_size: int, size: int):
  import numpy as np
  images = rng.integers(0, 256, (batch_size, size, size), dtype=np.uint8)
  points = rng.uniform(0.25 * size, 0.75 * size,
                       (batch_size, 16, 2)).astype(np.float32)
  return images, points


def koajax_step(size: int, batch_size: int, dtype: str) -> CompiledStep:
  """The trainer's landmark step on random views, compiled once."""
  import jax
  import numpy as np
  from koajax import methods, tasks
  config = _config(size, batch_size, dtype)
  task = tasks.from_config(config)
  rng = np.random.default_rng(0)

  def make_batch(data):
    images, points = _views(rng, batch_size, size)
    return {'labeled': {'image': jax.device_put(images, data),
                        'keypoints': jax.device_put(points, data)}}

  return CompiledStep(config, task, methods.from_config(config, task),
                      make_batch, batch_size=batch_size)


class Prediction:
  """`Predictor.predict_images` of one batch of random views; calling it
  predicts (the result is on the host, so the call waits for it)."""

  def __init__(self, size: int, batch_size: int, dtype: str):
    import jax
    import numpy as np
    from koajax import runtime, tasks
    from koajax.train import predictor as predictor_lib
    from koajax.train import step as step_lib
    config = _config(size, batch_size, dtype)
    task = tasks.from_config(config)
    mesh = runtime.data_mesh(batch_size)
    with jax.set_mesh(mesh):
      graphdef, _, state = step_lib.create_state(
          config, task, jax.random.key(0),
          sharding=jax.NamedSharding(mesh, jax.P()))
    self.predictor = predictor_lib.Predictor(
        [predictor_lib.state_member(graphdef, state)], task, mesh,
        batch_size=batch_size, **dict(config.predict))
    rng = np.random.default_rng(1)
    self.images = _views(rng, batch_size, size)[0]
    self.shifts = predictor_lib.knee_shifts(np.arange(batch_size),
                                            config.predict.shift)
    start = time.perf_counter()
    self()
    self.compile_s = time.perf_counter() - start

  def __call__(self) -> None:
    self.predictor.predict_images(self.images, shifts=self.shifts)


def main(argv):
  del argv
  from koajax import runtime
  runtime.configure_cpu_devices(_CPU_DEVICES.value)
  size, batch, dtype = _SIZE.value, _BATCH.value, _DTYPE.value
  step = koajax_step(size, batch, dtype)
  predict = Prediction(size, batch, dtype)
  times = {'koajax': [], 'predict': []}
  for _ in range(_ROUNDS.value):
    times['koajax'] += time_steps(step, _STEPS.value)
    times['predict'] += time_steps(predict, _STEPS.value)
  row = {'network': 'landmark_net', 'batch_size': batch, 'size': size,
         'dtype': dtype, 'mesh_devices': step.mesh.size,
         'koajax_compile_s': step.compile_s, 'koajax_flops': step.flops,
         'koajax_step_s': times['koajax'],
         'predict_compile_s': predict.compile_s,
         'predict_s': times['predict']}
  print(json.dumps(row), flush=True)
  median = lambda t: sorted(t)[len(t) // 2]  # noqa: E731
  print(f'\n{summary()}\n')
  print('| network | px | batch | dtype | train knees/s | predict knees/s '
        '| compile s (train, predict) |')
  print('|---|---|---|---|---|---|---|')
  print(f"| landmark_net | {size} | {batch} | {dtype} | "
        f"{batch / median(times['koajax']):.1f} | "
        f"{batch / median(times['predict']):.1f} | "
        f"{step.compile_s:.1f}, {predict.compile_s:.1f} |")
  write_json(_OUT.value, [row])


if __name__ == '__main__':
  app.run(main)
