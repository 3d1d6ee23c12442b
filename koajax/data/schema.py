"""Names and layouts shared by every koajax data file.

The manifest CSV (one row per knee) is the contract between a dataset and
koajax. Columns:

  subject_id  patient/subject identifier as the dataset keys it (a research
              id, never a name); knees are keyed by (subject_id, visit, side)
  visit       integer visit number (months since baseline for OAI/MOST)
  side        'R' or 'L' (the patient's right or left knee)
  site        acquisition site / centre (free text, e.g. 'A')
  path        image file, absolute or relative to the manifest's folder; a
              bilateral radiograph appears on two rows, one per knee
  kl          Kellgren-Lawrence grade 0-4
  ost_fl, ost_fm, ost_tl, ost_tm
              OARSI osteophyte grades 0-3 (femur/tibia x lateral/medial)
  jsn_l, jsn_m
              OARSI joint-space narrowing grades 0-3 (lateral/medial)

An empty grade cell means "not graded": a knee with no KL is unlabeled data.

Optional columns kl_reader_<name> (name: letters, digits and _) hold the KL
grades 0-4 of further readers, e.g. the radiologists a model is compared
with; an empty cell means that reader did not grade the knee. They are kept
apart from `kl`, which stays the reference the model learns from, and reach
the cache index as integers (-1 for not graded).

The landmarks CSV holds 16 points per knee in image pixel coordinates of the
file named by the manifest: columns subject_id, visit, side, x0, y0, ...,
x15, y15. Points run along the joint contours, each bone from its lateral
margin to its medial margin (in the patient's anatomy, so a right knee's
points run left-to-right in a posterior-anterior image and a left knee's
right-to-left):

  0-8   tibia: 0 lateral plateau margin, 1 lateral plateau middle,
        2 lateral plateau inner end, 3 lateral tibial spine tip,
        4 JOINT CENTRE (middle of the intercondylar region at the joint line),
        5 medial tibial spine tip, 6 medial plateau inner end,
        7 medial plateau middle, 8 medial plateau margin
  9-15  femur: 9 lateral femoral margin, 10 lowest point of the lateral
        condyle, 11 lateral edge of the intercondylar notch, 12 notch roof,
        13 medial edge of the notch, 14 lowest point of the medial condyle,
        15 medial femoral margin
"""

from __future__ import annotations

import re

# Grades in the order the cache stores them.
GRADES = ('kl', 'ost_fl', 'ost_fm', 'ost_tl', 'ost_tm', 'jsn_l', 'jsn_m')
OARSI_GRADES = GRADES[1:]
GRADE_MAX = {'kl': 4, **{name: 3 for name in OARSI_GRADES}}
UNGRADED = -1  # how a missing grade is stored in arrays

ID_COLUMNS = ('subject_id', 'visit', 'side')
MANIFEST_COLUMNS = ID_COLUMNS + ('site', 'path') + GRADES
SIDES = ('R', 'L')

READER_PREFIX = 'kl_reader_'  # kl_reader_<name>: another reader's KL grade
READER_NAME = re.compile(r'^[A-Za-z0-9_]+$')


def reader_column(name: str) -> str:
  """The manifest and cache index column of reader `name`."""
  return READER_PREFIX + name


def reader_columns(columns) -> list[str]:
  """The kl_reader_<name> columns among `columns`, in their order."""
  return [str(c) for c in columns if str(c).startswith(READER_PREFIX)]


def reader_names(columns) -> list[str]:
  """The names of the readers whose columns are among `columns`."""
  return [c[len(READER_PREFIX):] for c in reader_columns(columns)]

NUM_LANDMARKS = 16
TIBIA = tuple(range(0, 9))
FEMUR = tuple(range(9, 16))
JOINT_CENTRE = 4
# Points on the tibial plateau used to level it (margins and middles).
PLATEAU = (0, 1, 7, 8)
LANDMARK_COLUMNS = ID_COLUMNS + tuple(
    f'{axis}{i}' for i in range(NUM_LANDMARKS) for axis in ('x', 'y'))


def knee_id(subject_id: str, visit: int, side: str) -> str:
  """The string key of a knee in caches, predictions and logs."""
  return f'{subject_id}_v{int(visit):02d}_{side}'
