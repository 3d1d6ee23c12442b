"""Hashes of a folder's files: what "left byte-identical" is checked with."""

import hashlib
from pathlib import Path


def file_hashes(folder, skip=()):
  """{relative path: sha256} of every file under `folder` whose name is not
  in `skip` ({} if the folder does not exist)."""
  folder = Path(folder)
  if not folder.exists():
    return {}
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*'))
          if p.is_file() and p.name not in skip}
