# wsgate: every target installs what it needs from the package registries first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install run test lint format bench bench-quick bench-icount clean browser node proxies redis
BENCH_STAMP := $(VENV)/.installed-bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start an echo backend and a gateway in front of it (ws://127.0.0.1:8080/echo).
run: $(STAMP)
	$(BIN)/wsgate demo

## Headless Chromium and its WebDriver, for tests/test_console_web.py (Debian, apt-get as root).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	else \
		echo "make: tests/test_console_web.py needs chromium and chromium-driver: run make test as root, or apt-get install -y chromium chromium-driver" >&2; \
	fi

## Node and its ws package, for tests/test_interop_node.py: Node from Debian (apt-get as
## root) if missing, ws from the npm registry as pinned by tests/node/package-lock.json.
node:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm; \
	else \
		echo "make: tests/test_interop_node.py needs node and npm: run make test as root, or apt-get install -y nodejs npm" >&2; \
	fi
	@if [ ! -d tests/node/node_modules/ws ] || [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then \
		cd tests/node && npm ci --no-audit --no-fund; \
	fi

## HAProxy and nginx, for tests/test_haproxy_e2e.py and the balancer tests of
## tests/test_cluster_gateway.py (Debian, apt-get as root; their services kept from starting).
proxies:
	@bash benchmarks/install_proxies.sh

## redis-server, for the [cluster] tests (tests/redis_server.py starts it on a free port)
## and the benchmark's wsgate-redis row.
redis:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; \
	else \
		echo "make: the [cluster] tests need redis-server: run make test as root, or apt-get install -y redis-server" >&2; \
	fi

## Run the whole test suite.
test: $(STAMP) browser node proxies redis
	$(BIN)/python -m pytest -q

## ruff (lint + format check) and mypy --strict.
lint: $(STAMP)
	$(BIN)/ruff check wsgate tests benchmarks
	$(BIN)/ruff format --check wsgate tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format wsgate tests benchmarks
	$(BIN)/ruff check --fix wsgate tests benchmarks

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

## Load benchmark (12-15 minutes on 2 cores): markdown table, JSON and charts in
## benchmarks/results/ (see docs/performance.md). Extra options: make bench BENCH_ARGS='...'.
bench: $(BENCH_STAMP) redis
	@bash benchmarks/install_proxies.sh
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

## The one-minute subset of the benchmark.
bench-quick: $(BENCH_STAMP)
	@bash benchmarks/install_proxies.sh
	$(BIN)/python -m benchmarks.run --quick $(BENCH_ARGS)

## Instructions per echo (or per handshake) counted by valgrind: deterministic where CPU
## time is not (metrics on/off, before/after a change). Installs valgrind as root if missing.
ICOUNT_ARGS ?= --targets wsgate,wsgate-metrics --repeat 3 --out benchmarks/results/metrics
bench-icount: $(BENCH_STAMP)
	@command -v valgrind >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; } || echo "make: valgrind is missing (apt-get install valgrind)" >&2
	$(BIN)/python -m benchmarks.icount $(ICOUNT_ARGS)

FUZZ_TIME     ?= 60
SOAK_DURATION ?= 300
FUZZ_STAMP := $(VENV)/.installed-fuzz
.PHONY: fuzz soak

$(FUZZ_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet 'atheris>=2.3'
	touch $(FUZZ_STAMP)

## Coverage-guided fuzzing (atheris) of the frame scanner and the handshake parser,
## FUZZ_TIME seconds each, from tests/fuzz/corpus; crashes land in .fuzz/crashes/.
fuzz: $(FUZZ_STAMP)
	mkdir -p .fuzz/frames .fuzz/handshake .fuzz/crashes
	$(BIN)/python tests/fuzz/fuzz_frames.py -max_total_time=$(FUZZ_TIME) -timeout=10 -rss_limit_mb=2048 -artifact_prefix=.fuzz/crashes/ .fuzz/frames tests/fuzz/corpus/frames tests/fuzz/regressions/frames
	$(BIN)/python tests/fuzz/fuzz_handshake.py -max_total_time=$(FUZZ_TIME) -timeout=10 -rss_limit_mb=2048 -artifact_prefix=.fuzz/crashes/ .fuzz/handshake tests/fuzz/corpus/handshake tests/fuzz/regressions/handshake

## Soak: 10,000 churned pairs per relay engine in process, then a gateway process under
## mixed load for SOAK_DURATION s with a 1 GiB flood (SOAK_ARGS='--engine reactor --tls' ...).
soak: $(STAMP)
	WSGATE_CHURN_PAIRS=10000 $(BIN)/python -m pytest -q tests/test_churn.py
	$(BIN)/python -m benchmarks.soak --duration $(SOAK_DURATION) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
