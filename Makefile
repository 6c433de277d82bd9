# The README's two commands. Each does the whole set-up on a fresh machine first (Debian packages
# for FFCV, .venv, pip install); later runs reuse the environment.
VENV  := .venv
STAMP := $(VENV)/.raytrain-at-installed

.PHONY: demo test setup browser-check cluster-rehearsal fault-battery

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raytrain-at quickstart

test: $(STAMP)
	$(VENV)/bin/python -m pytest --durations=15

# The registry pages in a real browser (headless Debian chromium over a loopback mlflow server):
# installs chromium once, then runs the two slow page checks (about 2 minutes on 2 cores). The
# screenshots and rendered pages are kept in ci-artifacts/registry/ (git-ignored; CI keeps it).
CI_ARTIFACTS := $(CURDIR)/ci-artifacts
browser-check: $(STAMP)
	bash scripts/setup_browser.sh
	RAYTRAIN_AT_CI_ARTIFACTS=$(CI_ARTIFACTS)/registry $(VENV)/bin/python -m pytest -m slow \
	    tests/test_registry_server.py -k "screenshot or models_page"
	@ls -l $(CI_ARTIFACTS)/registry

# The cluster rehearsal: Ray head + 2 worker nodes with separate disks, an S3 store (moto) and the
# MLflow server on this machine, the main job through them (tests/support/cluster_rehearsal.sh).
cluster-rehearsal: $(STAMP)
	$(VENV)/bin/python -m pytest -m cluster tests/test_cluster_rehearsal.py

# The fault battery (tests/fault_battery/): a tracking outage, truncated and pickled checkpoints,
# a changed config on resume, two evaluation drivers on one state folder, a corrupt .beton, an
# open or restored registry, concurrent registrations; loopback only. The result table goes to
# ci-artifacts/fault-battery.md.
fault-battery: $(STAMP)
	RAYTRAIN_AT_CI_ARTIFACTS=$(CI_ARTIFACTS) $(VENV)/bin/python -m pytest -m faults tests/fault_battery
	@cat $(CI_ARTIFACTS)/fault-battery.md
