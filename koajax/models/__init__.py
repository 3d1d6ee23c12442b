"""Flax NNX models of the koajax methods."""
