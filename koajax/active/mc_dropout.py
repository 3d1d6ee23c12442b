"""MC dropout: T stochastic passes as one vmapped computation.

    probs = mc_dropout_probs(model, pairs, key, num_samples=T)  # (T, N, C)

runs the network with dropout on and the norms in inference mode, once per
key of `split(key, T)`, under `jax.vmap`. vmap batches only what depends on
the key, so every layer before the first dropout (the three full-resolution
convolutions of the Semixup network) runs once and is shared by the T
samples; the rest runs as one big batch instead of T small ones.

`MCDropoutPredictor` runs this on every device of a mesh for the device's own
knees (`shard_map`) and walks a pool in chunks, so memory is bounded by
chunk x T whatever the pool size. Left to the automatic partitioner the
vmapped batch (T x knees, knees sharded) cannot stay sharded when vmap
folds T into the batch axis of the convolutions: on 4 CPU devices that ran
5x slower than under shard_map (benchmarks/README.md).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koajax.data import pipeline


def mc_dropout_probs(model: nnx.Module, pairs: jax.Array, key: jax.Array, *,
                     num_samples: int, samples_per_pass: int | None = None,
                     head: str = 'kl') -> jax.Array:
  """(T, N, C) softmax samples of `model` on float pairs (N, 2, H, W).

  Args:
    model: a Siamese network (`koajax.models`), called with `train=False,
      dropout=True`.
    pairs: normalised patch pairs.
    key: sample t uses dropout key `split(key, num_samples)[t]`.
    num_samples: T, the number of MC samples.
    samples_per_pass: vmap this many samples at once and loop over groups
      (bounds memory at the cost of recomputing the shared layers per group);
      None vmaps all T.
    head: the head whose probabilities are sampled.
  """
  keys = jax.random.split(key, num_samples)

  def one(k):
    logits = model(pairs, train=False, dropout=True,
                   rngs=nnx.Rngs(dropout=k))['logits'][head]
    return jax.nn.softmax(logits.astype(jnp.float32))

  if samples_per_pass is None or samples_per_pass >= num_samples:
    return jax.vmap(one)(keys)
  return jax.lax.map(one, keys, batch_size=samples_per_pass)


def _predict(params, extra, images, key, *, graphdef, num_samples,
             samples_per_pass, head):
  """One device's share: its knees, its own dropout keys."""
  key = jax.random.fold_in(key, jax.lax.axis_index('data'))
  model = nnx.merge(graphdef, params, extra, copy=True)
  pairs = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5
  return mc_dropout_probs(model, pairs, key, num_samples=num_samples,
                          samples_per_pass=samples_per_pass, head=head)


class MCDropoutPredictor:
  """MC-dropout probabilities of cached knees, sharded over a mesh.

  Chunk c of a sweep uses the key `fold_in(key, c)`, and device d folds in
  d: the same key, chunk size and device count give the same samples, run
  after run.
  """

  def __init__(self, graphdef, mesh: jax.sharding.Mesh, *, num_samples: int,
               samples_per_pass: int | None = None, chunk_size: int = 64,
               head: str = 'kl', view: str = 'siamese', view_size: int = 0):
    if num_samples < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    self.mesh = mesh
    self.num_samples = num_samples
    self.view = view
    self.view_size = view_size
    # Every device gets the same number of knees.
    self.chunk_size = max(mesh.size, chunk_size // mesh.size * mesh.size)
    self._data = jax.NamedSharding(mesh, jax.P('data'))
    local = jax.shard_map(
        functools.partial(_predict, graphdef=graphdef,
                          num_samples=num_samples,
                          samples_per_pass=samples_per_pass, head=head),
        mesh=mesh, in_specs=(jax.P(), jax.P(), jax.P('data'), jax.P()),
        out_specs=jax.P(None, 'data'))
    # Replicated output: every process can read all probabilities.
    self._fn = jax.jit(local, out_shardings=jax.NamedSharding(mesh, jax.P()))

  def chunks(self, cache, indices: np.ndarray) -> Iterator[np.ndarray]:
    """uint8 pair images of `indices`, `chunk_size` knees at a time."""
    yield from (b['image'] for b in pipeline.eval_batches(
        cache, indices, view=self.view, view_size=self.view_size,
        batch_size=self.chunk_size,
        sharding=pipeline.Sharding(0, 1)))

  def __call__(self, params, extra, images: np.ndarray,
               key: jax.Array) -> np.ndarray:
    """(T, n, C) probabilities of one chunk of n <= chunk_size knees."""
    n = len(images)
    pad = -n % self.mesh.size
    images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
    sharded = jax.make_array_from_callback(
        images.shape, self._data, lambda rows: images[rows])
    return np.asarray(self._fn(params, extra, sharded, key))[:, :n]

  def predict(self, params, extra, cache, indices: np.ndarray,
              key: jax.Array, progress=None) -> np.ndarray:
    """(T, len(indices), C) probabilities of the knees at `indices`."""
    out = []
    for c, images in enumerate(self.chunks(cache, indices)):
      out.append(self(params, extra, images, jax.random.fold_in(key, c)))
      if progress is not None:
        progress.update(len(images))
    return np.concatenate(out, axis=1)
