#!/usr/bin/env bash
# A bounded run of every fuzz target from its seeds (fuzz/seeds/<target>/), as CI runs it:
# FUZZ_SECONDS each (default 15), one job, then a line of executions per target. Needs the
# nightly toolchain and cargo-fuzz; without nightly it says so and exits 0 (the property tests,
# crates/*/tests/properties.rs, check the same properties on stable). Built without a sanitizer
# (`-s none`, optimised) to stay within CI's few minutes: safelb forbids unsafe code; a long run
# under AddressSanitizer (cargo fuzz's default) also checks the dependencies' unsafe code. A
# crash fails the script and leaves its input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-15}
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz/smoke.sh: skipped, no nightly toolchain (the property tests cover the same properties)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz/smoke.sh: cargo-fuzz is missing: cargo install --locked cargo-fuzz" >&2
    exit 1
fi
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -s none -O
# The binaries are run directly: `cargo fuzz run` would check the build again for each target.
bin=target/$(rustup run nightly rustc -vV | awk '/^host:/ { print $2 }')/release
summary=()
mkdir -p artifacts
for target in $targets; do
    # The grown corpus is scratch: seeds are committed, what a run adds is not.
    corpus=$(mktemp -d)
    cp seeds/"$target"/* "$corpus"/ 2>/dev/null || true
    log=$(mktemp)
    if ! "$bin/$target" "$corpus" -max_total_time="$seconds" -max_len=65536 \
        -artifact_prefix=artifacts/"$target"- -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz/smoke.sh: target $target failed" >&2
        exit 1
    fi
    runs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$log")
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
    summary+=("$(printf '%-14s %10s runs in %ss, %s, corpus %s' "$target" "$runs" "$seconds" "$cov" "$(ls "$corpus" | wc -l)")")
    rm -rf "$corpus" "$log"
done
printf 'fuzz: %s\n' "${summary[@]}"
