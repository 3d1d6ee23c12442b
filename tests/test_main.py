"""The data job end to end: config -> synthetic dataset -> cache -> summary."""

import json

import pandas as pd
import pytest

from koajax import config_lib
from koajax import prepare
from koajax.data import cache as cache_lib
from koajax.data import sources
from config_loader import load_config as _load_config






def test_parse_preset_rejects_unknown_names():
  assert config_lib.parse_preset(None, ('default', 'smoke')) == 'default'
  assert config_lib.parse_preset('smoke', ('default', 'smoke')) == 'smoke'
  with pytest.raises(ValueError, match="unknown preset 'quik'"):
    config_lib.parse_preset('quik', ('default', 'smoke'))


def test_prepare_data_smoke_builds_once_and_summarises(tmp_path, monkeypatch):
  monkeypatch.setenv('KOAJAX_DATA_DIR', str(tmp_path / 'data'))
  config = _load_config('data', 'smoke')
  summary = prepare.prepare_data(config, tmp_path / 'work')

  written = json.loads((tmp_path / 'work' / 'data_summary.json').read_text())
  assert written['knees'] == summary['knees'] > 0
  assert (tmp_path / 'work' / 'knees_by_kl.png').stat().st_size > 1000

  # The counts in the summary are those of the manifest the generator wrote.
  raw = sources.synthetic_dir(config.data) / 'raw'
  manifest = pd.read_csv(raw / 'manifest.csv', dtype={'subject_id': str})
  assert summary['subjects'] == manifest['subject_id'].nunique()
  kl = manifest['kl'].dropna().astype(int)
  for grade, count in summary['grades']['kl']['counts'].items():
    assert count == int((kl == grade).sum())

  # A second run reuses the cache instead of rebuilding it.
  cache_dir = cache_lib.open_cache(summary['cache_dir']).dir
  stamp = (cache_dir / cache_lib.META).stat().st_mtime_ns
  prepare.prepare_data(config, tmp_path / 'work2')
  assert (cache_dir / cache_lib.META).stat().st_mtime_ns == stamp


def test_a_cache_built_with_other_geometry_is_not_reused(tmp_path, monkeypatch):
  monkeypatch.setenv('KOAJAX_DATA_DIR', str(tmp_path / 'data'))
  config = _load_config('data', 'smoke')
  first = sources.resolve_cache(config.data)
  config.data.cache_dir = str(first.dir)
  config.data.roi_mm = 120.0
  with pytest.raises(ValueError, match='built with roi_mm=140.0'):
    sources.resolve_cache(config.data)
