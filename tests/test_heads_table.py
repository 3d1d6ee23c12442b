"""Tests for koajax.evaluation.heads_table: the table of a multi-head report
read back against its metrics.json."""

import copy
import json
import re

import numpy as np
import pytest
from matplotlib import image as mpl_image

from koajax.evaluation import heads_table
from koajax.evaluation import report

HEADS = {'kl': 5, 'ost_tl': 4, 'ost_fl': 4, 'jsn_m': 4, 'jsn_l': 4}
POSITIVE_FROM = {'kl': 2, 'ost_tl': 1, 'ost_fl': 1, 'jsn_m': 1}
POOLED = {'ost_lateral': ('ost_tl', 'ost_fl')}
# float32 softmax rows sum to 1 only to float32 precision, which
# scikit-learn's log_loss notes; its value is unaffected (no renormalising).
pytestmark = pytest.mark.filterwarnings(
    'ignore:The y_.* values do not sum to one:UserWarning')

_NUMBER = r'-?\d+\.\d{3}'
_CELL = re.compile(rf'^({_NUMBER}) \[({_NUMBER}|—), ({_NUMBER}|—)\]$')


def _run(n: int = 200, seed: int = 0):
  rng = np.random.default_rng(seed)
  subjects = np.array([f'{i // 2:07d}' for i in range(n)])
  sides = np.tile(['R', 'L'], n // 2)
  labels, probs = {}, {}
  for h, (head, num_classes) in enumerate(HEADS.items()):
    y = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), y] += 1.5
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs[head] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    if h:
      y[rng.random(n) < 0.15] = -1
    labels[head] = y
  # A head without a graded knee: every metric undefined.
  labels['jsn_l'][:] = -1
  return dict(knee_ids=[f'{s}_v00_{d}' for s, d in zip(subjects, sides)],
              sides=sides, labels=labels, probs=probs, subject_ids=subjects)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp('table')
  result = report.write_report(out, positive_from=POSITIVE_FROM,
                               pooled_binary=POOLED, n_resamples=60, seed=0,
                               **_run())
  return out, result


def _parse_markdown(text):
  """Header and body rows (lists of stripped cells) of the markdown table."""
  lines = [line for line in text.splitlines() if line.startswith('|')]
  header, separator, *body = [
      [cell.strip() for cell in line.strip().strip('|').split('|')]
      for line in lines]
  assert all(set(cell) <= set('-:') for cell in separator)
  return header, body


def _check_cell(cell, entry):
  """A cell shows metrics.json's estimate [low, high] to 3 decimals."""
  if entry is None or entry['estimate'] is None:
    assert cell == '—'
    return
  match = _CELL.match(cell)
  assert match, cell
  for text, value in zip(match.groups(),
                         (entry['estimate'], entry['ci_low'],
                          entry['ci_high'])):
    if value is None:
      assert text == '—'
    else:
      assert text == f'{value:.3f}'
      assert float(text) == pytest.approx(value, abs=5e-4 + 1e-12)


def test_files_are_listed_and_written(written):
  out, result = written
  assert result['files'] == {'predictions': report.PREDICTIONS_CSV,
                             'heads_table_md': heads_table.HEADS_TABLE_MD,
                             'heads_table_png': heads_table.HEADS_TABLE_PNG}
  assert json.loads((out / report.METRICS_JSON).read_text()) == result
  assert not [p.name for p in out.iterdir() if p.name.startswith('.')]


def test_markdown_parses_back_to_metrics_json(written):
  out, result = written
  header, body = _parse_markdown(
      (out / heads_table.HEADS_TABLE_MD).read_text(encoding='utf-8'))
  assert header == ['head', 'knees', 'kappa', 'balanced accuracy',
                    'accuracy', 'weighted F1', 'MSE', 'RMSE', 'ROC AUC', 'AP']
  metric_of = dict(heads_table.METRIC_COLUMNS)
  heads = list(result['heads'])
  assert [row[0] for row in body] == heads + [
      'ost_lateral (pooled: ost_tl + ost_fl)']
  for row, head in zip(body, heads):
    entry = result['heads'][head]
    assert int(row[1]) == entry['n_knees']
    for column, cell in zip(header[2:], row[2:]):
      _check_cell(cell, entry['metrics'].get(metric_of[column]))
  # Heads without a binary task have no ROC AUC or AP.
  jsn_l = body[heads.index('jsn_l')]
  assert jsn_l[1] == '0' and set(jsn_l[2:]) == {'—'}
  assert body[heads.index('kl')][-1] != '—'
  pooled_row, entry = body[-1], result['pooled']['ost_lateral']
  assert int(pooled_row[1]) == entry['n_knees']
  roc = header.index('ROC AUC')
  assert pooled_row[2:roc] == ['—'] * (roc - 2)
  _check_cell(pooled_row[roc], entry['metrics']['roc_auc'])
  _check_cell(pooled_row[roc + 1], entry['metrics']['average_precision'])


def test_png_is_a_real_image(written):
  out, _ = written
  path = out / heads_table.HEADS_TABLE_PNG
  assert path.stat().st_size > 0
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  pixels = mpl_image.imread(path)
  # Wide enough for eight columns of '0.812 [0.790, 0.833]' at 9 points.
  assert pixels.shape[1] > 1000 and pixels.shape[0] > 150
  assert pixels[..., :3].std() > 0.05


def test_rebuilt_from_a_stored_report(written, tmp_path):
  out, result = written
  stored = json.loads((out / report.METRICS_JSON).read_text())
  files = heads_table.write_heads_table(stored, tmp_path)
  assert files == {'heads_table_md': heads_table.HEADS_TABLE_MD,
                   'heads_table_png': heads_table.HEADS_TABLE_PNG}
  assert (tmp_path / heads_table.HEADS_TABLE_MD).read_text(
      encoding='utf-8') == (out / heads_table.HEADS_TABLE_MD).read_text(
          encoding='utf-8')
  # A report from before weighted F1 existed: the column shows '—'.
  older = copy.deepcopy(stored)
  for entry in older['heads'].values():
    entry['metrics'].pop('f1_weighted')
  older.pop('pooled')
  header, body = _parse_markdown(heads_table.markdown(older))
  f1 = header.index('weighted F1')
  assert [row[f1] for row in body] == ['—'] * len(HEADS)


def test_format_interval():
  entry = {'estimate': 0.8124, 'ci_low': 0.79, 'ci_high': 0.83349}
  assert heads_table.format_interval(entry) == '0.812 [0.790, 0.833]'
  assert heads_table.format_interval(
      {'estimate': -0.05, 'ci_low': -0.2, 'ci_high': 0.1}) == (
          '-0.050 [-0.200, 0.100]')
  assert heads_table.format_interval(
      {'estimate': 0.5, 'ci_low': None, 'ci_high': None}) == '0.500 [—, —]'
  assert heads_table.format_interval(
      {'estimate': None, 'ci_low': None, 'ci_high': None}) == '—'
  assert heads_table.format_interval(None) == '—'


def test_single_head_report_is_rejected():
  with pytest.raises(ValueError, match='several heads'):
    heads_table.table_rows({'metrics': {}})
