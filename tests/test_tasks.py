"""Tasks as data: heads, label maps, masks and qualifying knees."""

import numpy as np
import pandas as pd
import pytest

from koajax import tasks
from koajax.data import schema


def _index(rows):
  return pd.DataFrame(rows, columns=list(schema.GRADES))


def test_kl_oarsi_has_the_papers_29_classes_in_their_head_order():
  task = tasks.get('kl_oarsi')
  assert task.head_names == ('kl', 'ost_tl', 'ost_fl', 'jsn_l', 'ost_tm',
                             'ost_fm', 'jsn_m')
  assert sum(task.num_classes.values()) == 29
  assert task.mean_heads == task.head_names[1:]
  assert task.positive_from == {'kl': 2, **dict.fromkeys(task.head_names[1:],
                                                         1)}
  assert task.view == 'whole'


def test_ungraded_heads_are_masked_not_dropped():
  # KL graded, one OARSI grade missing; then a knee with OARSI grades only.
  index = _index([[3, 1, -1, 2, 0, 1, 3], [-1, 0, 0, 0, 0, 0, 0]])
  task = tasks.get('kl_oarsi')
  labels = task.index_labels(index)
  np.testing.assert_array_equal(labels['kl'], [3, -1])
  np.testing.assert_array_equal(labels['ost_fm'], [-1, 0])
  np.testing.assert_array_equal(labels['jsn_m'], [3, 0])
  # The primary head decides which knees are labeled/val/test knees.
  np.testing.assert_array_equal(task.qualifies(index), [True, False])


def test_kl0_vs_kl2_maps_grades_and_excludes_the_others():
  index = _index([[g, 0, 0, 0, 0, 0, 0] for g in (0, 1, 2, 3, 4, -1, 2)])
  task = tasks.get('kl0_vs_kl2')
  (head,) = task.heads
  assert head.num_classes == 2 and head.positive_from == 1
  np.testing.assert_array_equal(task.index_labels(index)['kl0_vs_kl2'],
                                [0, -1, 1, -1, -1, -1, 1])
  np.testing.assert_array_equal(task.qualifies(index),
                                [True, False, True, False, False, False,
                                 True])


def test_a_view_can_be_chosen_and_unknown_tasks_are_named():
  assert tasks.get('kl_oarsi', view='keypoints').view == 'keypoints'
  with pytest.raises(ValueError, match=r"unknown task 'kl_oarsy' \(config "
                     r'field task\); choose one of kl, kl_oarsi, kl0_vs_kl2'):
    tasks.get('kl_oarsy')


def test_grades_out_of_a_heads_range_are_masked():
  head = tasks.KL
  np.testing.assert_array_equal(head.labels(np.array([0, 4, 5, -1])),
                                [0, 4, -1, -1])
