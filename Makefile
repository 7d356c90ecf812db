# Set-up and everyday commands. `make demo` and `make test` work on a fresh Linux
# machine with Python 3.11; each creates .venv/ first if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch first: the CPU build is enough here. GPU machines: see README ("GPU workers").
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: venv demo test test-fast lint audit system-deps clean freeze

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -r requirements.txt
	# scenedetect declares opencv-python, which would overwrite the contrib cv2 build we use
	$(BIN)/pip install --quiet --no-deps scenedetect==0.7.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

demo: venv
	$(BIN)/opensubject samples make media
	$(BIN)/opensubject run media --out out
	$(BIN)/opensubject status --out out

# Debian packages the tests need, installed when missing (needs root or sudo): Chromium
# for the browser tests; PostgreSQL's and Redis's servers, from which the tests start
# throwaway ones when no local server answers (tests/local_services.py); none when
# OPENSUBJECT_TEST_DATABASE_URL / OPENSUBJECT_TEST_REDIS_URL name servers; PgBouncer, which
# the lock tests put between two workers and PostgreSQL in transaction pooling.
system-deps:
	@PKGS=""; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || PKGS=" chromium chromium-driver"; \
	[ -n "$$OPENSUBJECT_TEST_DATABASE_URL" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || PKGS="$$PKGS postgresql"; \
	[ -n "$$OPENSUBJECT_TEST_REDIS_URL" ] || command -v redis-server >/dev/null || PKGS="$$PKGS redis-server"; \
	command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || PKGS="$$PKGS pgbouncer"; \
	[ -z "$$PKGS" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing:$$PKGS"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$PKGS >/dev/null; }

# Security lint (bandit's rules in ruff) gates the tests; `make audit` checks the
# pinned requirements against known vulnerabilities (pip-audit; needs PyPI's JSON API
# or OSV, and says how many packages it could not check).
# The tests run in TEST_WORKERS_ALL processes here and TEST_WORKERS in test-fast (pytest-xdist;
# each takes whole files, so a module's fixtures are made once). The full suite keeps the order tests/conftest.py gives the files
# (--no-loadscope-reorder: the longest first, instead of xdist's "most tests first"), and
# runs more processes than there are cores: most of it waits on servers, workers and schedulers.
test: venv system-deps
	$(BIN)/ruff check --select S --ignore S101,S311 opensubject_tasks dags plugins
	$(BIN)/pytest -n $(TEST_WORKERS_ALL) --dist loadfile --no-loadscope-reorder --durations=10

# On every change: the tests that need no server and run no whole build (see README, Tests).
TEST_WORKERS ?= 2
TEST_WORKERS_ALL ?= 4
test-fast: venv
	$(BIN)/pytest -m "not services and not slow" -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(BIN)/ruff check opensubject_tasks dags plugins

audit: venv
	$(BIN)/python tools/audit.py requirements.txt

clean:
	rm -rf out media .pytest_cache .cache/tests

freeze:
	{ head -2 requirements.txt; $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|scenedetect|opensubject-tasks)=='; } > requirements.new && mv requirements.new requirements.txt
