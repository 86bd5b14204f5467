# Mixtral instruction tuning: make sft | make dpo | make export | make test
# Every target installs what it needs into .venv first (make install).

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
# The pinned torch is installed before anything else; override e.g. TORCH_SPEC="torch==2.7.1".
TORCH_SPEC    ?= torch==2.13.0
INSTALL_STAMP := $(VENV)/.installed
# transformers 4.x beside the venv (never on its path): the test that the export loads in 4.x too.
TRANSFORMERS4 := $(VENV)/transformers4
# The gguf extra (format=gguf and llama.cpp's own check of it): llama-cpp-python builds llama.cpp from
# source, the library only (no examples, tools, server or llava; portable code): about 3 min on 2 cores.
GGUF_STAMP    := $(VENV)/.gguf-installed
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
                    -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF
RECIPE        ?=
CONFIG        ?=
ARGS          ?=
# Tiny CPU pipeline: where each stage of the bundled default writes.
TINY          := outputs/tiny

export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-gguf test lint data sft dpo export export-gguf chat eval all plan bench-moe bench-data bench-sft bench-dpo bench-qlora bench-plan bench-zero3 bench-gpu clean help

help:
	@echo "make sft      prepare the bundled data and run SFT on the tiny default (CPU)"
	@echo "make dpo      DPO on top of the SFT result"
	@echo "make export   export the DPO result in the Mixtral-8x7B-Instruct-v0.1 layout"
	@echo "make export-gguf  the DPO result as one llama.cpp GGUF file (f32), checked by llama.cpp"
	@echo "make chat     greedy answer from the exported model"
	@echo "make all      data -> sft -> dpo -> export -> chat"
	@echo "make eval     perplexity, passkey and routing analysis"
	@echo "make plan     startup checks + per-GPU / per-node memory of RECIPE under CONFIG (an accelerate config)"
	@echo "make test     the test suite (what CI runs; installs the gguf extra first)"
	@echo "make install-gguf  gguf + llama-cpp-python (llama.cpp built from source, about 3 min once)"
	@echo "make bench-moe | bench-data | bench-sft | bench-dpo   benchmarks against the reference libraries"
	@echo "make bench-qlora  4-bit base memory and QLoRA SFT step vs transformers + bitsandbytes + PEFT (CPU)"
	@echo "make bench-plan   the plan's predicted peak memory vs the measured one (CPU runs)"
	@echo "make bench-zero3  host memory per process of a launched ZeRO-3 SFT run vs the checkpoint's size"
	@echo "make bench-gpu  CUDA tests, then MoE block, LoRA SFT step and whole-8x7B step at 8x7B shapes; exits 2 without a GPU"
	@echo "Options: RECIPE=path.yaml CONFIG=accelerate.yaml ARGS='key=value ...' TORCH_SPEC='torch==X'"

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[dev]"
	touch $(INSTALL_STAMP)

$(TRANSFORMERS4)/.installed: $(INSTALL_STAMP)
	rm -rf $(TRANSFORMERS4)
	$(PY) -m pip install -q --disable-pip-version-check --target $(TRANSFORMERS4) "transformers==4.57.6" \
		> $(VENV)/transformers4.log 2>&1 || (cat $(VENV)/transformers4.log; exit 1)
	test -d $(TRANSFORMERS4)/transformers
	touch $@

install-gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(INSTALL_STAMP)
	@echo "install-gguf: gguf + llama-cpp-python (builds llama.cpp from source once: about 3 min on 2 cores; log in $(VENV)/gguf.log)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q -c requirements/lock.txt -e ".[dev,gguf]" > $(VENV)/gguf.log 2>&1 \
		|| (tail -40 $(VENV)/gguf.log; echo "install-gguf failed: needs cmake and a C++ compiler (see $(VENV)/gguf.log)"; exit 1)
	touch $@

# MIXTRAL_TUNE_REQUIRE_GGUF: the GGUF tests fail, not skip, when the gguf extra is missing.
test: install $(TRANSFORMERS4)/.installed $(GGUF_STAMP)
	MIXTRAL_TUNE_TRANSFORMERS4=$(abspath $(TRANSFORMERS4)) MIXTRAL_TUNE_REQUIRE_GGUF=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check model data_prep pipeline tests bench

data: install
	$(PY) -m pipeline.prep $(or $(RECIPE),recipes/tiny/sft.yaml) $(ARGS)

# Each stage prepares its own recipe's data first (with the same ARGS: data.* overrides change the
# rows, and the stage refuses data prepared from another data section); an unchanged prep is a no-op.
SFT_RECIPE := $(or $(RECIPE),recipes/tiny/sft.yaml)
DPO_RECIPE := $(or $(RECIPE),recipes/tiny/dpo.yaml)

sft: install
	$(PY) -m pipeline.prep $(SFT_RECIPE) $(ARGS)
	$(PY) -m pipeline.sft $(SFT_RECIPE) $(ARGS)

dpo: install
	$(if $(RECIPE),,test -f $(TINY)/sft/manifest.json || $(MAKE) sft)
	$(PY) -m pipeline.prep $(DPO_RECIPE) $(ARGS)
	$(PY) -m pipeline.dpo $(DPO_RECIPE) $(ARGS)

export: install
	test -f $(TINY)/dpo/manifest.json || $(MAKE) dpo
	$(PY) -m pipeline.export $(or $(RECIPE),recipes/tiny/export.yaml) $(ARGS)

# One llama.cpp GGUF file of the tiny DPO result (f32: llama.cpp's logits are checked against ours);
# installs the gguf extra first (make install-gguf). ARGS='export.gguf_type=q8_0' etc. for the other types.
export-gguf: install $(GGUF_STAMP)
	test -f $(TINY)/dpo/manifest.json || $(MAKE) dpo
	$(PY) -m pipeline.export $(or $(RECIPE),recipes/tiny/export.yaml) export.format=gguf export.gguf_type=f32 \
		output_dir=$(TINY)/export-gguf $(ARGS)

chat: install
	test -f $(TINY)/export/config.json || $(MAKE) export
	$(PY) -m pipeline.chat $(TINY)/export $(ARGS)

eval: install
	$(PY) -m pipeline.eval $(or $(RECIPE),recipes/tiny/eval.yaml) $(ARGS)

# Exit 0 fits, 1 does not fit, 2 the recipe and launch cannot start together. A checkpoint that is
# not on this machine: ARGS='--model-preset mixtral-8x7b'; the GPU: ARGS='--gpu-memory-gb 141'.
plan: install
	$(PY) -m pipeline.plan $(or $(RECIPE),recipes/tiny/sft.yaml) $(if $(CONFIG),--config_file $(CONFIG)) $(ARGS)

all: install
	$(MAKE) sft
	$(MAKE) dpo
	$(MAKE) export
	$(MAKE) chat

# make bench-NAME runs bench/bench_NAME.py with ARGS (the script's --help lists them).
BENCHES := moe data sft dpo qlora plan
$(addprefix bench-,$(BENCHES)): bench-%: install
	$(PY) bench/bench_$*.py $(ARGS)

bench-zero3: install
	$(PY) bench/bench_zero3_memory.py $(ARGS)

# On a GPU machine, one command (~6 min on an H200): the CUDA tests (tests/gpu: a training step
# under torch.cuda.set_sync_debug_mode, the varlen / Flex kernels, empty expert groups, compiled
# layers), then the benchmarks at Mixtral-8x7B's shapes: the MoE block (bf16, vs transformers and
# dense), the LoRA SFT step with 2 layers of 8x7B shape (tokens/s, MFU, memory, saved activations),
# and one LoRA step of the whole Mixtral-8x7B with random weights at 4096 tokens (GPUs of >= 120 GB).
# A failing test does not stop the benchmarks; the scripts exit 2 without CUDA. A host whose python3
# already holds CUDA torch, transformers, peft and accelerate but not mistral-common (the lent GPU
# machines): prepare the rows elsewhere with `python -m pipeline.prep recipes/tiny/sft.yaml
# data.output_dir=DIR data.max_seq_len=4096`, bring DIR, then
#   make bench-gpu PY=python3 INSTALL_STAMP= SFT_DATA=DIR
bench-gpu: install
	-timeout 300 $(PY) -m pytest -m cuda tests/gpu -q -p no:cacheprovider
	$(PY) bench/bench_moe.py --device cuda
	$(PY) bench/bench_sft.py --device cuda --dtype bf16 $(if $(SFT_DATA),--data $(SFT_DATA))
	$(PY) bench/bench_8x7b.py $(if $(SFT_DATA),--data $(SFT_DATA))

clean:
	rm -rf outputs wandb .pytest_cache
