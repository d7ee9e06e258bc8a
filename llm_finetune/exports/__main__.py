"""`python -m llm_finetune.exports CONFIG [key=value ...]`: the Makefile's question "which
set-up targets do this config's exports need?", answered before the run (printed, one line)."""

from __future__ import annotations

import sys

from llm_finetune.config import load_config
from llm_finetune.errors import UserError
from llm_finetune.exports.stage import setup_targets

if __name__ == "__main__":
    try:
        config = load_config(sys.argv[1], sys.argv[2:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(" ".join(setup_targets(config)))
