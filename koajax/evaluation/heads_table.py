"""The metrics of a multi-head report as one table, a row per head.

The layout of Tiulpin & Saarakkala (2019), Table 3: for each head (KL and the
OARSI grades) the knees it grades and its kappa, balanced accuracy, weighted
F1, MSE, ROC AUC and average precision, with the accuracy and RMSE of Zheng
et al. (2021), Table 2, beside them, each as `estimate [low, high]` with
the report's bootstrap interval; then a row per pooled binary task (the
lateral osteophytes of tibia and femur as one task, say) with ROC AUC and
average precision only. '—' marks a metric that is undefined (null in
metrics.json) or that the head does not have (no binary task).

`write_heads_table` writes it next to metrics.json as

  heads_table.md   a markdown table
  heads_table.png  the same table as an image

from the metrics.json dict alone, so it can also be rebuilt from a stored
report: `write_heads_table(json.loads(path.read_text()), path.parent)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from koajax.evaluation import plots

HEADS_TABLE_MD = 'heads_table.md'
HEADS_TABLE_PNG = 'heads_table.png'

# Header cell -> metric of metrics.json, in the order of the columns after
# 'head' and 'knees'.
METRIC_COLUMNS = (
    ('kappa', 'kappa'),
    ('balanced accuracy', 'balanced_accuracy'),
    ('accuracy', 'accuracy'),
    ('weighted F1', 'f1_weighted'),
    ('MSE', 'mse'),
    ('RMSE', 'rmse'),
    ('ROC AUC', 'roc_auc'),
    ('AP', 'average_precision'),
)
COLUMNS = ('head', 'knees', *(header for header, _ in METRIC_COLUMNS))
# Shown where a value is undefined or absent.
MISSING = '—'
# Decimals of every metric; the tests parse the table back to this precision.
DECIMALS = 3


def _number(value) -> str:
  return MISSING if value is None else f'{value:.{DECIMALS}f}'


def format_interval(entry: Mapping | None) -> str:
  """'0.812 [0.790, 0.833]' from a metrics.json entry; MISSING if undefined.

  An estimate whose interval is undefined (every resample NaN) keeps its
  value, with MISSING for the bounds.
  """
  if entry is None or entry.get('estimate') is None:
    return MISSING
  return (f"{_number(entry['estimate'])} [{_number(entry.get('ci_low'))}, "
          f"{_number(entry.get('ci_high'))}]")


def pooled_label(name: str, heads) -> str:
  """First cell of a pooled task's row: its name and the heads it pools."""
  return f"{name} (pooled: {' + '.join(heads)})"


def table_rows(result: Mapping) -> tuple[list[list[str]], list[int]]:
  """(rows of cells in COLUMNS order, indices of the pooled rows).

  Args:
    result: the metrics.json dict of a report with several heads.
  """
  if 'heads' not in result:
    raise ValueError("a heads table needs a report with several heads "
                     "(metrics.json with 'heads')")
  rows = []
  for head, entry in result['heads'].items():
    metrics = entry.get('metrics', {})
    rows.append([head, str(entry['n_knees']),
                 *(format_interval(metrics.get(name))
                   for _, name in METRIC_COLUMNS)])
  pooled_rows = []
  for name, entry in result.get('pooled', {}).items():
    metrics = entry.get('metrics', {})
    pooled_rows.append(len(rows))
    rows.append([pooled_label(name, entry['heads']), str(entry['n_knees']),
                 *(format_interval(metrics.get(metric))
                   if metric in ('roc_auc', 'average_precision') else MISSING
                   for _, metric in METRIC_COLUMNS)])
  return rows, pooled_rows


def _notes(result: Mapping) -> str:
  """What the numbers are: interval, resamples and the binary tasks."""
  info = result.get('bootstrap', {})
  level = info.get('level')
  interval = (f'{100 * level:g}% ' if level is not None else '') + (
      'bootstrap interval')
  if info.get('n_resamples') is not None:
    interval += f" ({info['n_resamples']} resamples)"
  tasks = [f"{head} >= {entry['positive_from']}"
           for head, entry in result['heads'].items()
           if entry.get('positive_from') is not None]
  notes = (f'estimate [{interval}]; {MISSING} where undefined or not '
           'computed.')
  if tasks:
    notes += f" ROC AUC and AP of {', '.join(tasks)}"
    if result.get('pooled'):
      notes += '; pooled rows concatenate those of their heads, knees'
      notes += ' resampled with all their rows'
    notes += '.'
  return notes


def markdown(result: Mapping) -> str:
  """The heads table of a metrics.json dict as markdown text."""
  rows, _ = table_rows(result)
  align = ['---', '---:', *([':---:'] * len(METRIC_COLUMNS))]
  lines = ['# Metrics per head', '', _notes(result), '',
           '| ' + ' | '.join(COLUMNS) + ' |',
           '| ' + ' | '.join(align) + ' |']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_heads_table(result: Mapping, out_dir: str | Path) -> dict[str, str]:
  """Writes HEADS_TABLE_MD and HEADS_TABLE_PNG of a multi-head report.

  Args:
    result: the metrics.json dict (NaN already written as None).
    out_dir: the report's folder.

  Returns:
    {'heads_table_md': HEADS_TABLE_MD, 'heads_table_png': HEADS_TABLE_PNG},
    the names of the written files as metrics.json lists them.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  text = markdown(result)
  rows, pooled_rows = table_rows(result)
  plots.write_atomically(out_dir / HEADS_TABLE_MD,
                         lambda path: path.write_text(text, encoding='utf-8'))
  plots.table_png(COLUMNS, rows, out_dir / HEADS_TABLE_PNG,
                  title='Metrics per head', shaded_rows=pooled_rows,
                  footnote=_notes(result))
  return {'heads_table_md': HEADS_TABLE_MD, 'heads_table_png': HEADS_TABLE_PNG}
