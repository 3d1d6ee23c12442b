"""The active-learning loop: train, test, score, label the most uncertain.

    python -m koajax.main --config=configs/active_learning.py[:preset] --workdir=DIR

The knees of the training sites are split once (by subject) into a
validation set, used to pick each round's best checkpoint, and the candidates.
Each round partitions the candidates into three disjoint sets:
  D_L   the labeled knees (n_init random ones at first),
  U     with consistency on, the |D_L| least uncertain other candidates,
        used unlabeled by the consistency term,
  pool  the rest.
A round trains a network on D_L (and U) -- a fresh one, or with
`active.warm_start` the previous round's last weights -- tests its best-by-BA
checkpoint on the held-out site, scores U and the pool with the acquisition
function and moves the `n_batch` most uncertain knees into D_L for the next
round, until `budget` knees are labeled.

DIR/round_NN/ is an ordinary training workdir (checkpoints, metrics.json,
predictions.csv, plots) plus sets.json (the round's D_L, U and pool, as
cache rows and knee ids) and, once scored, scores.csv; round.json marks the
round done. A rerun in DIR resumes at the round that was running (and within
it from its last checkpoint). At the end DIR/curve.csv and DIR/curve.png hold
the learning curve (labeled knees vs balanced accuracy and kappa).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import pandas as pd
import tqdm

from koajax import config_checks
from koajax import runtime
from koajax import tasks
from koajax import train
from koajax.active import mc_dropout
from koajax.active import plots
from koajax.active import sweep
from koajax.active import uncertainty
from koajax.data import sources
from koajax.data import split_recipes
from koajax.train import workdir as workdir_lib

log = logging.getLogger(__name__)

CURVE_CSV = 'curve.csv'
CURVE_PNG = 'curve.png'
ACQUISITIONS = ('random', 'entropy', 'least_confidence', 'entropy_mcd', 'bald')
# acquisition -> (score ranked, MC-dropout passes: None = config's T).
_SCORE_OF = {'entropy': ('entropy', 1),
             'least_confidence': ('least_confidence', 1),
             'entropy_mcd': ('entropy', None),
             'bald': ('bald', None)}


@dataclasses.dataclass(frozen=True)
class RoundSets:
  """Cache rows of one round's labeled, consistency and pool knees."""
  labeled: np.ndarray
  unlabeled: np.ndarray
  pool: np.ndarray

  def __post_init__(self):
    sets = (self.labeled, self.unlabeled, self.pool)
    total = sum(len(s) for s in sets)
    if len(np.unique(np.concatenate(sets))) != total:
      raise ValueError('a knee is in two of D_L, U and the pool')

  @property
  def candidates(self) -> np.ndarray:
    """Every knee not yet labeled (U and the pool), sorted."""
    return np.sort(np.concatenate([self.unlabeled, self.pool]))


def candidates(split: split_recipes.Splits, active: ml_collections.ConfigDict,
               *, seed: int) -> np.ndarray:
  """The knees that may be labeled: the split's labeled set, or
  `active.pool_size` of them drawn at random."""
  rows = split.labeled
  if 0 < active.pool_size < len(rows):
    rows = np.sort(np.random.default_rng(seed).choice(
        rows, active.pool_size, replace=False))
  return rows


def initial_sets(candidates: np.ndarray, *, n_init: int, consistency: bool,
                 seed: int) -> RoundSets:
  """n_init random labeled knees; with consistency as many random U knees
  (no model yet to rank them)."""
  if n_init > len(candidates):
    raise ValueError(f'n_init={n_init} exceeds the {len(candidates)} '
                     'candidate knees')
  order = np.random.default_rng(seed).permutation(np.sort(candidates))
  n_u = min(n_init, len(order) - n_init) if consistency else 0
  return RoundSets(labeled=np.sort(order[:n_init]),
                   unlabeled=np.sort(order[n_init:n_init + n_u]),
                   pool=np.sort(order[n_init + n_u:]))


def next_sets(sets: RoundSets, scores: np.ndarray | None, *, n_query: int,
              consistency: bool, seed: int) -> tuple[RoundSets, np.ndarray]:
  """(the next round's sets, the queried rows) from uncertainty `scores`
  over `sets.candidates` (None: random acquisition).

  The `n_query` most uncertain candidates are labeled; with consistency, the
  |D_L| least uncertain of the others become U.
  """
  candidates = sets.candidates
  if scores is None:  # random: a seeded order stands in for the ranking
    ranking = np.random.default_rng(seed).permutation(len(candidates))
  else:
    if len(scores) != len(candidates):
      raise ValueError(f'{len(scores)} scores for {len(candidates)} knees')
    ranking = uncertainty.most_uncertain(scores, len(scores))
  n_query = min(n_query, len(candidates))
  queried = candidates[ranking[:n_query]]
  labeled = np.sort(np.concatenate([sets.labeled, queried]))
  # The rest, most certain first (random: the seeded order again).
  rest = ranking[n_query:][::-1] if scores is not None else ranking[n_query:]
  n_u = min(len(labeled), len(rest)) if consistency else 0
  return RoundSets(labeled=labeled,
                   unlabeled=np.sort(candidates[rest[:n_u]]),
                   pool=np.sort(candidates[rest[n_u:]])), np.sort(queried)


def round_config(config: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  """The training config of one round: CE, or the Pi-model's CE plus
  consistency, on the active-learning config's network and schedule."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  if config.active.consistency:
    cfg.method = 'pi_model'
    cfg.method_kwargs = {'weight': config.active.consistency_weight}
  else:
    cfg.method, cfg.method_kwargs = 'supervised', {}
  return cfg


def _write_json(path: Path, value: Any) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=1) + '\n')
  os.replace(tmp, path)


class Loop:
  """The rounds of one active-learning run in `workdir`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
    active = config.active
    if active.acquisition not in ACQUISITIONS:
      raise ValueError(f'unknown acquisition {active.acquisition!r} (config '
                       f'field active.acquisition); choose one of '
                       f'{", ".join(ACQUISITIONS)}')
    config_checks.check(config)
    self.config = config
    self.workdir = Path(workdir)
    # Before anything is written: a workdir holds one run.
    workdir_lib.claim(self.workdir, config)
    self.cache = runtime.process_zero_first(
        lambda: sources.resolve_cache(config.data), 'koajax-cache')
    self.task = tasks.from_config(config)
    split = split_recipes.make_splits(
        self.cache.index, config.split,
        qualifies=self.task.qualifies(self.cache.index))
    self.candidates = candidates(split, active, seed=config.seed)
    self.val, self.test = split.val, split.test
    if active.budget > len(self.candidates):
      log.warning('budget %d exceeds the %d candidate knees; the loop stops '
                  'when they are all labeled', active.budget,
                  len(self.candidates))
    if jax.process_index() == 0:
      workdir_lib.write_config(self.workdir, config)

  def round_dir(self, r: int) -> Path:
    return self.workdir / f'round_{r:02d}'

  # -- the sets of a round, on disk ---------------------------------------

  def _save_sets(self, r: int, sets: RoundSets) -> None:
    knee_id = self.cache.index['knee_id'].to_numpy()
    self.round_dir(r).mkdir(parents=True, exist_ok=True)
    _write_json(self.round_dir(r) / 'sets.json', {
        name: {'rows': getattr(sets, name).tolist(),
               'knee_ids': knee_id[getattr(sets, name)].tolist()}
        for name in ('labeled', 'unlabeled', 'pool')})

  def _load_sets(self, r: int) -> RoundSets | None:
    path = self.round_dir(r) / 'sets.json'
    if not path.is_file():
      return None
    saved = json.loads(path.read_text())
    return RoundSets(**{name: np.asarray(saved[name]['rows'], np.int64)
                        for name in ('labeled', 'unlabeled', 'pool')})

  def done(self, r: int) -> dict[str, Any] | None:
    path = self.round_dir(r) / 'round.json'
    return json.loads(path.read_text()) if path.is_file() else None

  # -- one round ------------------------------------------------------------

  def score(self, trainer: train.Trainer, state, rows: np.ndarray,
            r: int) -> dict[str, np.ndarray]:
    """Every uncertainty score and the mean probabilities of the knees at
    `rows` under `state`."""
    active = self.config.active
    _, passes = _SCORE_OF.get(active.acquisition, ('entropy', 1))
    head = self.task.heads[0].name
    if passes == 1:  # one deterministic pass: ENT and LC
      probs = trainer.predict(state, rows)[head]
      return {**uncertainty.scores(probs[None]), 'mean_probs': probs}
    predictor = mc_dropout.MCDropoutPredictor(
        trainer.graphdef, trainer.mesh, num_samples=active.mc_samples,
        samples_per_pass=active.samples_per_pass,
        chunk_size=active.chunk_size, head=head, view=self.task.view,
        view_size=self.task.view_size)
    key = jax.random.fold_in(jax.random.key(self.config.seed + 1), r)
    with tqdm.tqdm(total=len(rows), unit='knee',
                   desc=f'MC dropout x{active.mc_samples}',
                   disable=(jax.process_index() != 0
                            or not self.config.progress_bar)) as bar:
      return sweep.score_pool(predictor, state, self.cache, rows, key=key,
                              progress=bar)

  def run_round(self, r: int, sets: RoundSets) -> RoundSets | None:
    """Trains, tests and (budget left) scores round r; returns the next
    round's sets, or None after the last round."""
    active = self.config.active
    rdir = self.round_dir(r)
    log.info('round %d: %d labeled, %d unlabeled (consistency), %d in the '
             'pool', r, len(sets.labeled), len(sets.unlabeled), len(sets.pool))
    splits = train.Splits(labeled=sets.labeled, unlabeled=sets.unlabeled,
                          val=self.val, test=self.test)
    trainer = train.Trainer(round_config(self.config), rdir, splits=splits,
                            cache=self.cache)
    if active.warm_start and r > 0 and trainer.ckpts.latest.latest_step() is None:
      # A resumed round restores its own checkpoint instead.
      trainer.start_from(self.round_dir(r - 1))
    with jax.set_mesh(trainer.mesh):
      trainer.train()
      report = trainer.test()
      remaining = active.budget - len(sets.labeled)
      candidates = sets.candidates
      nxt, queried, table = None, np.zeros(0, np.int64), None
      if remaining > 0 and len(candidates):
        scores = None
        if active.acquisition != 'random':
          state = trainer.load_checkpoint('best')
          table = self.score(trainer, state, candidates, r)
          scores = table[_SCORE_OF[active.acquisition][0]]
        nxt, queried = next_sets(
            sets, scores, n_query=min(active.n_batch, remaining),
            consistency=active.consistency, seed=self.config.seed + r + 1)
    if jax.process_index() != 0:
      return nxt
    index = self.cache.index
    if table is not None:
      mean = table.pop('mean_probs')
      frame = pd.DataFrame({
          'row': candidates, 'knee_id': index['knee_id'].to_numpy()[candidates],
          **table, **{f'p{k}': mean[:, k] for k in range(mean.shape[1])},
          'queried': np.isin(candidates, queried)})
      frame.to_csv(rdir / 'scores.csv', index=False)
    if nxt is not None:
      self._save_sets(r + 1, nxt)
    metrics = report['metrics']
    _write_json(rdir / 'round.json', {
        'round': r, 'n_labeled': len(sets.labeled),
        'acquisition': active.acquisition,
        'consistency': bool(active.consistency),
        'test': {name: metrics[name] for name in
                 ('balanced_accuracy', 'kappa', 'mse') if name in metrics},
        'queried': {'rows': queried.tolist(),
                    'knee_ids': index['knee_id'].to_numpy()[queried].tolist()},
    })
    print(f'round {r} ({len(sets.labeled)} labeled): test balanced accuracy '
          f'{metrics["balanced_accuracy"]["estimate"]:.4f}, kappa '
          f'{metrics["kappa"]["estimate"]:.4f}')
    return nxt

  # -- the whole loop -------------------------------------------------------

  def run(self) -> pd.DataFrame:
    r = 0
    while self.done(r) is not None:  # resume after the last finished round
      r += 1
    sets = self._load_sets(r)  # None: round r never began, or all are done
    if r == 0 and sets is None:
      sets = initial_sets(self.candidates, n_init=self.config.active.n_init,
                          consistency=self.config.active.consistency,
                          seed=self.config.seed)
      if jax.process_index() == 0:
        self._save_sets(0, sets)
    elif sets is not None:
      log.info('resuming at round %d', r)
    while sets is not None:
      sets = self.run_round(r, sets)
      r += 1
    return self.write_curve()

  def write_curve(self) -> pd.DataFrame:
    rows, r = [], 0
    while (record := self.done(r)) is not None:
      rows.append({'round': r, 'n_labeled': record['n_labeled'],
                   **{f'{name}{suffix}': record['test'][name][key]
                      for name in ('balanced_accuracy', 'kappa')
                      for suffix, key in (('', 'estimate'),
                                          ('_ci_low', 'ci_low'),
                                          ('_ci_high', 'ci_high'))}})
      r += 1
    curve = pd.DataFrame(rows)
    if jax.process_index() == 0:
      curve.to_csv(self.workdir / CURVE_CSV, index=False)
      plots.learning_curves(self.workdir / CURVE_PNG,
                            {label(self.config): curve})
    return curve


def label(config: ml_collections.ConfigDict) -> str:
  """'bald + consistency', 'random', ... for legends."""
  a = config.active
  return a.acquisition + (' + consistency' if a.consistency else '')


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> pd.DataFrame:
  curve = Loop(config, workdir).run()
  if jax.process_index() == 0:
    print(f'learning curve in {Path(workdir) / CURVE_CSV}:\n'
          f'{curve.to_string(index=False)}')
  return curve
