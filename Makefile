# The README's two commands. Each does the whole set-up on a fresh machine first (Debian packages
# for FFCV, .venv, pip install); later runs reuse the environment.
VENV  := .venv
STAMP := $(VENV)/.raytrain-at-installed

.PHONY: demo test setup

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raytrain-at quickstart

test: $(STAMP)
	$(VENV)/bin/python -m pytest
