"""TFDS builder for MOST knees (manual download), see `knee_builder`."""

from __future__ import annotations

from koajax.datasets import knee_builder


class Builder(knee_builder.KneeBuilder):
  """Multicenter Osteoarthritis Study: bilateral PA knee radiographs."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = knee_builder.manual_instructions(
      'MOST', 'mostv01235xray, .sas7bdat or .txt')
  _DESCRIPTION = (
      'Knee ROIs from the Multicenter Osteoarthritis Study (3,026 subjects, '
      'visits 0-84 months) with KL and OARSI grades, preprocessed by koajax.')
  _HOMEPAGE = 'https://most.ucsf.edu'
