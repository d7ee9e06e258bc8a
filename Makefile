# Every target creates and uses the project's own virtual environment (.venv) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/llm-finetune
STAMP := $(VENV)/.installed
UNSLOTH_STAMP := $(VENV)/.unsloth
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp
# Not spelt $(MAKE) in a recipe: make would run that line even under `make -n`.
SUBMAKE = $(MAKE)
# Before a run: install what its exports need (llama.cpp for GGUF, bitsandbytes for 4-bit).
define install_export_needs
@needs="$$($(PY) -m llm_finetune.exports $(CONFIG) $(ARGS))" || exit $$?; \
	if [ -n "$$needs" ]; then $(SUBMAKE) --no-print-directory $$needs; fi
endef
CONFIG ?= configs/tiny-llama/sft.yaml
# CPU machines get the CPU build of torch; a GPU box (nvidia-smi present) keeps PyPI's CUDA build.
CPU_TORCH ?= torch==2.13.0
# Several GPUs / nodes: NPROC=<processes in all> [NNODES=2 NODE_RANK=0 MAIN_ADDR=... MAIN_PORT=29500]
NPROC ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MAIN_PORT ?= 29500
ACCELERATE_CONFIG ?= configs/accelerate/ddp.yaml
# One process without an ACCELERATE_CONFIG of the user's: no launcher. With one (FSDP or
# DeepSpeed, e.g. to offload to the CPU), accelerate launch even for one process.
ifeq ($(NPROC)$(NNODES)$(origin ACCELERATE_CONFIG),11file)
RUN := $(CLI)
else
RUN := $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NPROC) \
	--num_machines $(NNODES) --machine_rank $(NODE_RANK) --main_process_port $(MAIN_PORT) \
	$(if $(MAIN_ADDR),--main_process_ip $(MAIN_ADDR)) -m llm_finetune.cli
endif

.PHONY: setup setup-unsloth setup-gguf setup-export export finetune-and-publish train merge verify publish test test-fast lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA GPU found: torch comes from PyPI with the package"; \
	else \
		echo "no CUDA GPU: installing the CPU build $(CPU_TORCH)"; \
		$(PY) -m pip install --quiet "$(CPU_TORCH)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(STAMP)

## Unsloth: the gpu extra on a GPU box; on a CPU machine its CPU fallback (--no-deps install),
## so the tests run the unsloth backend for real.
setup-unsloth: $(UNSLOTH_STAMP)

$(UNSLOTH_STAMP): $(STAMP) scripts/install_unsloth_cpu.sh
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet -e ".[gpu,dev]"; \
	else \
		bash scripts/install_unsloth_cpu.sh $(VENV); \
	fi
	touch $@

## GGUF exports: llama.cpp (llama-cpp-python, compiled once per machine, ~8 min on 2 cores,
## then reused from pip's cache) and llama.cpp's converter of the same commit.
setup-gguf: $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP): $(STAMP) scripts/install_llama_cpp.sh
	bash scripts/install_llama_cpp.sh $(VENV)
	touch $@

## merged_4bit exports: bitsandbytes.
setup-export: $(STAMP)
	$(PY) -m pip install --quiet -e ".[export]"

## The main job: train -> adapter -> 16-bit merge -> verify -> export -> publish
## (CONFIG=configs/<model>/<method>.yaml); first installs what the config's exports need.
finetune-and-publish: $(STAMP)
	$(install_export_needs)
	$(RUN) run $(CONFIG) $(ARGS)

train: $(STAMP)
	$(RUN) train $(CONFIG) $(ARGS)

## make merge BASE=<folder or hub id> ADAPTER=<folder> OUTPUT=<new folder> [DTYPE=bfloat16]
merge: $(STAMP)
	$(CLI) merge --base "$(BASE)" --adapter "$(ADAPTER)" --output "$(OUTPUT)" --dtype $(or $(DTYPE),bfloat16)

verify: $(STAMP)
	$(CLI) verify --base "$(BASE)" --adapter "$(ADAPTER)" --merged "$(MERGED)"

## make export [CONFIG=...] [ARGS="export.formats=[q4_k_m,q6_k]"]: the exports of a finished run
export: $(STAMP)
	$(install_export_needs)
	$(CLI) export $(CONFIG) $(ARGS)

## make publish FOLDER=<model folder> REPO_ID=<namespace/name>
publish: $(STAMP)
	$(CLI) publish --folder "$(FOLDER)" --repo-id "$(REPO_ID)" $(ARGS)

test: $(UNSLOTH_STAMP) $(LLAMA_CPP_STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(UNSLOTH_STAMP) $(LLAMA_CPP_STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## make bench [ARGS=... for the merge bench] [VERIFY_ARGS=... for the verification bench]
##            [EXPORT_ARGS=... for the export bench] [MOE_ARGS=... for the MoE merge bench]
bench: $(STAMP) $(LLAMA_CPP_STAMP)
	$(PY) bench/merge_bench.py $(ARGS)
	$(PY) bench/moe_merge_bench.py $(MOE_ARGS)
	$(PY) bench/verify_bench.py $(VERIFY_ARGS)
	$(PY) bench/export_bench.py $(EXPORT_ARGS)

clean:
	rm -rf outputs .pytest_cache
