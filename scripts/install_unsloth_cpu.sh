#!/usr/bin/env bash
# Install llm-finetune + Unsloth 2026.10.9 into a virtualenv on a machine WITHOUT a GPU.
#
#   scripts/install_unsloth_cpu.sh <venv path>      (created when missing; re-running is safe)
#
# A plain `pip install unsloth` pulls a CUDA torch (several GB), triton, xformers, bitsandbytes
# and torchvision, and downgrades transformers/trl/datasets/huggingface_hub. On the CPU Unsloth
# (>= 2026.5) falls back to stock transformers + peft + trl and imports none of those, so:
#   1. torch pinned to the CPU build (TORCH_SPEC, default torch==2.13.0),
#   2. the project with its own pins (transformers<=5.17.0, trl<1.15, ...), which satisfy
#      Unsloth's, under a constraint that keeps that torch,
#   3. unsloth + unsloth_zoo with --no-deps,
#   4. their light, GPU-free dependencies, at the versions tested with 2026.10.9. The tested
#      path (FastLanguageModel, trl SFT/DPO, save/push merged) imports none of them; they are
#      for the rest of Unsloth (sentencepiece + protobuf: SentencePiece tokenizers of real
#      models; tyro, msgspec, einops, pillow, ...: other Unsloth modules).
# Then it checks that `import unsloth` selects the CPU fallback and that `pip check` reports
# only Unsloth's GPU packages as missing (no version conflict).
# On a CUDA machine use `pip install -e '.[gpu]'` instead (refused here).
set -euo pipefail

if [[ $# -ne 1 ]]; then
	echo "usage: $0 <venv path>" >&2
	exit 2
fi
VENV=$(realpath -m "$1")  # absolute: the checks below run from another folder
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
UNSLOTH_VERSION=2026.10.9
LIGHT_DEPS=(
	tyro==1.0.17 msgspec==0.22.0 sentencepiece==0.2.3 protobuf==7.36.2 hf_transfer==0.1.9
	json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0 einops==0.8.2 pillow==13.0.0 wheel
	requests
)
# Declared by unsloth/unsloth_zoo, GPU-only, deliberately absent on the CPU.
GPU_ONLY='bitsandbytes|triton|xformers|torchvision|torchao|cut-cross-entropy|diffusers'

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
	&& [[ "${ALLOW_GPU_MACHINE:-0}" != 1 ]]; then
	echo "a CUDA GPU is present: install the GPU stack with pip install -e '.[gpu]' instead" >&2
	echo "(set ALLOW_GPU_MACHINE=1 to install the CPU set anyway)" >&2
	exit 1
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
	"$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" >"$constraints"

echo "==> $TORCH_SPEC (CPU build)"
"${PIP[@]}" install --quiet "$TORCH_SPEC"
echo "==> llm-finetune ($ROOT) with its pinned stack"
"${PIP[@]}" install --quiet -c "$constraints" -e "$ROOT[dev]"
echo "==> unsloth + unsloth_zoo $UNSLOTH_VERSION (--no-deps)"
"${PIP[@]}" install --quiet --no-deps "unsloth==$UNSLOTH_VERSION" "unsloth_zoo==$UNSLOTH_VERSION"
echo "==> light dependencies"
# pip then prints "ERROR: pip's dependency resolver does not currently take into account ..."
# listing unsloth's GPU-only requirements: expected, checked below with pip check.
"${PIP[@]}" install --quiet -c "$constraints" "${LIGHT_DEPS[@]}"

echo "==> checks"
if conflicts=$("${PIP[@]}" check 2>&1); then
	:
fi
unexpected=$(grep -vE "requires ($GPU_ONLY)," <<<"$conflicts" | grep -v '^No broken' || true)
if [[ -n "$unexpected" ]]; then
	echo "pip check reports more than Unsloth's GPU-only packages:" >&2
	echo "$unexpected" >&2
	exit 1
fi
scratch=$(mktemp -d)
banner=$(cd "$scratch" && HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HOME="$scratch" \
	"$VENV/bin/python" -c 'import unsloth, torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1)
rm -rf "$scratch"
echo "$banner" | grep -E '^(Unsloth|torch) ' || true
if ! grep -q "no GPU found, training on CPU" <<<"$banner"; then
	echo "import unsloth did not select the CPU fallback:" >&2
	echo "$banner" | tail -5 >&2
	exit 1
fi
echo "==> done in $(($(date +%s) - start)) s; $VENV is $(du -sh "$VENV" | cut -f1)"
