"""Every training config exposes its method's options; methods are found by
name and declare their streams."""

import pytest

from koajax import methods
from koajax import tasks
from config_loader import load_config as load

FAMILY = ('supervised', 'mixup', 'pi_model', 'ict', 'mixmatch', 'semixup')


def test_the_semixup_family_is_registered_with_its_streams():
  registry = methods.registry()
  assert set(FAMILY) <= set(registry)
  kl = tasks.get('kl')
  for name in FAMILY:
    method = registry[name].create(kl)
    semi = name in ('pi_model', 'ict', 'mixmatch', 'semixup')
    assert method.streams == (('labeled', 'unlabeled') if semi
                              else ('labeled',)), name


@pytest.mark.parametrize('method', FAMILY)
@pytest.mark.parametrize('preset', ['default', 'quick', 'smoke'])
def test_method_options_are_config_fields(method, preset):
  config = load(method, preset)
  assert config.method == method
  spec = methods.spec(method)
  assert set(config.method_kwargs) == set(spec.options)
  # The config builds the method, defaults unchanged; the head comes from
  # the task.
  bound = methods.from_config(config, tasks.from_config(config)).fn
  assert bound.keywords['head'] == 'kl'
  for name, default in spec.options.items():
    assert bound.keywords[name] == default


def test_semixup_reference_options_and_ablations_are_settable():
  config = load('semixup')
  config.method_kwargs.floor_unlabeled = 0.55
  config.method_kwargs.interpolate = 'logits'
  config.method_kwargs.terms.interpolation = 0.0
  bound = methods.from_config(config, tasks.get('kl')).fn
  assert bound.keywords['floor_unlabeled'] == 0.55
  assert bound.keywords['terms'].interpolation == 0.0
  config.lock()  # as koajax.main loads it
  with pytest.raises(AttributeError):
    config.method_kwargs.terms.interpolaton = 1.0  # misspelt: refused


def test_an_unknown_method_names_the_field_and_the_choices():
  with pytest.raises(ValueError, match=r"unknown method 'semixpu' \(config "
                     r"field method\); choose one of .*semixup"):
    methods.spec('semixpu')


def test_binary_task_binds_its_head_and_classes():
  method = methods.spec('mixmatch').create(tasks.get('kl0_vs_kl2'))
  assert method.fn.keywords['head'] == 'kl0_vs_kl2'
  assert method.fn.keywords['num_classes'] == 2


@pytest.mark.parametrize('preset', ['default', 'quick', 'smoke'])
def test_active_learning_rounds_train_with_ce_or_the_pi_model(preset):
  from koajax.active import loop
  config = load('active_learning', preset)
  assert config.job == 'active_learning'
  assert config.active.acquisition in loop.ACQUISITIONS
  assert config.active.n_init <= config.active.budget
  with_consistency = loop.round_config(config)
  assert with_consistency.method == 'pi_model'
  method = methods.from_config(with_consistency, tasks.get('kl'))
  assert method.fn.keywords['weight'] == config.active.consistency_weight
  assert method.streams == ('labeled', 'unlabeled')
  config.active.consistency = False
  assert loop.round_config(config).method == 'supervised'
