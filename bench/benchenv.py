"""What every benchmark script shares before its own imports: the checkout
and scripts/ on the import path (for aattsfs and the harness), quiet model
loaders, and the places benchmarks work in. Import it first."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "scripts", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

WORK = REPO / "work" / "bench"  # models, images and mount points (git-ignored)
FAST = Path("/dev/shm/aattsfs-bench-fast")  # the fast tier of benchmark mounts
