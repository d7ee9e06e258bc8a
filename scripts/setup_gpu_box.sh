#!/usr/bin/env bash
# Set up a freshly rented CUDA box for llm-finetune, checking what would otherwise fail an
# hour into a run. From the repository root:
#
#   bash scripts/setup_gpu_box.sh [MIN_FREE_GB]      (default 60: an 8B run's base + merged)
#
# Checks the NVIDIA driver and GPU, Python >= 3.11, free disk; creates .venv with the CUDA
# build of torch and the `gpu` extra (Unsloth, bitsandbytes); checks that torch sees the GPU
# and that Unsloth imports, and that Triton can build its kernel launchers (a C compiler and
# the Python headers); checks the Hub token (HF_TOKEN or `hf auth login`) without
# printing it; then prints the next command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIN_FREE_GB=${1:-60}
PYTHON=${PYTHON:-python3}
fail() { echo "setup_gpu_box: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: this is not a CUDA box (CPU machines: make setup)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
	| sed 's/^/GPU: /' || fail "nvidia-smi cannot talk to the driver"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	|| fail "Python 3.11+ is needed; $("$PYTHON" --version 2>&1) found (set PYTHON=python3.11)"

free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
echo "disk: ${free_gb} GB free here"
[ "$free_gb" -ge "$MIN_FREE_GB" ] || fail "only ${free_gb} GB free, ${MIN_FREE_GB} GB wanted \
(an 8B merge needs ~16 GB for the base in the Hub cache, ~16 GB merged, plus the adapter): \
free space, or pass a smaller MIN_FREE_GB for a smaller model"

make setup
.venv/bin/python -m pip install --quiet -e ".[gpu,dev]"
touch .venv/.unsloth

.venv/bin/python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("setup_gpu_box: torch does not see the GPU (a CPU build of torch?)")
name = torch.cuda.get_device_name(0)
memory = torch.cuda.get_device_properties(0).total_memory / 2**30
print(f"torch {torch.__version__}: {name}, {memory:.0f} GiB, bf16={torch.cuda.is_bf16_supported()}")
PY
UNSLOTH_DISABLE_CPU_FALLBACK=1 .venv/bin/python -c 'import unsloth' >/dev/null \
	|| fail "unsloth does not import on this GPU; backend: hf still works"
echo "unsloth imports on the GPU"
.venv/bin/python - <<'PY'
from llm_finetune.backends.unsloth import check_kernel_toolchain
from llm_finetune.errors import UserError
try:
    check_kernel_toolchain()
except UserError as exc:
    raise SystemExit(f"setup_gpu_box: {exc}")
print("Triton can build Unsloth's kernel launchers: a C compiler and the Python headers")
PY

.venv/bin/python - <<'PY'
from huggingface_hub import get_token, whoami
token = get_token()
if not token:
    raise SystemExit("setup_gpu_box: no Hub token: export HF_TOKEN=<a write token> or run `hf auth login`")
try:
    me = whoami(token=token)
except Exception as exc:  # never show the token, only what went wrong
    raise SystemExit(f"setup_gpu_box: the Hub rejected the token ({type(exc).__name__})")
role = ((me.get("auth") or {}).get("accessToken") or {}).get("role", "?")
print(f"Hub: logged in as {me['name']} (token role: {role})")
PY

cat <<'NEXT'

Ready. Next:
  make finetune-and-publish    # a few minutes: the whole pipeline on this GPU (tiny model, local Hub)
  export HF_USERNAME=<your Hub name>
  .venv/bin/llm-finetune validate configs/llama-3.1-8b/sft.yaml
  make finetune-and-publish CONFIG=configs/llama-3.1-8b/sft.yaml
NEXT
