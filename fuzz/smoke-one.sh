#!/bin/sh
# One fuzz target for SECONDS from its committed seeds alone, for `make
# fuzz-smoke` (which runs two at a time, one per core): its output kept in
# fuzz/target/smoke/TARGET.log and printed whole if it fails; a summary
# line if not. Run from the repository's root; FUZZ, FUZZ_SMOKE_ARGS and
# FUZZ_FLAGS come from the Makefile.
# Usage: fuzz/smoke-one.sh SECONDS TARGET
set -u
seconds=$1
target=$2
dir=fuzz/target/smoke/$target
log=fuzz/target/smoke/$target.log
rm -rf "$dir" && mkdir -p "$dir" || exit 1
# shellcheck disable=SC2086 # FUZZ, FUZZ_SMOKE_ARGS and FUZZ_FLAGS are word lists.
if $FUZZ run $FUZZ_SMOKE_ARGS "$target" "$PWD/$dir" "$PWD/fuzz/corpus/$target" -- \
    -max_total_time="$seconds" $FUZZ_FLAGS >"$log" 2>&1; then
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$')
    echo "== fuzz-smoke $target: $seconds s, ${runs:-?} runs, no crash"
else
    cat "$log"
    echo "== fuzz-smoke $target FAILED: the input is in fuzz/artifacts/$target/"
    exit 1
fi
