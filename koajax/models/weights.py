"""Pretrained ResNet-family weights from a file the user supplies.

`--config.model.init=PATH` loads a PyTorch state_dict (`.pth` / `.pt`, read
with `torch.load(weights_only=True)`, never plain pickle; PyTorch is needed
only for these) or a `.safetensors` file (read with NumPy) into a
`koajax.models.resnet.ResNet`. Key names of timm and torchvision
(`conv1`, `bn1`, `layerN.M.*`, `se.fc1`, `downsample.0/1`, `fc`) and of the
legacy Cadene SENets (`layer0.conv1`, `se_module`, `last_linear`) are
understood; batch-norm statistics are loaded, the ImageNet classifier and
`num_batches_tracked` dropped. Nothing is downloaded.

Every missing, unexpected or mismatched key is named in one error, so a
file of another architecture says which.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
import re

from flax import nnx
import jax.numpy as jnp
import numpy as np

from koajax import cli

# The ImageNet classifier of each layout, dropped.
_CLASSIFIERS = ('fc.', 'last_linear.', 'head.fc.')
_BN_FIELDS = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
              'running_var': 'var'}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """{key: array} of a `.safetensors`, `.pth` or `.pt` file."""
  path = Path(path)
  if not path.is_file():
    raise cli.BadInput(f'config field model.init: weights file {path} not '
                       'found')
  try:
    if path.suffix == '.safetensors':
      from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
      return dict(st.load_file(str(path)))
    if path.suffix in ('.pth', '.pt', '.bin'):
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise cli.BadInput(
            f'{path} is a PyTorch file and PyTorch is not installed; install '
            'torch, or convert it to .safetensors') from e
      state = torch.load(str(path), map_location='cpu', weights_only=True)
      if isinstance(state, Mapping) and 'state_dict' in state:
        state = state['state_dict']
      if not isinstance(state, Mapping) or not all(
          hasattr(v, 'numpy') for v in state.values()):
        raise cli.BadInput(f'{path} is not a plain state_dict (a mapping of '
                           'names to tensors); save model.state_dict()')
      return {k.removeprefix('module.'): v.float().numpy()
              if v.is_floating_point() else v.numpy()
              for k, v in state.items()}
  except cli.BadInput:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise cli.BadInput(f'{path} cannot be read as weights ({cli.message(e)}); '
                       'is it truncated?') from e
  raise cli.BadInput(f'{path}: weights must be .safetensors, .pth or .pt')


def _torch_names(model) -> dict[tuple, tuple[str, str]]:
  """koajax parameter path -> (torch key, kind) in timm's names; `kind` says
  how the array is laid out ('conv', 'bias', 'bn')."""
  names = {('stem_conv', 'kernel'): ('conv1.weight', 'conv')}
  for f, g in _BN_FIELDS.items():
    names[('stem_bn', g)] = (f'bn1.{f}', 'bn')
  for i, stage in enumerate(model.stages):
    for j, block in enumerate(stage):
      prefix = f'layer{i + 1}.{j}'
      convs = ('conv1', 'conv2', 'conv3') if block.bottleneck else (
          'conv1', 'conv2')
      for n, conv in enumerate(convs, start=1):
        names[('stages', i, j, conv, 'kernel')] = (
            f'{prefix}.{conv}.weight', 'conv')
        for f, g in _BN_FIELDS.items():
          names[('stages', i, j, f'bn{n}', g)] = (f'{prefix}.bn{n}.{f}', 'bn')
      if block.se is not None:
        for fc in ('fc1', 'fc2'):
          names[('stages', i, j, 'se', fc, 'kernel')] = (
              f'{prefix}.se.{fc}.weight', 'conv')
          names[('stages', i, j, 'se', fc, 'bias')] = (
              f'{prefix}.se.{fc}.bias', 'bias')
      if block.down_conv is not None:
        names[('stages', i, j, 'down_conv', 'kernel')] = (
            f'{prefix}.downsample.0.weight', 'conv')
        for f, g in _BN_FIELDS.items():
          names[('stages', i, j, 'down_bn', g)] = (
              f'{prefix}.downsample.1.{f}', 'bn')
  return names


def _to_timm_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The legacy SENet keys renamed as timm's; classifier and counters
  dropped."""
  out = {}
  for key, value in state.items():
    if key.startswith(_CLASSIFIERS) or key.endswith('num_batches_tracked'):
      continue
    key = re.sub(r'^layer0\.', '', key).replace('.se_module.', '.se.')
    out[key] = value
  return out


def _layout(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':  # OIHW -> HWIO (grouped: O, I/g -> I/g, O)
    return np.transpose(value, (2, 3, 1, 0))
  return value


def load_into(model, path: str | Path) -> None:
  """Sets the backbone of `model` (a ResNet) from the weights at `path`;
  its heads are left as initialised."""
  state = _to_timm_names(read_state_dict(path))
  names = _torch_names(model)
  problems, used, updates = [], set(), []
  for where, (key, kind) in names.items():
    target = _variable(model, where)
    if key not in state:
      problems.append(f'missing {key} {tuple(np.shape(target[...]))}')
      continue
    used.add(key)
    value = _layout(np.asarray(state[key], np.float32), kind)
    if value.shape != tuple(np.shape(target[...])):
      problems.append(f'{key} has shape {tuple(state[key].shape)}, the model '
                      f'needs {tuple(np.shape(target[...]))} (as {kind})')
      continue
    updates.append((target, jnp.asarray(value, target[...].dtype)))
  unexpected = sorted(set(state) - used)
  problems += [f'unexpected {k} {tuple(state[k].shape)}' for k in unexpected]
  if problems:
    shown = '; '.join(problems[:6])
    more = f'; and {len(problems) - 6} more' if len(problems) > 6 else ''
    raise cli.BadInput(
        f'{path} does not fit model {type(model).__name__} '
        f'({len(problems)} problems: {shown}{more}); is it the weights of '
        'the same architecture?')
  for target, value in updates:  # all or nothing
    target[...] = value


def _variable(model, path: tuple) -> nnx.Variable:
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node
