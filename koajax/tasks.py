"""Tasks: what a run predicts, as plain data.

A task names its heads (each a grade column of the cache mapped to classes),
which knees qualify for labeled / validation / test use, the view the model
sees and which heads the report averages. Methods, models, the trainer and
the reports read these fields instead of assuming KL:

  kl          KL grade, 5 classes (Semixup, active learning)
  kl_oarsi    KL + the six OARSI grades, 29 classes in all (multi-task OARSI,
              coherence learning), heads in the order of the papers
  kl0_vs_kl2  KL-0 against KL-2, other grades excluded (confidence-driven)
  landmarks   no grade: the 16 landmarks of each knee, in view pixels
              (the localiser); every knee with its landmarks qualifies

An ungraded head (-1 in the cache) is a masked label (-1 here too), never a
reason to drop the knee: a knee that lacks one OARSI grade still teaches the
other six heads.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses

import numpy as np
import pandas as pd

from koajax.data import schema

MASKED = schema.UNGRADED  # label of an ungraded (or excluded) head


@dataclasses.dataclass(frozen=True)
class Head:
  """One classification head.

  Attributes:
    name: key of the head in model outputs, batches and reports.
    column: grade column of the cache index it is read from.
    num_classes: classes of the head.
    label_map: (grade, class) pairs; a grade not listed is masked. None maps
      grade g to class g.
    positive_from: classes >= this are the positive class of the head's
      ROC / PR curves (KL >= 2 is radiographic OA); None for no curves.
  """
  name: str
  column: str
  num_classes: int
  label_map: tuple[tuple[int, int], ...] | None = None
  positive_from: int | None = None

  def labels(self, grades: np.ndarray) -> np.ndarray:
    """int32 class labels of cache grades, MASKED where ungraded or
    excluded by `label_map`."""
    grades = np.asarray(grades)
    if self.label_map is None:
      ok = (grades >= 0) & (grades < self.num_classes)
      return np.where(ok, grades, MASKED).astype(np.int32)
    out = np.full(grades.shape, MASKED, np.int32)
    for grade, label in self.label_map:
      out[grades == grade] = label
    return out


@dataclasses.dataclass(frozen=True)
class Task:
  """Heads, qualifying knees and view of a run.

  Attributes:
    name: the name configs use (`config.task`).
    heads: the heads, primary first (its metrics also go by bare names).
    view: default method view (`koajax.data.views.VIEWS`).
    view_size: the view's pixel size (0: the view's own: 128 px patches,
      300 or 320 px knees).
    mean_heads: heads whose metrics the reports average ('mean/...').
    qualify: 'primary': a knee qualifies for labeled / val / test use when
      its first head is graded; 'any': when any head is.
    pooled_binary: (name, heads) pairs: binary findings whose ROC / PR the
      report also gives over several heads at once (a lateral osteophyte,
      femoral or tibial).
    landmarks: the model predicts the knees' landmarks ('landmarks',
      (n, 16, 2) view pixels) and is scored on their distance in mm
      (`koajax.evaluation.landmarks`).
  """
  name: str
  heads: tuple[Head, ...]
  view: str = 'siamese'
  view_size: int = 0
  mean_heads: tuple[str, ...] = ()
  qualify: str = 'primary'
  pooled_binary: tuple[tuple[str, tuple[str, ...]], ...] = ()
  landmarks: bool = False

  @property
  def head_names(self) -> tuple[str, ...]:
    return tuple(h.name for h in self.heads)

  @property
  def outputs(self) -> tuple[str, ...]:
    """What a prediction holds: each head's probabilities, then the
    landmarks for a landmark task."""
    return self.head_names + (('landmarks',) if self.landmarks else ())

  @property
  def num_classes(self) -> dict[str, int]:
    return {h.name: h.num_classes for h in self.heads}

  @property
  def positive_from(self) -> dict[str, int | None]:
    return {h.name: h.positive_from for h in self.heads}

  def labels(self, grades: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{head: labels} from grade columns ({column: grades})."""
    return {h.name: h.labels(grades[h.column]) for h in self.heads}

  def index_labels(self, index: pd.DataFrame) -> dict[str, np.ndarray]:
    """{head: labels} of every row of a cache index."""
    return self.labels({h.column: index[h.column].to_numpy()
                        for h in self.heads})

  def qualifies(self, index: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the index rows usable as labeled / val / test knees
    (every row for a task without heads: its labels are the landmarks,
    which `koajax.data.pipeline.usable_knees` checks)."""
    if not self.heads:
      return np.ones(len(index), bool)
    graded = np.stack([y >= 0 for y in self.index_labels(index).values()])
    return graded[0] if self.qualify == 'primary' else graded.any(axis=0)


KL = Head('kl', 'kl', 5, positive_from=2)
# Tiulpin & Saarakkala 2019 head order; osteophytes >= 1 and narrowing >= 1
# are the binary findings of their ROC curves.
OARSI = tuple(Head(name, name, 4, positive_from=1) for name in
              ('ost_tl', 'ost_fl', 'jsn_l', 'ost_tm', 'ost_fm', 'jsn_m'))

TASKS: dict[str, Task] = {
    'kl': Task('kl', (KL,), view='siamese'),
    'kl_oarsi': Task('kl_oarsi', (KL, *OARSI), view='whole',
                     mean_heads=tuple(h.name for h in OARSI),
                     # The paper's osteophyte curves, compartments pooled.
                     pooled_binary=(('ost_lateral', ('ost_tl', 'ost_fl')),
                                    ('ost_medial', ('ost_tm', 'ost_fm')))),
    'kl0_vs_kl2': Task('kl0_vs_kl2', (Head('kl0_vs_kl2', 'kl', 2,
                                           label_map=((0, 0), (2, 1)),
                                           positive_from=1),),
                       view='siamese'),
    'landmarks': Task('landmarks', (), view='keypoints', landmarks=True),
}


def get(name: str, *, view: str = '', view_size: int = 0) -> Task:
  """The task called `name`, seen through `view` ('' = its own) at
  `view_size` px (0 = the view's own)."""
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r} (config field task); choose one '
                     f'of {", ".join(TASKS)}')
  task = TASKS[name]
  return dataclasses.replace(task, view=view or task.view,
                             view_size=view_size)


def from_config(config) -> Task:
  """The task of a run config; configs saved before tasks existed are KL."""
  return get(config.get('task', 'kl'), view=config.get('view', ''),
             view_size=config.get('view_size', 0))
