# Set-up is part of every target: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

# The FUSE mount needs fusermount3 (Debian package fuse3), the FUSE benchmarks' peers
# rclone and s3fs, and the cluster tier's tests redis-server: each installed only where
# it is missing and we may (root, apt-get); elsewhere their tests skip, saying why. The
# tests start their own Redis nodes, so the system service apt may start is stopped and disabled.
setup: $(VENV)/.installed
	@command -v fusermount3 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; } \
		|| echo "note: fuse3 is not installed; the FUSE tests will be skipped"
	@{ command -v rclone && command -v s3fs; } >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq rclone s3fs >/dev/null; } \
		|| echo "note: rclone or s3fs is not installed; the tests of the FUSE peers will be skipped"
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq redis-server >/dev/null \
		&& { service redis-server stop >/dev/null 2>&1; systemctl disable redis-server >/dev/null 2>&1; true; }; } \
		|| echo "note: redis-server is not installed; the cluster tier tests will be skipped"

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
