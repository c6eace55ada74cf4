"""Backbones and heads for pretraining (DINOv2, arXiv 2304.07193)."""
