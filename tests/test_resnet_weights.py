"""Pretrained weights from timm / legacy SENet files give timm's own
features and logits (timm and CPU PyTorch are test-only dependencies)."""

from pathlib import Path

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from koajax import cli
from koajax import models
from koajax.models import weights

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

NAMES = ['resnet18', 'resnet34', 'resnet50', 'seresnet50',
         'seresnext50_32x4d', 'legacy_seresnet50', 'legacy_seresnext50_32x4d']


def timm_model(name):
  """timm's network with random weights and batch-norm statistics far from
  their defaults, so that loading them matters."""
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
  return model


def save(model, path: Path) -> Path:
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if path.suffix == '.safetensors':
    safetensors_torch.save_file(state, str(path))
  else:
    torch.save(state, str(path))
  return path


@pytest.mark.parametrize('name', NAMES)
def test_features_and_logits_equal_timms(name, tmp_path):
  reference = timm_model(name)
  suffix = '.pth' if name.startswith('legacy') else '.safetensors'
  path = save(reference, tmp_path / f'w{suffix}')
  config = ml_collections.ConfigDict({'name': name, 'init': str(path)})
  model = models.create(config, heads={'imagenet': 1000}, rngs=nnx.Rngs(0))
  # The classifier is not loaded (a new task's heads): set it by hand.
  fc = reference.get_classifier()
  model.heads['imagenet'].kernel[...] = jnp.asarray(
      fc.weight.detach().numpy().T)
  model.heads['imagenet'].bias[...] = jnp.asarray(fc.bias.detach().numpy())
  x = np.random.default_rng(0).normal(size=(2, 3, 96, 96)).astype(np.float32)
  with torch.no_grad():
    feats = reference.forward_head(reference.forward_features(
        torch.from_numpy(x)), pre_logits=True).numpy()
    logits = reference(torch.from_numpy(x)).numpy()
  out = model(jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(out['features']['pooled'], feats, atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(out['logits']['imagenet'], logits, atol=1e-4,
                             rtol=1e-4)


def test_weights_of_another_architecture_are_named(tmp_path):
  path = save(timm_model('resnet18'), tmp_path / 'r18.safetensors')
  model = models.registry()['resnet50'](heads={'kl': 5}, rngs=nnx.Rngs(0))
  before = np.asarray(model.stem_conv.kernel[...])
  with pytest.raises(cli.BadInput) as e:
    weights.load_into(model, path)
  text = str(e.value)
  assert f'{path} does not fit model ResNet' in text
  assert 'missing layer1.0.conv3.weight (256, 64, 1, 1)' in text or \
      'layer1.0.conv1.weight has shape' in text
  # Nothing half-loaded.
  np.testing.assert_array_equal(model.stem_conv.kernel[...], before)


def test_truncated_and_pickled_files_are_named(tmp_path):
  path = save(timm_model('resnet18'), tmp_path / 'r18.safetensors')
  cut = tmp_path / 'cut.safetensors'
  cut.write_bytes(path.read_bytes()[:1000])
  model = models.registry()['resnet18'](heads={'kl': 5}, rngs=nnx.Rngs(0))
  with pytest.raises(cli.BadInput, match='cannot be read as weights'):
    weights.load_into(model, cut)
  pickled = tmp_path / 'model.pth'
  torch.save(timm_model('resnet18'), str(pickled))  # a whole module
  with pytest.raises(cli.BadInput, match='cannot be read as weights'):
    weights.load_into(model, pickled)
  with pytest.raises(cli.BadInput, match='not found'):
    weights.load_into(model, tmp_path / 'none.pth')
