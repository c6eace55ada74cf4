"""Domain-specialist foundation models: one DINOv2/MAE pretraining core, pluggable domains."""

import os as _os

# Before torch (and its OpenMP runtime) loads: an idle OpenMP thread spins ~1,000 times, then sleeps, instead of
# libgomp's 300,000 (milliseconds on a core another process or our loader workers need); long enough to catch the
# next of a small model's many short parallel regions (see foundation/threads.py). A user's own setting wins.
_user_set = any(_os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
if _os.environ.get("FOUNDATION_THREADS", "").strip().lower() != "off" and not _user_set:
    _os.environ["GOMP_SPINCOUNT"] = "1000"

__version__ = "0.1.0"
