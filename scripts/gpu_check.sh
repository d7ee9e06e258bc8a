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
python3 -c 'import torch, transformers, trl, peft, datasets, unsloth; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "unsloth", unsloth.__version__)'
python3 scripts/gpu_check.py --work "${OUT:-/tmp}/gpu-check" "$@"
