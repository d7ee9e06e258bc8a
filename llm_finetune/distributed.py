"""Which process this is under `accelerate launch` / `torchrun`, read from their environment.

Training runs in every process; the adapter is gathered and saved collectively; everything
after it (merge, verify, publish) and all logging happens in the main process only.
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
