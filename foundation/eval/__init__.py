"""Frozen-backbone evaluation: feature extraction and caching, kNN (DINO protocol) and linear probes."""
