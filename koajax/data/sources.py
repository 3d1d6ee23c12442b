"""Turns a data config into a complete cache, generating or building it once.

Data made by an older koajax is brought up to date in place rather than
made again: a synthetic dataset without the further readers gets their
columns (`synthetic_upgrade.add_readers`), and a cache whose index lacks reader
columns its manifest has gets them (`cache.set_reader_columns`); each file
is replaced in one step, and each update is logged on one INFO line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ml_collections

from koajax.data import cache
from koajax.data import manifest as manifest_lib

log = logging.getLogger(__name__)


def data_root(cfg: ml_collections.ConfigDict) -> Path:
  if cfg.root:
    return Path(cfg.root).expanduser()
  env = os.environ.get('KOAJAX_DATA_DIR')
  return Path(env) if env else Path.home() / '.cache' / 'koajax'


def _workers(cfg: ml_collections.ConfigDict) -> int | None:
  return cfg.workers or None


def synthetic_dir(cfg: ml_collections.ConfigDict) -> Path:
  s = cfg.synthetic
  variety = float(s.get('variety', 1.0))
  # The standard films keep the folder name they always had.
  suffix = '' if variety == 1.0 else f'-v{variety:g}'
  return data_root(cfg) / f'synthetic-n{s.num_subjects}-s{s.seed}{suffix}'


def ensure_synthetic(cfg: ml_collections.ConfigDict) -> Path:
  """Generates the synthetic dataset unless a complete one is there.

  Generation writes beside the dataset's folder and renames into place when
  done (`synthetic.generate`), so an interrupted run is simply generated
  again, and its partial folder is removed then. A dataset made before the
  generator simulated further readers gets their columns added.
  """
  from koajax.data import synthetic
  from koajax.data import synthetic_upgrade
  raw = synthetic_dir(cfg) / 'raw'
  if (raw / 'manifest.csv').is_file():
    # Datasets older than synthetic.json were made with default options.
    added = synthetic_upgrade.add_readers(raw, seed=cfg.synthetic.seed)
    if added:
      log.info('Added the simulated readers %s to %s', ', '.join(added),
               raw / 'manifest.csv')
    return raw
  log.info('Generating the synthetic dataset (%d subjects, seed %d) in %s',
           cfg.synthetic.num_subjects, cfg.synthetic.seed, raw)
  synthetic.generate(raw, num_subjects=cfg.synthetic.num_subjects,
                     seed=cfg.synthetic.seed, workers=_workers(cfg),
                     variety=float(cfg.synthetic.get('variety', 1.0)))
  return raw


def resolve_cache(cfg: ml_collections.ConfigDict) -> cache.Cache:
  """Returns the cache the config names, making it first if needed."""
  from koajax.data import build
  if cfg.source == 'cache':
    if not cfg.cache_dir:
      raise ValueError("data.source='cache' needs data.cache_dir")
    return cache.open_cache(cfg.cache_dir)
  if cfg.source == 'synthetic':
    raw = ensure_synthetic(cfg)
    manifest, landmarks = raw / 'manifest.csv', raw / 'landmarks.csv'
    default_cache = synthetic_dir(cfg) / _cache_name(cfg)
  elif cfg.source == 'manifest':
    if not cfg.manifest:
      raise ValueError("data.source='manifest' needs data.manifest")
    manifest = Path(cfg.manifest).expanduser()
    landmarks = (Path(cfg.landmarks).expanduser() if cfg.landmarks
                 else manifest.with_name('landmarks.csv'))
    default_cache = manifest.with_name(f'koajax-{_cache_name(cfg)}')
  else:
    raise ValueError(f'unknown data.source {cfg.source!r}; '
                     "use 'synthetic', 'manifest' or 'cache'")
  cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache
  # data.redact_paths (where a config has it): knees by id only in the
  # build's logs and summary.
  redact = bool(cfg.get('redact_paths', False))
  crop = cfg.get('crop', 'knee')
  localizer = cfg.get('localizer', '')
  shown = 'the cache folder' if redact else cache_dir
  built_now = not cache.is_complete(cache_dir)
  if built_now:
    log.info('Building the knee cache in %s', shown)
    build.build_cache(manifest, cache_dir, landmarks=landmarks,
                      roi_mm=cfg.roi_mm, roi_px=cfg.roi_px,
                      workers=_workers(cfg), redact_paths=redact, crop=crop,
                      localizer=localizer or None)
  opened = cache.open_cache(cache_dir)
  built = (opened.meta['roi_mm'], opened.meta['roi_px'],
           opened.meta.get('crop', 'knee'))
  if built != (cfg.roi_mm, cfg.roi_px, crop):
    raise ValueError(
        f'{cache_dir} was built with roi_mm={built[0]}, roi_px={built[1]}, '
        f'crop={built[2]}, but the config asks for roi_mm={cfg.roi_mm}, '
        f'roi_px={cfg.roi_px}, crop={crop}; set data.cache_dir to another '
        'folder or rebuild this one')
  # The default cache belongs to its manifest; a cache named in the config
  # may have been built from another one.
  ours = not cfg.cache_dir or _built_from(cache_dir, manifest)
  if not built_now and ours and cache.set_reader_columns(
      cache_dir, manifest_lib.read_readers(manifest)):
    log.info('Updated the reader columns of the cache index in %s', shown)
    opened = cache.open_cache(cache_dir)
  return opened


def _cache_name(cfg: ml_collections.ConfigDict) -> str:
  """The default cache folder's name: what it holds, and whether its
  landmarks were found by a localiser."""
  crop = cfg.get('crop', 'knee')
  name = f"cache-{'roi' if crop == 'knee' else crop}{cfg.roi_px}"
  return name + ('-localised' if cfg.get('localizer', '') else '')


def _built_from(cache_dir: Path, manifest: Path) -> bool:
  """Whether the cache's summary names `manifest` (it names none when paths
  were redacted)."""
  source = (cache.summary(cache_dir) or {}).get('manifest')
  return bool(source) and _same_file(Path(source), manifest)


def _same_file(a: Path, b: Path) -> bool:
  try:
    return a.expanduser().resolve() == b.expanduser().resolve()
  except OSError:
    return False
