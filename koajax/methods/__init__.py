"""Training methods, found by name: how a batch becomes a loss.

A method is an object with

  streams                       the data streams it reads ('labeled',
                                'unlabeled'); the trainer opens these only
  init_state(training)          state fitted on the training data before the
                                first step (a Gaussian mixture, say)
  loss(forward, batch, key, *, epoch, state) -> (loss, aux)
                                the pure loss of one step
  update_state(state, validation)
                                new state from the validation predictions
                                after each evaluation (a class-mean
                                confidence, say)
  report_sections(state, probs, labels)
                                further sections of the test report that
                                need the method's state (the coherence
                                of the predictions under a fitted mixture)

A state holding `input_norm` ({'mean', 'std'}) has every input standardised
with it at prediction, as the method does in training (multi-task OARSI's
training-set statistics).

The state is a pytree kept in the train state, so it is checkpointed with
the weights and a resumed run goes on with exactly what it had. `forward(images,
key, **inputs)` runs the model in training mode and returns its output dict
({'logits': {head: ...}, 'features': {...}}); `inputs` are the model's other
keyword inputs, if it takes any (`keypoints=` for the keypoint pooling
network). `images` may also be a tuple of parts of one batch (the labeled
and unlabeled knees of a consistency pool), each input then a tuple of as
many parts: the output is the whole batch's, and the step runs the parts as
separate calls unless the model couples the knees of a batch (batch norm),
so that knees sharded over the data mesh stay on their devices
(`koajax.train.step.forward_parts`). `batch` maps each stream to a dict
of arrays (image, labels {head: ...}, grades, keypoints in the 'keypoints'
view, ...).

Every module of this package that defines `METHODS = {name: Spec}` offers its
methods to configs (`config.method`); `config.method='pkg.module:name'` names
one defined elsewhere. Adding a method is adding a module.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
import dataclasses
import functools
import importlib
from typing import Any

import jax
import ml_collections
import numpy as np

from koajax import registry as registry_lib
from koajax import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """What `init_state` may fit on: the labeled knees of the run."""
  index: Any  # the cache index rows of the labeled knees (a DataFrame)
  labels: Mapping[str, np.ndarray]  # {head: labels}, -1 masked
  seed: int
  # () -> uint8 batches of the labeled knees' views (the task's view, not
  # augmented), read when called; None where no images are at hand.
  images: Callable[[], Iterable[np.ndarray]] | None = None


@dataclasses.dataclass(frozen=True)
class Validation:
  """What `update_state` sees after an evaluation."""
  probs: Mapping[str, np.ndarray]  # {head: (n, classes)}
  labels: Mapping[str, np.ndarray]  # {head: (n,)}, -1 masked
  epoch: float


class Method(abc.ABC):
  """The method interface, with defaults: the labeled stream, no state."""
  streams: tuple[str, ...] = ('labeled',)

  def init_state(self, training: TrainingData) -> Any:
    del training
    return {}

  @abc.abstractmethod
  def loss(self, forward, batch, key, *, epoch, state):
    """(loss, aux) of one step; pure, traced inside the jitted step."""

  def update_state(self, state: Any, validation: Validation) -> Any:
    del validation
    return state

  def report_sections(self, state: Any, probs: Mapping[str, np.ndarray],
                      labels: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{name: JSON-ready value} added to the test report's metrics.json,
    from the test knees' probabilities and labels ({head: ...}, -1
    masked); none by default."""
    del state, probs, labels
    return {}


@dataclasses.dataclass(frozen=True)
class LossMethod(Method):
  """A stateless method: a loss function of (forward, batch, key, epoch)."""
  fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  streams: tuple[str, ...] = ('labeled',)

  def loss(self, forward, batch, key, *, epoch, state):
    del state
    return self.fn(forward, batch, key, epoch=epoch)


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a config makes a method: create(task, **options); the option
  defaults show in the config, where each can be overridden."""
  create: Callable[..., Method]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@functools.cache
def registry() -> dict[str, Spec]:
  """Every method name of this package's modules -> its Spec."""
  return registry_lib.discover(__name__, __path__, 'METHODS')


def spec(name: str) -> Spec:
  """The Spec of `name`: a registered method or 'pkg.module:name'."""
  if ':' in name:
    module, attr = name.split(':', 1)
    return getattr(importlib.import_module(module), attr)
  specs = registry()
  if name not in specs:
    raise ValueError(f'unknown method {name!r} (config field method); choose '
                     f'one of {", ".join(sorted(specs))}')
  return specs[name]


def options(name: str) -> dict[str, Any]:
  """The options of method `name` with their defaults, config-ready."""
  out = {}
  for key, value in spec(name).options.items():
    if dataclasses.is_dataclass(value):
      value = dataclasses.asdict(value)
    elif value is None:  # optional floats (the lambda floors): settable
      value = ml_collections.config_dict.placeholder(float)
    out[key] = value
  return out


def from_config(config: ml_collections.ConfigDict,
                task: tasks_lib.Task) -> Method:
  """The method `config.method` names, with `config.method_kwargs` bound."""
  kwargs = dict(config.get('method_kwargs', {}))
  return spec(config.method).create(task, **kwargs)
