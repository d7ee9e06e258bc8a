"""Progress bars where a person waits (merge, verification, upload, training), and none in a
log: a bar redrawn into a file or a CI log is noise, so they show only on a terminal."""

from __future__ import annotations

import os
import sys
from typing import Any

from llm_finetune.distributed import is_main_process

# Environment switches of the libraries' own bars (huggingface_hub's uploads and downloads,
# transformers' loading, datasets' maps): read when they are imported.
LIBRARY_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def bars_wanted() -> bool:
    """On a terminal, outside CI, in the main process (one set of bars for a multi-process run)."""
    return sys.stderr.isatty() and not in_ci() and is_main_process()


def quiet_library_bars() -> None:
    """Turn the libraries' bars off where ours are off (a switch the user set is kept)."""
    if not bars_wanted():
        for name in LIBRARY_SWITCHES:
            os.environ.setdefault(name, "1")


def progress_bar(total: int, description: str, unit: str) -> Any:
    """A tqdm bar on stderr, disabled where `bars_wanted` says no; removed when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, leave=False, disable=not bars_wanted())
