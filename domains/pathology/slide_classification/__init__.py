"""Slide-level classification by multiple-instance learning on the tile features of ``foundation embed``."""
