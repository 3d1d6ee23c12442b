r"""MC-dropout uncertainty sweep of a trained checkpoint over a pool of knees.

  python -m koajax.active.sweep --workdir=RUN [--split=unlabeled] \
      [--cache=DIR | --manifest=CSV [--localizer=DIR]] [--samples=50] \
      [--checkpoint=...] [--top_k=32] [--out=OUT]

RUN is a `python -m koajax.main` training workdir (its config.json rebuilds
the model, its checkpoints hold the weights); it is only read, so a
read-only copy works and stays byte-identical. The pool is a split of the
run's own data (--split: unlabeled, labeled, val or test), every knee of
another koajax cache (--cache), or the knees of a DICOM manifest (--manifest,
with landmarks.csv beside it; cached next to it on first use). With
--localizer (a trained localiser, `koajax.localize`) the knees without
landmarks are localised, so an archive with neither grades nor landmarks
can be scored.

OUT (default RUN/sweep/<checkpoint>-<pool>) receives
  scores.csv       knee id, side, true grade (-1: ungraded), every score of
                   `koajax.active.uncertainty` and the mean probabilities;
  hist_<score>.png a histogram of each score;
  top_uncertain.png the --top_k knees with the highest --rank_by score.
The pool is swept in chunks saved under OUT/parts as they finish, so a
killed sweep reruns only what is missing; a part that does not read back
(cut short, overwritten) is computed again, with a warning naming it.
Errors are one line (`koajax.cli`), exit 2 for what the user can fix.
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
from pathlib import Path
import zipfile

from absl import flags
from absl import logging
import numpy as np
import pandas as pd

from koajax import cli
from koajax.active import plots
from koajax.active import uncertainty

log = std_logging.getLogger(__name__)

SCORES_CSV = 'scores.csv'
TOP_PNG = 'top_uncertain.png'

def _define_flags() -> None:
  """Flags of the command, defined only when it runs as a program, so that
  importing this module beside another command defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_string('checkpoint', 'best',
                      'best (the first selection metric), best_<metric> or '
                      'latest.')
  flags.DEFINE_string('split', 'unlabeled',
                      'Pool: unlabeled, labeled, val or test.')
  flags.DEFINE_string('cache', None, 'Pool: every knee of this koajax cache.')
  flags.DEFINE_string('manifest', None,
                      'Pool: the knees of this DICOM manifest CSV.')
  flags.DEFINE_string('localizer', None,
                      'With --manifest: a trained localiser folder (its '
                      'coarse/ and fine/ runs) for knees without landmarks.')
  flags.DEFINE_integer('samples', 50, 'MC-dropout passes T.')
  flags.DEFINE_integer('samples_per_pass', None,
                       'Vmap this many of the T passes at once (less '
                       'memory); default all.')
  flags.DEFINE_integer('chunk_size', 64, 'Knees per device call.')
  flags.DEFINE_integer('top_k', 32, 'Knees in the top-uncertain grid.')
  flags.DEFINE_enum('rank_by', 'bald', uncertainty.SCORE_NAMES,
                    'Score that ranks the grid.')
  flags.DEFINE_integer('seed', 0, 'Dropout key seed.')
  flags.DEFINE_string('out', None, 'Output folder.')


def _atomic_save(path: Path, **arrays) -> None:
  tmp = path.with_name(path.name + '.tmp.npz')
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _load_part(path: Path, knees: int) -> dict[str, np.ndarray] | None:
  """The results saved in part `path` for `knees` knees, or None when it is
  missing or does not read back whole (then it is computed again)."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as saved:
      result = {k: saved[k] for k in saved.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    why = f'{type(e).__name__}: {e}'
  else:
    wanted = {*uncertainty.SCORE_NAMES, 'mean_probs'}
    if wanted <= set(result) and all(len(v) == knees for v in result.values()):
      return result
    why = 'its arrays are not those of this chunk'
  log.warning('sweep part %s is damaged (%s); computing it again', path,
              ' '.join(why.split())[:200])
  return None


def _pool(config, workdir, *, split: str, cache_dir, manifest,
          localizer=None):
  """(cache, indices, name) of the pool the flags describe."""
  from koajax import runtime
  from koajax import train
  from koajax.data import cache as cache_lib
  from koajax.data import sources
  if cache_dir and manifest:
    raise ValueError('give --cache or --manifest, not both')
  if localizer and not manifest:
    raise ValueError('--localizer finds the landmarks of a --manifest\'s '
                     'knees; give --manifest too')
  if cache_dir:
    cache = cache_lib.open_cache(cache_dir)
    return cache, np.arange(len(cache.index)), Path(cache_dir).name
  if manifest:
    data = config.data.copy_and_resolve_references()
    data.source, data.manifest, data.cache_dir = 'manifest', str(manifest), ''
    data.landmarks = ''
    data.crop, data.localizer = 'knee', str(localizer or '')
    cache = sources.resolve_cache(data)
    return cache, np.arange(len(cache.index)), Path(manifest).stem
  splits = train.saved_splits(workdir)
  if splits is None:
    raise FileNotFoundError(f'{workdir} has no {train.SPLITS_NPZ}: sweep a '
                            '--cache or --manifest instead')
  cache = runtime.process_zero_first(
      lambda: sources.resolve_cache(config.data), 'koajax-cache')
  return cache, train.split_indices(splits, split), split


def score_pool(predictor, weights, cache, indices: np.ndarray, *, key,
               parts_dir: Path | None = None, settings: dict | None = None,
               progress=None) -> dict[str, np.ndarray]:
  """Scores and mean probabilities of the knees at `indices` under
  `weights` (anything with `params` and `extra`: a train state, a member).

  With `parts_dir`, each chunk's results are saved there as they come, next
  to `settings`; a later call with the same settings loads the chunks it
  finds instead of recomputing them.
  """
  import jax
  if parts_dir is not None:
    parts_dir.mkdir(parents=True, exist_ok=True)
    meta = parts_dir / 'settings.json'
    settings = json.dumps(settings or {}, sort_keys=True)
    if not meta.is_file() or meta.read_bytes() != settings.encode():
      for stale in parts_dir.glob('chunk_*.npz'):
        stale.unlink()
      tmp = meta.with_name(meta.name + '.tmp')
      tmp.write_text(settings)
      os.replace(tmp, meta)
  results = []
  # Saved chunks are still read from the cache (cheap next to T passes), so
  # chunk boundaries stay those of an uninterrupted sweep.
  for c, images in enumerate(predictor.chunks(cache, indices)):
    path = parts_dir / f'chunk_{c:05d}.npz' if parts_dir else None
    result = _load_part(path, len(images)) if path is not None else None
    if result is None:
      probs = predictor(weights.params, weights.extra, images,
                        jax.random.fold_in(key, c))
      result = {**uncertainty.scores(probs),
                'mean_probs': probs.mean(axis=0)}
      if path is not None:
        _atomic_save(path, **result)
    results.append(result)
    if progress is not None:
      progress.update(len(images))
  return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def sweep(workdir: str | Path, *, checkpoint: str = 'best',
          split: str = 'unlabeled', cache_dir=None, manifest=None,
          localizer=None, num_samples: int = 50, samples_per_pass: int | None = None,
          chunk_size: int = 64, top_k: int = 32, rank_by: str = 'bald',
          seed: int = 0, out=None) -> pd.DataFrame:
  """Runs the sweep and writes scores.csv and the figures; returns the table."""
  from koajax import calibrate
  from koajax import config_lib
  config = config_lib.load_run_config(workdir)
  calibrate.configure_host(config)
  import jax
  import tqdm
  from koajax import tasks
  from koajax.active import mc_dropout
  from koajax.data import pipeline
  from koajax.train import predictor as predictor_lib

  cache, indices, name = _pool(config, workdir, split=split,
                               cache_dir=cache_dir, manifest=manifest,
                               localizer=localizer)
  if not len(indices):
    raise ValueError(f'the pool {name!r} has no knees')
  task = tasks.from_config(config)
  loaded = predictor_lib.Predictor.from_runs([workdir], checkpoint=checkpoint)
  member, mesh = loaded.members[0], loaded.mesh
  out = Path(out) if out else Path(workdir) / 'sweep' / f'{checkpoint}-{name}'
  predictor = mc_dropout.MCDropoutPredictor(
      member.graphdef, mesh, num_samples=num_samples,
      samples_per_pass=samples_per_pass, chunk_size=chunk_size,
      head=task.heads[0].name, view=task.view, view_size=task.view_size)
  settings = {
      'checkpoint': checkpoint, 'step': member.step, 'pool': name,
      'samples': num_samples, 'chunk_size': predictor.chunk_size,
      'seed': seed, 'knees': hashlib.sha1(
          np.asarray(indices, np.int64).tobytes()).hexdigest()}
  with jax.set_mesh(mesh), tqdm.tqdm(
      total=len(indices), unit='knee',
      desc=f'MC dropout x{num_samples}') as bar:
    result = score_pool(predictor, member, cache, indices,
                        key=jax.random.key(seed), parts_dir=out / 'parts',
                        settings=settings, progress=bar)

  index = cache.index.iloc[indices]
  table = pd.DataFrame({
      'knee_id': index['knee_id'].to_numpy(), 'side': index['side'].to_numpy(),
      'kl': index['kl'].to_numpy(),
      **{s: result[s] for s in uncertainty.SCORE_NAMES},
      **{f'p{k}': result['mean_probs'][:, k]
         for k in range(result['mean_probs'].shape[1])}})
  tmp = out / (SCORES_CSV + '.tmp')
  table.to_csv(tmp, index=False)
  os.replace(tmp, out / SCORES_CSV)
  plots.score_histograms(out, {s: result[s] for s in uncertainty.SCORE_NAMES})
  top = uncertainty.most_uncertain(result[rank_by], min(top_k, len(indices)))
  if len(top):
    images = np.concatenate([b['image'] for b in pipeline.eval_batches(
        cache, indices[top], view=task.view, view_size=task.view_size,
        batch_size=len(top),
        sharding=pipeline.Sharding(0, 1))])
    plots.uncertain_grid(out / TOP_PNG, images, [
        f'{table.knee_id.iloc[i]}\n{rank_by} {result[rank_by][i]:.3f}'
        for i in top])
  print(f'{len(indices)} knees x {num_samples} passes: {out / SCORES_CSV}')
  return table


def main(argv):
  del argv  # cli.run_absl refuses positional arguments
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('koajax').setLevel(std_logging.INFO)
  # Orbax warns about every read-only checkpoint folder it opens.
  std_logging.getLogger('absl').setLevel(std_logging.ERROR)
  f = flags.FLAGS
  sweep(f.workdir, checkpoint=f.checkpoint, split=f.split, cache_dir=f.cache,
        manifest=f.manifest, localizer=f.localizer, num_samples=f.samples,
        samples_per_pass=f.samples_per_pass, chunk_size=f.chunk_size,
        top_k=f.top_k, rank_by=f.rank_by, seed=f.seed, out=f.out)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir'])
  cli.run_absl('koajax.active.sweep', main)
