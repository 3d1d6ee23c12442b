"""Active learning: uncertainty scores, MC-dropout sweeps and the loop."""

from __future__ import annotations

from koajax.active.uncertainty import SCORE_NAMES, scores

__all__ = ['SCORE_NAMES', 'scores']
