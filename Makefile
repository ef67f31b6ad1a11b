# One set-up path for a fresh Debian machine (run as root).
#   make demo   - install everything, then run the fleet-backup demo on the local cloud
#   make test   - install everything, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SYSTEM_PACKAGES := openssh-server openssh-client rsync sudo e2fsprogs xfsprogs btrfs-progs \
                   dosfstools util-linux mount zstd procps iproute2 kmod
PYTEST_ARGS ?=

.PHONY: all deps venv test demo bench bench-quick lint clean

all: test

# System packages, installed only when one is missing.
deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[local,dev]'
	touch $@

venv: deps $(VENV)/.installed

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check asyncstage tests benchmarks
	$(VENV)/bin/ruff format --check asyncstage tests benchmarks
	$(VENV)/bin/mypy
	$(PY) scripts/gen_blocking.py --check

demo: venv
	$(VENV)/bin/asyncstage demo

bench: venv
	$(PY) benchmarks/run_all.py

bench-quick: venv
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
