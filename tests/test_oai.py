"""Tests for the OAI/MOST grade table converter."""

import io
import math
import numpy as np
import pandas as pd
import pytest

from koajax.data import manifest as manifest_lib
from koajax.data import oai
from koajax.data import oai_cells
from koajax.data import oai_issues
from koajax.data import oai_tables
from koajax.data import schema

# Two OAI tables in the pipe-delimited ASCII layout. Subject 9000001's right
# knee was read by two projects at baseline; the left one has a KL out of
# range; 9000002 has labelled and decimal values and an ungradable cell.
BU00 = """\
ID|SIDE|READPRJ|VERSION|V00XRKL|V00XROSFL|V00XROSFM|V00XROSTL|V00XROSTM|V00XRJSL|V00XRJSM
9000001|1: Right|15|0.3|2: 2|1: 1|0|0|1|0|1
9000001|1: Right|37|0.3|3|1|1|1|1|0|2
9000001|2: Left|15|0.3|7|.|.|.|.|.|.
9000002|1|15|0.3|0.0|0.0|0.0|0.0|0.0|0.0|0.0
9000002|2|15|0.3|4.0|3.0|3.0|2.0|1.5|3|.: Missing Form/Incomplete Workbook
9000003|1|15|0.3|1|.|.|.|.|.|.
"""
BU01 = """\
ID|SIDE|READPRJ|V01XRKL|V01XROSFL|V01XROSFM|V01XROSTL|V01XROSTM|V01XRJSL|V01XRJSM
9000001|1|15|2|1|0|0|1|0|1
9000002|2|15|4|3|3|2|2|3|3
"""
# MOST: one row per subject, side and visit in the column names, tab-separated.
MOST = ('MOSTID\tV0XRKL\tV0XLKL\tV0XRJSM\tV0XLJSM\tV1XRKL\tV1XLKL\n'
        'MB00001\t2\t0\t1\t0\t3\tX\n'
        'MI00002\t\t1\t\t0\t1\t1\n')


def _write(path, text):
  path.write_text(text)
  return path


@pytest.fixture
def oai_files(tmp_path):
  bu00 = _write(tmp_path / 'kxr_sq_bu00.txt', BU00)
  bu01 = _write(tmp_path / 'kxr_sq_bu01.txt', BU01)
  (tmp_path / 'img').mkdir()
  images = _write(tmp_path / 'images.csv', (
      'subject_id,visit,path\n'
      '9000001,0,img/a.dcm\n'
      '9000001,V01,img/b.dcm\n'
      '9000002,0,img/c.dcm\n'
      '9000004,0,img/d.dcm\n'  # no grades: unlabeled knees
      '9000005,banana,img/e.dcm\n'))
  sites = _write(tmp_path / 'Enrollees.txt',
                 'ID|V00SITE|P02SEX\n9000001|A|1\n9000002|C: Pittsburgh|2\n')
  return tmp_path, bu00, bu01, images, sites


@pytest.mark.parametrize('value, expected', [
    ('2: 2', 2), ('2', 2), ('2.0', 2), (3.0, 3), (np.int64(1), 1), (b'1', 1),
    ('0: 0', 0), ('.', None), ('', None), (None, None), (math.nan, None),
    ('.: Missing Form/Incomplete Workbook', None), ('.A', None),
])
def test_parse_grade(value, expected):
  assert oai_cells.parse_grade(value) == expected


@pytest.mark.parametrize('value', ['X', '1.5', 'P: ungradable', 'two'])
def test_parse_grade_rejects(value):
  with pytest.raises(ValueError):
    oai_cells.parse_grade(value)


@pytest.mark.parametrize('value, expected', [
    (1, 'R'), (2.0, 'L'), ('1: Right', 'R'), ('2: Left', 'L'), ('r', 'R'),
    ('LEFT', 'L'),
])
def test_parse_side(value, expected):
  assert oai_cells.parse_side(value) == expected


def test_ids_visits_and_sites():
  assert oai_cells.normalize_id(9000001.0) == '9000001'
  assert oai_cells.normalize_id('9000001.0') == '9000001'
  assert oai_cells.normalize_id(b'MB00001 ') == 'MB00001'
  assert oai_cells.parse_visit('V06', 'oai') == 48
  assert oai_cells.parse_visit('V5', 'most') == 84
  assert oai_cells.parse_visit('24', None) == 24
  with pytest.raises(ValueError):
    oai_cells.parse_visit('V01', None)  # a code needs a known study
  assert oai_cells.site_label('C: Pittsburgh') == 'C'


def test_visit_months_match_the_study_schedules():
  assert [oai_cells.OAI_VISIT_MONTHS[v] for v in (0, 1, 3, 5, 6, 8, 10)] == [
      0, 12, 24, 36, 48, 72, 96]
  assert oai_cells.MOST_VISIT_MONTHS == {0: 0, 1: 15, 2: 30, 3: 60, 5: 84}


def test_table_kind_and_separator(tmp_path):
  df = oai_tables.read_table(_write(tmp_path / 'a.txt', BU00))
  assert oai_tables.table_kind(df) == 'oai'
  assert df['ID'].iloc[0] == '9000001'
  most = oai_tables.read_table(_write(tmp_path / 'm.txt', MOST))
  assert oai_tables.table_kind(most) == 'most'
  csv = oai_tables.read_table(_write(tmp_path / 'c.csv',
                                     'id,side,v00xrkl\n1,1,2\n'))
  assert oai_tables.table_kind(csv) == 'oai'  # names are upper-cased
  with pytest.raises(ValueError, match='not an OAI'):
    oai_tables.table_kind(pd.DataFrame({'ID': ['1'], 'KL': ['2']}))


def test_most_readings():
  issues = []
  table = pd.read_csv(io.StringIO(MOST), sep='\t', dtype=str,
                      keep_default_na=False)
  readings = {(r.subject_id, r.visit, r.side): r.grades
              for r in oai_tables.most_readings(table, 'most.txt', issues)}
  assert readings[('MB00001', 0, 'R')] == {'kl': 2, 'jsn_m': 1}
  assert readings[('MB00001', 0, 'L')] == {'kl': 0, 'jsn_m': 0}
  assert readings[('MB00001', 15, 'R')] == {'kl': 3}
  assert ('MB00001', 15, 'L') not in readings  # 'X' is not a grade
  assert readings[('MI00002', 0, 'L')] == {'kl': 1, 'jsn_m': 0}
  assert ('MI00002', 0, 'R') not in readings  # nothing graded
  assert [(i.kind, i.subject_id, i.visit, i.side) for i in issues] == [
      ('unparsable', 'MB00001', 15, 'L')]


def test_select_readings_rule():
  make = lambda prj, n: oai_tables.Reading('1', 0, 'R', dict(list(
      {'kl': 1, 'ost_fl': 0, 'jsn_m': 1}.items())[:n]), source=prj,
                                             readprj=prj)
  issues = []
  chosen = oai_tables.select_readings([make('15', 1), make('37', 3)],
                                      issues=issues)
  assert chosen['1', 0, 'R'].readprj == '37'  # most complete
  assert [i.kind for i in issues] == ['duplicate_reading']
  chosen = oai_tables.select_readings([make('15', 1), make('37', 3)],
                                      prefer_readprj=['15'], issues=[])
  assert chosen['1', 0, 'R'].readprj == '15'  # preference wins
  chosen = oai_tables.select_readings([make('42', 2), make('15', 2)],
                                      issues=[])
  assert chosen['1', 0, 'R'].readprj == '42'  # tie: first read


def test_convert_oai(oai_files):
  root, bu00, bu01, images, sites = oai_files
  out = root / 'out' / 'manifest.csv'
  summary = oai.convert([bu00, bu01], images, out, sites=sites,
                        prefer_readprj=['15'])
  df = pd.read_csv(out, dtype={'subject_id': str})
  assert list(df.columns) == list(schema.MANIFEST_COLUMNS)
  keyed = df.set_index(['subject_id', 'visit', 'side'])
  # Bilateral images give both knees; the preferred project (15) is kept.
  assert keyed.loc[('9000001', 0, 'R'), 'kl'] == 2
  assert keyed.loc[('9000001', 0, 'R'), 'jsn_m'] == 1
  assert pd.isna(keyed.loc[('9000001', 0, 'L'), 'kl'])  # KL 7 is reported
  assert keyed.loc[('9000001', 12, 'R'), 'kl'] == 2
  assert pd.isna(keyed.loc[('9000001', 12, 'L'), 'kl'])  # image, no grades
  assert keyed.loc[('9000002', 0, 'L'), 'ost_fl'] == 3
  assert pd.isna(keyed.loc[('9000002', 0, 'L'), 'ost_tm'])  # 1.5 reported
  assert pd.isna(keyed.loc[('9000002', 0, 'L'), 'jsn_m'])  # missing form
  assert keyed.loc[('9000001', 0, 'R'), 'site'] == 'A'
  assert keyed.loc[('9000002', 0, 'R'), 'site'] == 'C'
  assert pd.isna(keyed.loc[('9000004', 0, 'R'), 'site'])  # not enrolled
  assert keyed.loc[('9000001', 0, 'R'), 'path'] == '../img/a.dcm'
  assert len(df) == 8 and summary['knees'] == 8
  assert summary['studies'] == ['oai']

  issues = pd.read_csv(oai_issues.issues_path(out), dtype={'subject_id': str})
  kinds = issues.groupby('kind')['subject_id'].apply(sorted).to_dict()
  assert kinds['duplicate_reading'] == ['9000001']
  assert kinds['out_of_range'] == ['9000001']  # KL 7
  assert kinds['unparsable'] == ['9000002']  # OST 1.5
  # Graded knees without images are reported, not dropped silently.
  assert kinds['no_image'] == ['9000002', '9000003']
  assert kinds['bad_image_row'] == ['9000005']
  # Images without grades stay as unlabeled knees (and are listed).
  assert kinds['no_grades'] == ['9000001', '9000001', '9000004', '9000004']
  assert summary['issues']['no_image'] == 2

  # The manifest reads back cleanly with the koajax reader.
  read = manifest_lib.read_manifest(out)
  assert (read['problem'] == '').all()
  assert read.loc[0, 'path'].endswith('img/a.dcm')


def test_convert_most_with_sided_images(tmp_path):
  grades = _write(tmp_path / 'mostv01235xray.txt', MOST)
  images = _write(tmp_path / 'images.csv', (
      'subject_id,visit,side,path,site\n'
      'MB00001,V0,R,r.dcm,B\n'
      'MB00001,V0,left,l.dcm,B\n'
      'MB00001,15,R,r15.dcm,B\n'
      'MB00001,15,R,again.dcm,B\n'))
  out = tmp_path / 'manifest.csv'
  summary = oai.convert([grades], images, out)
  df = pd.read_csv(out, dtype=str, keep_default_na=False)
  assert df[['visit', 'side', 'path', 'kl', 'jsn_m', 'site']].values.tolist(
  ) == [['0', 'L', 'l.dcm', '0', '0', 'B'], ['0', 'R', 'r.dcm', '2', '1', 'B'],
        ['15', 'R', 'r15.dcm', '3', '', 'B']]
  assert summary['issues'] == {'duplicate_image': 1, 'no_image': 3,
                               'unparsable': 1}


def test_cli(oai_files, capsys):
  root, bu00, bu01, images, _ = oai_files
  out = root / 'm.csv'
  assert oai.main([f'--grades={bu00},{bu01}', f'--images={images}',
                   f'--out={out}', '--prefer_readprj=37']) == 0
  assert '"knees": 8' in capsys.readouterr().out
  assert (root / 'm.issues.csv').is_file()
  df = pd.read_csv(out, dtype={'subject_id': str})
  right = df[(df.subject_id == '9000001') & (df.visit == 0) & (df.side == 'R')]
  assert right['kl'].tolist() == [3]  # project 37's reading
