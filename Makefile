# The two commands of the README:
#   make quickstart   pre-train -> head -> export -> verify -> benchmark report (installs first)
#   make test         the test suite (installs first); CI runs exactly this
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test quickstart
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh scripts/torchvision_hook.py
	bash scripts/setup.sh

test: setup
	$(BIN)/python -m pytest tests

quickstart: setup
	$(BIN)/qbheat-export quickstart --out quickstart_out
