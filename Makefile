# make run   - install into .venv and start the proxy on its embedded default
# make test  - install test needs (Debian packages, with sudo unless root) and run the suite
# make bench - benchmarks against direct loopback and Dante

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0

# What building the gssapi package needs (krb5-config and headers).
BUILD_DEBS := libkrb5-dev
# Real clients, the real KDC, a real balancer (haproxy) and systemd's tools
# (systemd-socket-activate, systemd-analyze verify: no running systemd needed)
# used by the tests; the last line is what
# tests/dante_gssapi.py needs to rebuild Debian's dante with GSS-API (the
# independent RFC 1961 peer), once, cached in /var/cache/socksd-tests.
# dante-server and tinyproxy are the upstream proxies socksd's client
# chains through (tests/test_upstream_dante.py, test_upstream_tinyproxy.py).
TEST_DEBS := curl ncat netcat-openbsd socat dante-client krb5-kdc krb5-admin-server krb5-user libkrb5-dev \
	apache2-utils procps oidentd haproxy systemd dante-server tinyproxy \
	dpkg-dev build-essential debhelper flex libtool-bin libpam0g-dev libwrap0-dev
BENCH_DEBS := dante-server dante-client iperf3 procps valgrind

.PHONY: run test lint bench venv install debs-build debs-test debs-bench clean

$(VENV)/bin/pip:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# A normal (not editable) install: what users get, plugins included. pip
# rebuilds a local directory every time, but setuptools builds in ./build
# and would ship files left there by an older tree: start from none.
install: debs-build $(VENV)/bin/pip
	rm -rf build
	$(PY) -m pip install -q '.$(EXTRAS)'

run: install
	$(VENV)/bin/twistd -n --pidfile= socks $(ARGS)

debs-build:
	@missing=$$(for p in $(BUILD_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then $(APT) update && $(APT) install --no-install-recommends $$missing; fi

debs-test:
	@missing=$$(for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then $(APT) update && $(APT) install --no-install-recommends $$missing; fi

debs-bench:
	@missing=$$(for p in $(BENCH_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then $(APT) update && $(APT) install --no-install-recommends $$missing; fi

test: EXTRAS = [test]
test: debs-test install lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The gates that hold style, layering and types before any test runs
# ([tool.ruff], [tool.importlinter] and [tool.mypy] in pyproject.toml).
lint:
	$(VENV)/bin/ruff check socksd tests benchmarks twisted examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: EXTRAS = [test]
bench: debs-test debs-bench install
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/ident_lookup.py
	$(PY) benchmarks/gssapi_bulk.py
	$(PY) benchmarks/auth_flood.py
	$(PY) benchmarks/rate_cost.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .ruff_cache .mypy_cache .import_linter_cache
