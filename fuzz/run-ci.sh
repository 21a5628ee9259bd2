#!/usr/bin/env bash
# CI's fuzz step: builds every cargo-fuzz target once, then runs each for a fixed
# number of inputs with a fixed seed (deterministic: the same inputs on every machine,
# about 15 s each here; HV_FUZZ_SECONDS, default 60, only caps a slow machine, which
# then runs a prefix of the same sequence) from a scratch copy of its seed corpus
# (fuzz/corpus/<target>/, checked in; what the fuzzer adds goes to the copy and is
# thrown away). Exits non-zero if any target crashes, panics, leaks, times out or
# runs out of memory, naming the target and the input that did it
# (fuzz/artifacts/<target>/). Installs nightly and cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${HV_FUZZ_SECONDS:-60}
# Inputs per target: about 15 s of each on the development machine.
runs_of() {
    case "$1" in
        config) echo 100000 ;;
        evtchn_op) echo 20000 ;;
        ring) echo 150000 ;;
        mmu_batch) echo 50000 ;;
        elf_loader) echo 500000 ;;
        *) echo 20000 ;;
    esac
}
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
    runs=$(runs_of "$t")
    echo "== fuzz: $t, $runs inputs from seed 1 (at most ${seconds}s; $(ls "$scratch/$t" | wc -l) seeds)"
    # -timeout: one input running 10 s is a hang; -rss_limit_mb: out of memory.
    if cargo +nightly fuzz run "${flags[@]}" "$t" "$scratch/$t" -- \
        -seed=1 -runs="$runs" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 \
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
echo "fuzz: $(echo $targets | wc -w) targets, no crash"
