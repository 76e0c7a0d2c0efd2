# Thin wrappers over cargo. `make demo` and `make test` are the two commands
# the README promises work on a fresh machine with the Rust toolchain (and,
# for make test's multi-host tests, a Docker engine: .ci/run starts one).

CARGO ?= cargo
export CARGO_BUILD_JOBS ?= 2
SHOAL := target/debug/shoal

.PHONY: build test lint fmt demo demo-cluster bench bench-wordcount chaos sim fuzz fuzz-smoke clean

build:
	$(CARGO) build --workspace

fmt:
	$(CARGO) fmt --all

# The last line checks the SDK without local mode (`--no-default-features`:
# no head or node daemon in its build).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p shoal --no-default-features --all-targets -- -D warnings

# The integration tests drive the built `shoal` binary, so build it first.
# Three tests at a time on two cores: most of a cluster test's time is spent
# waiting on processes (measured: the integration tests take 4 min 48 s this
# way, 5 min 37 s two at a time).
test: lint
	$(CARGO) build --workspace
	$(CARGO) test --workspace -- --test-threads=3
	$(MAKE) fuzz-smoke

# Fuzzing (SEC-3): the cargo-fuzz targets in fuzz/ (nightly and
# cargo-fuzz; .ci/run installs both): the frame decoder, every request and
# reply, both sides of the handshake and the cluster-file parser. `make
# fuzz` runs each for FUZZ_SECONDS (5 x 150 s: 12.5 minutes) from the
# committed seeds (fuzz/corpus/<target>) and what earlier runs found
# (fuzz/grown/<target>, not committed), under AddressSanitizer; a crash
# stops it, its input in fuzz/artifacts/<target>/ (replay it with `cargo
# +nightly fuzz run <target> <file>`). `make fuzz-smoke` runs each for 30 s
# from the seeds alone, two at a time (FUZZ_SMOKE_JOBS, a core each:
# 1 min 30 s for the five instead of 2 min 30 s; fuzz/smoke-one.sh),
# without a sanitizer and unoptimized (FUZZ_SMOKE_ARGS): on 2 cores the
# targets build in 1 min 7 s from scratch that way (2 min 43 s optimized,
# 4 min 8 s with AddressSanitizer), which a 30 s run does not win back; no
# code of ours is unsafe.
FUZZ_TARGETS := frame messages handshake_server handshake_client cluster_file
FUZZ_SECONDS ?= 150
FUZZ_ARGS ?=
FUZZ_SMOKE_ARGS ?= --sanitizer none --dev
FUZZ_SMOKE_JOBS ?= 2
FUZZ := $(CARGO) +nightly fuzz
FUZZ_FLAGS := -timeout=10 -print_final_stats=1
fuzz:
	$(FUZZ) build $(FUZZ_ARGS)
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/grown/$$t && \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s" && \
		$(FUZZ) run $(FUZZ_ARGS) $$t $(CURDIR)/fuzz/grown/$$t $(CURDIR)/fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) $(FUZZ_FLAGS) || exit 1; \
	done

fuzz-smoke:
	$(FUZZ) build $(FUZZ_SMOKE_ARGS)
	@printf '%s\n' $(FUZZ_TARGETS) | \
		FUZZ="$(FUZZ)" FUZZ_SMOKE_ARGS="$(FUZZ_SMOKE_ARGS)" FUZZ_FLAGS="$(FUZZ_FLAGS)" \
		xargs -P $(FUZZ_SMOKE_JOBS) -n 1 sh fuzz/smoke-one.sh 30

# The fault suites at full size (minutes; make test runs them as a short
# smoke): FT-1 (10 000 nested tasks while node daemons are killed), FT-2
# (numbered calls through restarting actors, checked for loss, duplicates
# and order), FT-3, FT-11 (a host cut off for 30 s), then FT-10 and FT-13.
# Each prints its seed; SHOAL_CHAOS_SEED=N replays one.
chaos: build
	SHOAL_CHAOS=full $(CARGO) test -p shoal-integration-tests --test chaos -- --test-threads=1 --nocapture
	$(CARGO) test -p shoal-integration-tests --test processes a_node_declared_dead -- --nocapture
	$(CARGO) test -p shoal-integration-tests --test faults -- --nocapture

# The deterministic cluster simulation (crates/sim): `make sim SEED=N` runs
# one seed and prints `seed N: trace <hash>, <k> events, invariants ok` (or
# the broken invariant and its step); `make sim SEEDS=N` runs seeds 0..N and
# lists the failing ones. SHOAL_SIM_TRACE=1 prints every event.
SEEDS ?= 200
sim:
	$(CARGO) build -p shoal-sim
	@if [ -n "$(SEED)" ]; then target/debug/shoal-sim --seed $(SEED); \
	else target/debug/shoal-sim --seeds $(SEEDS) --quiet; fi

# A real job in local mode (no cluster to set up): word count as MapReduce
# over a text generated on the spot, checked against a sequential count.
demo:
	$(CARGO) build -p shoal-examples --bin wordcount
	SHOAL_LOG=$${SHOAL_LOG:-warn} target/debug/wordcount

# The same job on a real cluster: a head and a node as daemons on a free
# port in a throwaway session root, then stopped.
demo-cluster: build
	@root=$$(mktemp -d /tmp/shoal-demo.XXXXXX); \
	trap '$(SHOAL) stop --session-dir '"$$root"' >/dev/null; rm -rf '"$$root" EXIT; \
	$(SHOAL) start --head --port 0 --node-ip 127.0.0.1 --session-dir "$$root" && \
	$(SHOAL) start --address "$$(cat $$root/session_latest/head_address)" --num-cpus 2 --session-dir "$$root" && \
	$(SHOAL) status --session-dir "$$root" && \
	SHOAL_ADDRESS="$$(cat $$root/session_latest/head_address)" SHOAL_SESSION_DIR="$$root" SHOAL_LOG=warn target/debug/wordcount && \
	$(SHOAL) stop --session-dir "$$root"

# Ray's microbenchmark metric set on a local cluster with worker processes
# (release build; about 4 minutes on 2 cores). BENCH_ARGS=--json for JSON;
# SHOAL_BENCH_FILTER=substring for a subset.
bench:
	$(CARGO) build --release -p shoal-cli
	target/release/shoal microbenchmark $(BENCH_ARGS)

# MapReduce word count over 1 GB of generated text (the same text as the
# Python scripts in bench/ count on Ray, Dask and multiprocessing): a
# sequential Rust loop, then Shoal in local mode with thread workers, with
# worker processes, and on three nodes of one machine (a head and two node
# daemons, 2 CPUs each). One JSON line per run. WORDCOUNT_MB=N for N MB.
WORDCOUNT_MB ?= 1000
WORDCOUNT := target/release/bench_wordcount --mb $(WORDCOUNT_MB) $(WORDCOUNT_ARGS)
bench-wordcount:
	$(CARGO) build --release -p shoal-cli -p shoal-examples --bin shoal --bin bench_wordcount
	SHOAL_LOG=warn $(WORDCOUNT)
	SHOAL_LOG=warn SHOAL_WORKER_PROCESSES=1 $(WORDCOUNT) --repeat 3
	@root=$$(mktemp -d /tmp/shoal-wordcount.XXXXXX); S=target/release/shoal; \
	trap '$$S stop --session-dir "$$root" >/dev/null; rm -rf "$$root"' EXIT; \
	$$S start --head --port 0 --node-ip 127.0.0.1 --num-cpus 2 --metrics-port 0 --dashboard-port 0 --session-dir "$$root" >/dev/null && \
	for i in 1 2; do $$S start --address "$$(cat $$root/session_latest/head_address)" --num-cpus 2 --node-ip 127.0.0.1 --metrics-port 0 --session-dir "$$root" >/dev/null || exit 1; done && \
	SHOAL_ADDRESS="$$(cat $$root/session_latest/head_address)" SHOAL_SESSION_DIR="$$root" SHOAL_LOG=warn $(WORDCOUNT) --repeat 3

clean:
	$(CARGO) clean
