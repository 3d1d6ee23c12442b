"""Every training config exposes its method's options and the CPU layout."""

import inspect

import pytest

from koajax import methods
from config_loader import load_config as load


@pytest.mark.parametrize('method', sorted(methods.METHODS))
@pytest.mark.parametrize('preset', ['default', 'quick', 'smoke'])
def test_method_options_are_config_fields(method, preset):
  config = load(method, preset)
  assert config.method == method
  signature = inspect.signature(methods.METHODS[method])
  keyword_only = {n for n, p in signature.parameters.items()
                  if p.kind is p.KEYWORD_ONLY and n != 'epoch'}
  assert set(config.method_kwargs) == keyword_only
  # The config builds the method, defaults unchanged.
  bound = methods.from_config(config)
  for name in keyword_only:
    assert bound.keywords[name] == signature.parameters[name].default


def test_semixup_reference_options_and_ablations_are_settable():
  config = load('semixup')
  config.method_kwargs.floor_unlabeled = 0.55
  config.method_kwargs.interpolate = 'logits'
  config.method_kwargs.terms.interpolation = 0.0
  bound = methods.from_config(config)
  assert bound.keywords['floor_unlabeled'] == 0.55
  assert bound.keywords['terms'].interpolation == 0.0
  config.lock()  # as koajax.main loads it
  with pytest.raises(AttributeError):
    config.method_kwargs.terms.interpolaton = 1.0  # misspelt: refused


@pytest.mark.parametrize('preset', ['default', 'quick', 'smoke'])
def test_active_learning_rounds_train_with_ce_or_the_pi_model(preset):
  from koajax import config_lib
  from koajax.active import loop
  config = load('active_learning', preset)
  assert config.job == 'active_learning'
  assert config.active.acquisition in config_lib.ACQUISITIONS
  assert config.active.n_init <= config.active.budget
  with_consistency = loop.round_config(config)
  assert with_consistency.method == 'pi_model'
  assert methods.from_config(with_consistency).keywords['weight'] == \
      config.active.consistency_weight
  config.active.consistency = False
  assert loop.round_config(config).method == 'supervised'
