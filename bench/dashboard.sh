#!/usr/bin/env bash
# What a connected dashboard costs the data plane: wrk through `safelb serve --threads 1` (access
# log off, two demo backends) with no browser, and with headless Chromium signed in to the
# dashboard for the whole round (the live stream, a stats frame a second, the pools page with its
# sparklines). Rounds are interleaved; the table shows medians and the ratio.
# Usage: bench/dashboard.sh [seconds per round, default 8] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-3}
./scripts/install-test-deps >/dev/null
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p safelb
source bench/two-backends.sh
start_demo_backends ./target/release/safelb

run_case() { # $1 = label (none | browser); prints "label req/s p99"
    proxy_config "[access_log]
enabled = false" "" "" > "$work/lb.toml"
    start_proxy
    browser_pid=
    if [ "$1" = browser ]; then
        SAFELB_ADMIN=http://127.0.0.1:18090 SAFELB_TOKEN="$(cat "$work/store/admin.token")" \
            OPEN_SECONDS=$((secs + 4)) node tests/browser/watch.mjs &
        browser_pid=$!
        sleep 3   # signed in and streaming before the load starts
    fi
    cpu0=$(awk '{print $14 + $15}' "/proc/$lb_pid/stat")
    out=$(wrk -t1 -c50 -d"${secs}s" --latency http://127.0.0.1:18080/)
    cpu1=$(awk '{print $14 + $15}' "/proc/$lb_pid/stat")
    [ -n "$browser_pid" ] && wait "$browser_pid" 2>/dev/null || true
    stop_proxy
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99=$(wrk_p99_ms "$out")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    # safelb's own CPU (all its threads, the control plane's included) per 1,000 requests.
    cpu=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) * 1000 / hz / n * 1000}')
    echo "$1 $rps $p99 $cpu"
}

echo "== wrk -t1 -c50 -d${secs}s --latency through safelb --threads 1, $rounds interleaved rounds"
results=()
for r in $(seq 1 "$rounds"); do
    results+=("$(run_case none)")
    results+=("$(run_case browser)")
    echo "   round $r done"
done
base=$(median none 2)
printf '\n%-9s %10s %9s %8s %20s\n' case req/s "p99 ms" "/none" "safelb CPU ms/1k req"
for k in none browser; do
    rps=$(median "$k" 2)
    printf '%-9s %10.0f %9.2f %8.3f %20.2f\n' "$k" "$rps" "$(median "$k" 3)" "$(awk -v a="$rps" -v b="$base" 'BEGIN {print a / b}')" "$(median "$k" 4)"
done
echo "(Chromium runs on the same machine: req/s and p99 include its CPU; safelb's CPU per request does not.)"
