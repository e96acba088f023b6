# Airlock: every set-up step lives here so that a fresh machine needs only `make install`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROTO   := proto/airlock/v1
GEN     := airlock/v1
SOCKET  ?= /run/airlock/airlock.sock
STATE   ?= /var/lib/airlock
NODE_BIN := node_modules/.bin

.PHONY: install deps venv proto test run bench lint clean

install: deps venv proto

# Debian packages the tests and benchmarks need (bubblewrap is the benchmark's reference).
deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in bubblewrap iproute2 util-linux nftables libseccomp2 curl; do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

venv: $(BIN)/airlockd

$(BIN)/airlockd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

proto: venv
	mkdir -p $(GEN)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  $(PROTO)/*.proto
	touch $(GEN)/__init__.py

test: install
	$(BIN)/pytest tests

run: install
	$(BIN)/airlockd --socket $(SOCKET) --state-dir $(STATE)

bench: install
	$(BIN)/python bench/run.py

lint: install
	$(BIN)/ruff check airlock tests bench
	$(BIN)/ruff format --check airlock tests bench
	$(BIN)/mypy airlock
	@if [ ! -x $(NODE_BIN)/buf ]; then npm install --no-save --silent @bufbuild/buf@1; fi
	$(NODE_BIN)/buf lint

clean:
	rm -rf $(VENV) $(GEN) node_modules .mypy_cache .pytest_cache .ruff_cache *.egg-info
