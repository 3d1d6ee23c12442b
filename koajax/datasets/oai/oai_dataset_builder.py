"""TFDS builder for OAI knees (manual download), see `knee_builder`."""

from __future__ import annotations

from koajax.datasets import knee_builder


class Builder(knee_builder.KneeBuilder):
  """Osteoarthritis Initiative: bilateral PA fixed-flexion knee radiographs."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = knee_builder.manual_instructions(
      'OAI', 'kxr_sq_bu00 .. kxr_sq_bu10, .sas7bdat or .txt; sites from '
      'Enrollees (--sites)')
  _DESCRIPTION = (
      'Knee ROIs from the Osteoarthritis Initiative (4,796 subjects, visits '
      '0-96 months) with central-reading KL and OARSI grades, preprocessed '
      'by koajax.')
  _HOMEPAGE = 'https://nda.nih.gov/oai'
