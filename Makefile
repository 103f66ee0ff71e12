# Set-up is part of every target: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

# The FUSE mount needs fusermount3 (Debian package fuse3): installed only where it
# is missing and we may (root, apt-get); elsewhere its tests skip, saying why.
setup: $(VENV)/.installed
	@command -v fusermount3 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; } \
		|| echo "note: fuse3 is not installed; the FUSE tests will be skipped"

# torch first and pinned: the local CPU wheel, not gigabytes of CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,fuse,torch,bench]'
	touch $@

demo: setup
	$(BIN)/igtcache demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/igtcache bench engine

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
