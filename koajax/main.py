"""koajax's entry point: `python -m koajax.main --config=configs/X.py[:preset] --workdir=DIR`.

Kept short on purpose: it parses flags and calls one library function chosen
by `config.job`; the logic lives in modules that tests import.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from koajax import cli
from koajax import config_checks

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally FILE:preset.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for outputs (metrics, plots, checkpoints).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Run as one of several processes (jax.distributed); on SLURM, Open MPI '
    'or Cloud TPU the peers are found automatically, elsewhere give '
    '--coordinator_address, --num_processes and --process_id.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 in a multi-process run (implies --distributed).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process in a multi-process run, 0-based.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # unused: cli.run_absl refuses positional arguments
  # koajax's own INFO messages, without the libraries' (Orbax logs every
  # file it writes).
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('koajax').setLevel(std_logging.INFO)
  config = config_checks.check(_CONFIG.value)
  if config.job == 'prepare_data':
    from koajax import prepare
    prepare.prepare_data(config, _WORKDIR.value)
  elif config.job in ('train', 'active_learning'):
    # Both before JAX creates its backends.
    from koajax import calibrate
    from koajax import runtime
    distributed = bool(_DISTRIBUTED.value or _COORDINATOR.value)
    calibrate.configure_host(config, distributed=distributed)
    if distributed:
      runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                     _PROCESS_ID.value)
    if config.job == 'train':
      from koajax import train
      train.train_and_evaluate(
          config, _WORKDIR.value,
          source=flags.FLAGS['config'].config_filename)
    else:
      from koajax.active import loop
      loop.run(config, _WORKDIR.value)
  else:
    raise app.UsageError(f'config.job={config.job!r} is not a koajax job')


if __name__ == '__main__':
  cli.run_absl('koajax.main', main)
