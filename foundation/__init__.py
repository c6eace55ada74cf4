"""Domain-specialist foundation models: one DINOv2/MAE pretraining core, pluggable domains."""

import os as _os

# Before torch (and its OpenMP runtime) loads: idle OpenMP threads sleep instead of spinning on cores that other
# processes, or our own data-loader workers, need (see foundation/threads.py). A user's own setting wins.
if _os.environ.get("FOUNDATION_THREADS", "").strip().lower() != "off":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
