#!/usr/bin/env bash
# CI's fuzz step: builds every cargo-fuzz target once, then runs each for
# HV_FUZZ_SECONDS (default 20) seconds from a scratch copy of its seed corpus
# (fuzz/corpus/<target>/, checked in; what the fuzzer adds goes to the copy and is
# thrown away). Exits non-zero if any target crashes, panics, leaks, times out or
# runs out of memory, naming the target and the input that did it
# (fuzz/artifacts/<target>/). Installs nightly and cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${HV_FUZZ_SECONDS:-20}
# Debug assertions on: arithmetic overflow and hv's debug_assert!s are crashes too.
flags=(--debug-assertions)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! command -v cargo-fuzz > /dev/null; then
    echo "== fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=$(cargo +nightly fuzz list)
echo "== fuzz: building $(echo $targets)"
cargo +nightly fuzz build "${flags[@]}"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in $targets; do
    mkdir -p "$scratch/$t"
    if [ -d "corpus/$t" ]; then
        cp corpus/"$t"/* "$scratch/$t/"
    fi
    log="$scratch/$t.log"
    echo "== fuzz: $t for ${seconds}s ($(ls "$scratch/$t" | wc -l) seeds)"
    # -timeout: one input running 10 s is a hang; -rss_limit_mb: out of memory.
    if cargo +nightly fuzz run "${flags[@]}" "$t" "$scratch/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        > "$log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    else
        failed+=("$t")
        echo "FUZZ FAILURE: target $t"
        tail -n 60 "$log"
        grep -h 'Test unit written to' "$log" | sed "s|^|FUZZ FAILURE: $t: |" || true
        echo "reproduce: cd fuzz && cargo +nightly fuzz run --debug-assertions $t <artifact>"
    fi
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: $(echo $targets | wc -w) targets, ${seconds}s each, no crash"
