# One command for each job on a fresh machine: `make demo` (main job, default model), `make test`.
# Targets create or refresh the virtual environment when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	@echo "demo: the default model (models/default) is tiny: 11M parameters, 6 GPU-minutes of training, Python-looking but not correct code; for useful output point --model at a Code Llama directory, e.g. codellm complete --model /path/CodeLlama-7b-hf"
	$(PY) -m codellm info
	$(PY) -m codellm complete --max-new-tokens 48 'def fibonacci(n):'
	$(PY) -m codellm infill --max-new-tokens 48 --show-file \
		--prefix "$$(printf 'def is_even(n):\n    ')" --suffix "$$(printf '\n    return result\n')"
	$(PY) -m codellm chat --max-new-tokens 64 'Write a function that returns the square of a number.'

lint: $(STAMP)
	$(VENV)/bin/ruff check codellm tests bench

bench: $(STAMP)
	$(PY) bench/decode.py
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache
