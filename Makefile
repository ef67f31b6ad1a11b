# One set-up path for a fresh Debian machine (run as root).
#   make demo   - install everything, then run the fleet-backup demo on the local cloud
#   make test   - install everything, then run the whole test suite
#   make test-unit - only the tests that need no root, sshd or local cloud
#   make docs   - build the documentation site into site/ (mkdocs build --strict)
#   make wheel-check - build sdist and wheel, install the wheel in a fresh venv, run it
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SYSTEM_PACKAGES := openssh-server openssh-client rsync sudo e2fsprogs xfsprogs btrfs-progs \
                   dosfstools util-linux mount zstd procps iproute2 kmod nftables
PYTEST_ARGS ?=
# The suite runs in parallel workers, each with a local cloud of its own; whole modules go
# to one worker (--dist loadscope), so a module's servers are made once, the longest modules
# first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order). The
# slowest tests are listed at the end, to keep that order and the suite's time in view.
PYTEST_WORKERS ?= 6

.PHONY: all deps venv test test-unit demo bench bench-deps bench-quick lint docs wheel-check clean

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
	$(PY) -m pip install -q -e '.[local,dev,docs]'
	touch $@

venv: deps $(VENV)/.installed

test: venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=30 $(PYTEST_ARGS)

# The unit layer: no root, no sshd, no local cloud (markers set by tests/conftest.py),
# so no system packages either.
test-unit: $(VENV)/.installed
	$(PY) -m pytest -m "not localcloud and not sshd" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check asyncstage tests benchmarks scripts
	$(VENV)/bin/ruff format --check asyncstage tests benchmarks scripts
	$(VENV)/bin/mypy
	$(PY) scripts/gen_blocking.py --check

# Offline: the theme loads no web fonts and nothing else is fetched (see mkdocs.yml).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

wheel-check: $(VENV)/.installed
	BASE_PYTHON=$(PYTHON) .ci/wheel-check $(PY)

demo: venv
	$(VENV)/bin/asyncstage demo

# The benchmarks' baselines: the Perl VM::EC2::Staging (Debian's libvm-ec2-perl), and
# Fabric, pyinfra and matplotlib (the `bench` extra), each installed only when missing.
BENCH_SYSTEM_PACKAGES := libvm-ec2-perl

bench-deps: venv
	@missing=""; for p in $(BENCH_SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@$(PY) -c 'import fabric, matplotlib, pyinfra' 2>/dev/null || $(PY) -m pip install -q -e '.[local,dev,bench]'

bench: bench-deps
	$(PY) benchmarks/run_all.py

bench-quick: bench-deps
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info site dist build
