"""Every command the README shows works, so the documentation cannot drift.

Each `python -m koajax...` command of README.md is listed below with how
this test runs it: as written but with the smoke presets, tiny data and
temporary folders substituted, or, where running is impossible here (OAI
tables, several hosts), as `--help`. A README command missing from the list
fails the test, and so does a flag the command does not define.
"""

import functools
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

import pandas as pd
import pytest

from config_loader import load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'


def readme_commands():
  """Every `python -m koajax...` command of the README, continuation lines
  joined, in order."""
  text = README.read_text().replace('\\\n', ' ')
  found = []
  for match in re.finditer(r'python -m (koajax[\w.]*)([^`\n]*)', text):
    command = f'python -m {match.group(1)}{match.group(2)}'
    command = command.split('  #')[0].split(' && ')[0]
    found.append(' '.join(command.split()))
  return found


# README command -> (arguments the test runs, with {tmp} and {data} filled
# in) or 'help'. In the order they run: later ones use earlier outputs.
SCENARIO = {
    'python -m koajax.main --config=configs/semixup.py:quick '
    '--workdir=/tmp/koajax-semixup':
        ['koajax.main', '--config=configs/semixup.py:smoke',
         '--workdir={tmp}/koajax-semixup'],
    'python -m koajax.main --config=configs/data.py --workdir=/tmp/koajax-data':
        ['koajax.main', '--config=configs/data.py:smoke',
         '--workdir={tmp}/koajax-data'],
    'python -m koajax.data.gallery --cache=DIR '
    '--out=benchmarks/figures/synthetic_knees_by_kl.png':
        ['koajax.data.gallery', '--cache={smoke_cache}',
         '--out={tmp}/gallery.png'],
    'python -m koajax.data.synthetic --out=DIR --num_subjects=560 --seed=0 '
    '[--workers=N]':
        ['koajax.data.synthetic', '--out={tmp}/raw', '--num_subjects=3',
         '--seed=0', '--workers=1'],
    'python -m koajax.data.oai --grades=kxr_sq_bu00.txt,kxr_sq_bu01.txt '
    '--images=images.csv --out=manifest.csv [--sites=Enrollees.txt]': 'help',
    'python -m koajax.data.png_folders --root=DIR --out=DIR': 'help',
    # Measures for real, kept out of the user's cache.
    'python -m koajax.calibrate --config=FILE:preset':
        ['koajax.calibrate', '--config=configs/supervised.py:smoke',
         '--cache={tmp}/cpu_devices.json'],
    'python -m koajax.data.build --manifest=PATH --out=DIR [--landmarks=PATH] '
    '[--localizer=DIR] [--roi_mm=140] [--roi_px=400] [--workers=N] '
    '[--strict]':
        ['koajax.data.build', '--manifest={tmp}/raw/manifest.csv',
         '--out={tmp}/built', '--roi_mm=140', '--roi_px=128', '--workers=1'],
    # The paper's setting on the full embedded data: hours; its splits are
    # made for every preset in test_presets.py.
    'python -m koajax.main --config=configs/semixup.py '
    '--workdir=/tmp/koajax-semixup-paper': 'help',
    'python -m koajax.main --config=configs/semixup.py --workdir=/shared/run '
    '--coordinator_address=host0:12345 --num_processes=2 --process_id=0':
        'help',
    'python -m koajax.evaluate --workdir=/tmp/koajax-semixup --split=val '
    '--checkpoint=best_kappa':
        ['koajax.evaluate', '--workdir={tmp}/koajax-semixup', '--split=val',
         '--checkpoint=best_kappa'],
    'python -m koajax.evaluate --workdir=/tmp/koajax-semixup '
    '--cache=/data/most_cache --out=/tmp/most-eval':
        ['koajax.evaluate', '--workdir={tmp}/koajax-semixup',
         '--cache={tmp}/built', '--out={tmp}/most-eval'],
    'python -m koajax.evaluate --workdir=/tmp/run-fold0,/tmp/run-fold1 '
    '--tta=five_crop --tta_crop=120 --out=/tmp/ensemble':
        ['koajax.evaluate',
         '--workdir={tmp}/koajax-semixup,{tmp}/koajax-semixup',
         '--tta=five_crop', '--tta_crop=120', '--out={tmp}/ensemble'],
    'python -m koajax.evaluation.compare --a=RUN_A/predictions.csv '
    '--b=RUN_B/predictions.csv [--head=kl]':
        ['koajax.evaluation.compare', '--a={tmp}/ensemble/predictions.csv',
         '--b={tmp}/koajax-semixup/predictions.csv', '--head=kl',
         '--n_chunks=5'],  # the smoke test set holds few subjects
    # Multi-task OARSI: the smoke preset's runs of two backbones and two
    # folds, trained and evaluated as one ensemble in test_oarsi_run.py.
    'python -m koajax.main --config=configs/oarsi.py:quick '
    '--workdir=/tmp/koajax-oarsi': 'help',
    'python -m koajax.main --config=configs/oarsi.py:quick '
    '--workdir=/tmp/koajax-oarsi-r34-fold1 --config.model.name=resnet34 '
    '--config.split.fold=1': 'help',
    'python -m koajax.evaluate --workdir=/tmp/koajax-oarsi,'
    '/tmp/koajax-oarsi-r34-fold1 --out=/tmp/koajax-oarsi-ensemble': 'help',
    # Folds of one cross-validation: tested in test_oarsi_run.py.
    'python -m koajax.evaluate --workdir=/runs/oarsi-sx50-fold0,'
    '/runs/oarsi-sx50-fold1 --out_of_fold': 'help',
    # The paper's setting needs ImageNet weights and hours; its splits are
    # made in test_presets.py, weight import is tested in
    # test_resnet_weights.py.
    'python -m koajax.main --config=configs/oarsi.py '
    '--workdir=/runs/oarsi-sx50-fold0 '
    '--config.model.init=/weights/se_resnext50_32x4d-a260b3a4.pth '
    '--config.split.fold=0': 'help',
    # Its smoke preset runs end to end in test_confidence_run.py and through
    # benchmarks/reproduction/confidence.py in test_reproduction.py.
    'python -m koajax.main --config=configs/confidence.py:quick '
    '--workdir=/tmp/koajax-confidence': 'help',
    # The same run with the cross-entropy loss (a method field): trained in
    # benchmarks/reproduction/confidence.py, its loss tested in
    # test_hybrid_loss.py.
    'python -m koajax.main --config=configs/confidence.py:quick '
    '--workdir=/tmp/koajax-confidence-ce --config.method_kwargs.loss_kind=ce':
        'help',
    # The paper's 500 epochs: hours on a GPU; its split is made in
    # test_presets.py.
    'python -m koajax.main --config=configs/confidence.py '
    '--workdir=/runs/confidence-paper': 'help',
    # Coherence learning: its smoke preset runs end to end in
    # test_coherence_run.py and, for the ablation's arms, through
    # benchmarks/reproduction/coherence.py in test_reproduction.py; its
    # paper split is made in test_presets.py.
    'python -m koajax.main --config=configs/coherence.py:quick '
    '--workdir=/tmp/koajax-coherence': 'help',
    'python -m koajax.main --config=configs/coherence.py:quick '
    '--workdir=/tmp/koajax-coherence-gap --config.model.kpn=False '
    '--config.method_kwargs.coherence=False': 'help',
    'python -m koajax.main --config=configs/coherence.py '
    '--workdir=/runs/coherence-paper': 'help',
    # The localiser: the smoke presets of both stages run end to end, with
    # koajax.evaluate and a build with --localizer (real chest and
    # extremity CRs refused), in test_localizer_run.py.
    'python -m koajax.main --config=configs/localizer.py:coarse_quick '
    '--workdir=/tmp/koajax-localizer/coarse': 'help',
    'python -m koajax.main --config=configs/localizer.py:quick '
    '--workdir=/tmp/koajax-localizer/fine': 'help',
    'python -m koajax.evaluate --workdir=/tmp/koajax-localizer/fine': 'help',
    # Generation runs above at 3 subjects.
    'python -m koajax.data.synthetic --out=/tmp/knees-s1 --num_subjects=560 '
    '--seed=1': 'help',
    'python -m koajax.data.build --manifest=/tmp/knees-s1/manifest.csv '
    '--out=/tmp/knees-s1-cache --localizer=/tmp/koajax-localizer': 'help',
    'python -m koajax.main --config=configs/supervised.py:quick '
    '--workdir=/tmp/koajax-sl-localised --config.data.source=cache '
    '--config.data.cache_dir=/tmp/knees-s1-cache': 'help',
    'python -m koajax.main --config=configs/active_learning.py:quick '
    '--workdir=/tmp/koajax-al':
        ['koajax.main', '--config=configs/active_learning.py:smoke',
         '--workdir={tmp}/koajax-al'],
    'python -m koajax.main --config=configs/active_learning.py:quick '
    '--workdir=/tmp/koajax-al-random --config.active.acquisition=random '
    '--config.active.consistency=false':
        ['koajax.main', '--config=configs/active_learning.py:smoke',
         '--workdir={tmp}/koajax-al-random',
         '--config.active.acquisition=random',
         '--config.active.consistency=false'],
    'python -m koajax.active.curves --runs=/tmp/koajax-al,/tmp/koajax-al-random '
    '--full_data=/tmp/koajax-supervised --out=/tmp/al-curves.png':
        ['koajax.active.curves', '--runs={tmp}/koajax-al,{tmp}/koajax-al-random',
         '--full_data={tmp}/koajax-semixup', '--out={tmp}/al-curves.png'],
    'python -m koajax.active.sweep --workdir=/tmp/koajax-semixup '
    '--split=unlabeled --samples=50':
        ['koajax.active.sweep', '--workdir={tmp}/koajax-semixup',
         '--split=unlabeled', '--samples=50'],
    # Without --localizer here: the manifest has its landmarks (a localiser
    # is trained in test_localizer_run.py).
    'python -m koajax.active.sweep --workdir=/tmp/koajax-semixup '
    '--manifest=/data/hospital/manifest.csv '
    '--localizer=/tmp/koajax-localizer':
        ['koajax.active.sweep', '--workdir={tmp}/koajax-semixup',
         '--manifest={tmp}/raw/manifest.csv', '--samples=2',
         '--out={tmp}/sweep-manifest'],
    # Grading new radiographs: the smoke SL run and localiser grade films
    # without landmarks through koajax.predict in test_predict.py, and
    # koajax.serve answers them, page and all, in test_web_page.py.
    'python -m koajax.main --config=configs/supervised.py:quick '
    '--workdir=/tmp/koajax-sl': 'help',
    'python -m koajax.data.synthetic --out=/tmp/new-films --num_subjects=20 '
    '--seed=7': 'help',
    'python -m koajax.predict --runs=/tmp/koajax-sl '
    '--localizer=/tmp/koajax-localizer --input=/tmp/new-films/images '
    '--out=/tmp/new-grades': 'help',
    'python -m koajax.serve --runs=/tmp/koajax-sl '
    '--localizer=/tmp/koajax-localizer --port=8000': 'help',
}


def flags_of(command):
  """(module, [flag names], [--config.field names]) of a README command."""
  words = shlex.split(command.replace('[', ' ').replace(']', ' '))
  module = words[2]
  names = [w[2:].split('=')[0] for w in words[3:] if w.startswith('--')]
  fields = [n[len('config.'):] for n in names if n.startswith('config.')]
  return module, [n for n in names if not n.startswith('config.')], fields


@functools.cache
def help_text(module):
  result = subprocess.run([sys.executable, '-m', module, '--help'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (module, result.stderr[-2000:])
  return result.stdout + result.stderr


def test_every_readme_command_is_covered():
  commands = readme_commands()
  assert commands, 'no commands found in README.md'
  missing = [c for c in commands if c not in SCENARIO]
  assert not missing, f'README commands this test does not run: {missing}'
  stale = [c for c in SCENARIO if c not in commands]
  assert not stale, f'commands no longer in README.md: {stale}'


@pytest.mark.parametrize('command', list(SCENARIO))
def test_readme_flags_exist(command):
  module, names, fields = flags_of(command)
  text = help_text(module)
  for name in names:
    assert re.search(rf'--(\[no\])?{re.escape(name)}\b', text), (
        f'{command}: {module} has no flag --{name}')
  if fields:
    config_file = next(w for w in command.split() if w.startswith(
        '--config='))[len('--config='):]
    name, _, preset = config_file.removeprefix('configs/').partition(':')
    config = load_config(name.removesuffix('.py'), preset or None)
    for field in fields:
      node = config
      for part in field.split('.'):
        assert part in node, f'{command}: the config has no field {field}'
        node = node[part]


def test_readme_commands_run_on_tiny_data(tmp_path):
  env = {**os.environ, 'KOAJAX_DATA_DIR': str(tmp_path / 'data'),
         'KOAJAX_VERBOSE': '1'}
  values = {'tmp': str(tmp_path)}
  for command, run in SCENARIO.items():
    if run == 'help':
      continue  # flags checked in test_readme_flags_exist
    if '{smoke_cache}' in ' '.join(run):
      summary = pd.read_json(tmp_path / 'koajax-data' / 'data_summary.json',
                             typ='series')
      values['smoke_cache'] = summary['cache_dir']
    args = [a.format(**values) for a in run]
    result = subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f'README: {command}\nran: {" ".join(args)}\n{result.stderr[-3000:]}')
  assert (tmp_path / 'koajax-semixup' / 'metrics.json').is_file()
  assert (tmp_path / 'al-curves.png').is_file()
  assert (tmp_path / 'built' / 'index.csv').is_file()
  assert 'cpu_devices' in (tmp_path / 'cpu_devices.json').read_text()
