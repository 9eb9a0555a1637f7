# Warden: `make demo` runs the local lab, `make test` runs every check CI runs.
# Both install the system packages they need first (scripts/setup.sh, idempotent).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all setup build lint fmt test demo bench clean

all: build

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The end-to-end tests start the real binaries, so they are built first.
test: setup lint build
	$(CARGO) test --workspace --no-fail-fast
	$(CARGO) run --quiet -p warden-bench -- --smoke
	bash scripts/check-observability.sh

demo: build
	$(CARGO) run --quiet -p warden-tests --bin warden-demo

# The benchmark of docs/benchmarks.md (a few minutes): release binaries, then every scenario;
# results in bench/results/latest.md and latest.json.
bench: setup
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release --quiet -p warden-bench

clean:
	$(CARGO) clean
