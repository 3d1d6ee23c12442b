"""Knee radiograph data: synthetic generation, preprocessing, cache, splits, input pipeline."""
