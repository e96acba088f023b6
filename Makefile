# Airlock: every set-up step lives here so that a fresh machine needs only `make install`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROTO   := proto/airlock/v1
GEN     := airlock/v1
SOCKET  ?= /run/airlock/airlock.sock
STATE   ?= /var/lib/airlock
NODE_BIN := node_modules/.bin

.PHONY: install deps venv native node proto lock dist test test-unit soak run bench lint clean install-service uninstall-service

install: deps venv native node proto

# Debian packages the tests and benchmarks need (bubblewrap is the benchmark's reference; gcc,
# musl-tools and linux-libc-dev build the sandbox's init program, against musl: native/build.py;
# node and npm run buf and the tests' npm registry, unless a node is installed some other way;
# strace counts a test's fsync calls: tests/unit/core/test_state.py).
deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in bubblewrap iproute2 util-linux nftables libseccomp2 curl gcc libc6-dev musl-tools linux-libc-dev strace; do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  command -v node >/dev/null && command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

# Exactly the lock: every package pinned and hash-checked (requirements-dev.txt holds the runtime
# set of requirements.txt plus the dev, test and build tools), then Airlock itself, editable,
# built with the locked setuptools. Nothing here asks a registry for "the newest".
venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

# The sandbox's init program (native/airlock-sandbox-init.c; docs/decisions.md §37), built next to
# airlock/sandbox/init.py for the editable install; a wheel builds its own (setup.py).
INIT := airlock/sandbox/airlock-sandbox-init
native: $(INIT)

$(INIT): native/airlock-sandbox-init.c native/build.py
	$(PY) native/build.py $@

# Node tools, exactly package-lock.json: buf (make lint) and verdaccio (the npm registry of
# tests/daemon/test_egress_npm.py).
node: node_modules/.installed

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

# Refresh the lock on purpose: the newest versions pyproject.toml allows, with their hashes.
LOCK := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --upgrade --quiet --custom-compile-command "make lock"
lock: venv
	$(LOCK) -o requirements.txt
	$(LOCK) --extra dev -o requirements-dev.txt
	npm install --package-lock-only --silent
	@echo "lock refreshed: review 'git diff', then 'make install' and 'make test'"

# The generated code is committed (a wheel from a clean checkout needs it); this regenerates it
# with the locked grpcio-tools, and CI fails if that changes anything.
proto: venv
	mkdir -p $(GEN)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  $(PROTO)/*.proto
	touch $(GEN)/__init__.py

# A wheel and an sdist in dist/, built with the locked build tools (no download at build time).
dist: venv
	rm -rf dist
	$(BIN)/python -m build --no-isolation --sdist --wheel --outdir dist .

# tests/unit needs neither root nor a daemon; tests/sandbox (the kernel) and tests/daemon (a real
# airlockd) are skipped unless run as root. .ci/unit-as-nobody runs tests/unit as a real user.
# The long soak and fault runs (marker `soak`) are left out: `make soak` runs them.
test: install
	$(BIN)/pytest -m "not soak" tests

# The soak and fault runs (marker `soak`, as root): tests/soak sends SOAK_CALLS mixed dry runs
# from SOAK_CLIENTS clients to one daemon and checks leaks, the audit log and the RSS slope
# (figures printed; docs/threat-model.md, "Reliability"). CI runs a bounded count.
SOAK_CALLS   ?= 5000
SOAK_CLIENTS ?= 4
soak: install
	SOAK_CALLS=$(SOAK_CALLS) SOAK_CLIENTS=$(SOAK_CLIENTS) $(BIN)/pytest -m soak -s tests

test-unit: install
	$(BIN)/pytest tests/unit

run: install
	$(BIN)/airlockd --socket $(SOCKET) --state-dir $(STATE)

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/issue16.py

lint: install
	$(BIN)/ruff check airlock tests bench native setup.py
	$(BIN)/ruff format --check airlock tests bench native setup.py
	$(BIN)/mypy airlock
	$(NODE_BIN)/buf lint

# The daemon as a systemd service (README.md, "Running as a service"): the unit with ExecStart set
# to AIRLOCKD, the tmpfiles.d entry, and the example configuration unless one is there already
# (an operator's file is never overwritten). DESTDIR=DIR installs under DIR and starts nothing.
AIRLOCKD ?= $(CURDIR)/$(BIN)/airlockd
DESTDIR  ?=
UNIT     := /etc/systemd/system/airlockd.service
TMPFILES := /etc/tmpfiles.d/airlock.conf
CONFIG   := /etc/airlock/airlockd.toml
SYSTEMD_RUNNING = [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]

install-service:
	@test -x "$(AIRLOCKD)" || { echo "$(AIRLOCKD) is not executable: run 'make install' first, or pass AIRLOCKD=PATH" >&2; exit 1; }
	install -d -m 0755 $(dir $(DESTDIR)$(UNIT)) $(dir $(DESTDIR)$(TMPFILES)) $(dir $(DESTDIR)$(CONFIG))
	sed 's|^ExecStart=.*|ExecStart=$(AIRLOCKD) --config $(CONFIG)|' packaging/systemd/airlockd.service > $(DESTDIR)$(UNIT).tmp
	chmod 0644 $(DESTDIR)$(UNIT).tmp && mv $(DESTDIR)$(UNIT).tmp $(DESTDIR)$(UNIT)
	install -m 0644 packaging/tmpfiles.d/airlock.conf $(DESTDIR)$(TMPFILES)
	@if [ -e $(DESTDIR)$(CONFIG) ]; then echo "kept the existing $(DESTDIR)$(CONFIG) (compare: packaging/airlockd.toml)"; \
	else echo "install -m 0644 packaging/airlockd.toml $(DESTDIR)$(CONFIG)"; install -m 0644 packaging/airlockd.toml $(DESTDIR)$(CONFIG); fi
	if command -v systemd-tmpfiles >/dev/null; then systemd-tmpfiles --create $(if $(DESTDIR),--root=$(DESTDIR)) $(notdir $(TMPFILES)); \
	else install -d -m 0755 $(DESTDIR)/run/airlock; fi
	@if $(SYSTEMD_RUNNING); then echo "systemctl daemon-reload && systemctl enable --now airlockd"; \
	  systemctl daemon-reload && systemctl enable --now airlockd; \
	else echo "systemd is not running here$(if $(DESTDIR), (or DESTDIR is set)); to start the daemon on a system where it runs: systemctl daemon-reload && systemctl enable --now airlockd"; fi

# Stops and disables the service, removes the unit and the tmpfiles.d entry. Keeps the
# configuration, the state (audit log, audit key, state store) and the journal's logs.
uninstall-service:
	-@if $(SYSTEMD_RUNNING); then echo "systemctl disable --now airlockd"; systemctl disable --now airlockd; fi
	rm -f $(DESTDIR)$(UNIT) $(DESTDIR)$(TMPFILES)
	@if $(SYSTEMD_RUNNING); then systemctl daemon-reload; fi
	@echo "kept: $(CONFIG) (configuration), $(STATE) (audit log, audit key, state store, kept changes; or the configuration's state-dir), the journal's logs (journalctl -u airlockd). Delete them yourself if you mean to."

clean:
	rm -rf $(VENV) dist build node_modules $(INIT) .mypy_cache .pytest_cache .ruff_cache *.egg-info
