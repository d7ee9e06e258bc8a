#!/usr/bin/env bash
# On a GPU machine with no network (the device tool): install the carried wheels, then run
# the unsloth and hf backends side by side (scripts/gpu_check.py). Prepare the wheels first
# on a machine with PyPI: .venv/bin/python scripts/gpu_wheels.py  (-> .whl/, git-ignored).
# Through the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if compgen -G ".whl/*.whl" >/dev/null; then
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target /tmp/site .whl/*.whl
	export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
# The wheels go in with --no-deps: show the versions whose pins nothing enforced (unsloth needs
# peft >= 0.18, pydantic typing-extensions >= 4.16, datasets fsspec <= 2026.2.0).
python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|datasets|unsloth|unsloth.zoo|bitsandbytes|accelerate|typing.extensions|fsspec|pydantic) '
python3 -c 'import torch, transformers, trl, peft, datasets, unsloth; print("imports ok; cuda", torch.cuda.is_available())'
# The work folder holds models (GBs); the report and the logs go to $OUT after each backend
# (the device tool returns at most 8 files of 16 MiB).
python3 scripts/gpu_check.py --work /tmp/gpu-check "$@"
