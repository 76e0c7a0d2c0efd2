# Thin wrappers over cargo. `make demo` and `make test` are the two commands
# the README promises work on a fresh machine with only the Rust toolchain.

CARGO ?= cargo
export CARGO_BUILD_JOBS ?= 2
SHOAL := target/debug/shoal

.PHONY: build test lint fmt demo clean

build:
	$(CARGO) build --workspace

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The integration tests drive the built `shoal` binary, so build it first.
test: lint
	$(CARGO) build --workspace
	$(CARGO) test --workspace

# A local head and node on a free port in a throwaway session root: start,
# show the cluster, stop.
demo: build
	@root=$$(mktemp -d /tmp/shoal-demo.XXXXXX); \
	trap '$(SHOAL) stop --session-dir '"$$root"' >/dev/null; rm -rf '"$$root" EXIT; \
	$(SHOAL) start --head --port 0 --node-ip 127.0.0.1 --session-dir "$$root" && \
	$(SHOAL) start --address "$$(cat $$root/session_latest/head_address)" --num-cpus 2 --session-dir "$$root" && \
	$(SHOAL) status --session-dir "$$root" && \
	$(SHOAL) stop --session-dir "$$root"

clean:
	$(CARGO) clean
