"""Domain-specialist foundation models: one DINOv2/MAE pretraining core, pluggable domains."""

__version__ = "0.1.0"
