#!/usr/bin/env bash
# What routing actions cost a proxied request, measured in one run on this machine: wrk through
# `safelb serve --threads 1` (access log off, two demo backends) with the route as it is, with
# header edits (two request fields set or removed, two response fields), with a rate limit high
# enough never to refuse (the check is paid, no request is limited), and with both. Rounds are
# interleaved so the machine's drift hits every case alike; the table shows medians and each
# case's ratio to the plain route.
# Usage: bench/actions.sh [seconds per round, default 5] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
rounds=${2:-3}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p safelb
source bench/two-backends.sh
start_demo_backends ./target/release/safelb

headers='request_headers = { set = { "X-Env" = "prod" }, remove = ["X-Debug"] }
response_headers = { set = { "Strict-Transport-Security" = "max-age=63072000" }, remove = ["Server"] }'
limit='rate_limit = { rate = "10000000/s", burst = 1000000, key = "client" }'

run_case() { # $1 = label, $2 = route lines; prints "label req/s p99"
    proxy_config "[access_log]
enabled = false" "" "$2" > "$work/lb.toml"
    start_proxy
    out=$(wrk -t1 -c50 -d"${secs}s" --latency http://127.0.0.1:18080/)
    stop_proxy
    echo "$1 $(awk '/Requests\/sec/ {print $2}' <<<"$out") $(wrk_p99_ms "$out")"
}

echo "== wrk -t1 -c50 -d${secs}s --latency through safelb --threads 1, $rounds interleaved rounds"
results=()
for r in $(seq 1 "$rounds"); do
    results+=("$(run_case plain "")")
    results+=("$(run_case headers "$headers")")
    results+=("$(run_case rate_limit "$limit")")
    results+=("$(run_case both "$headers
$limit")")
    echo "   round $r done"
done
base=$(median plain 2)
printf '\n%-11s %10s %9s %8s\n' case req/s "p99 ms" "/plain"
for k in plain headers rate_limit both; do
    rps=$(median "$k" 2)
    printf '%-11s %10.0f %9.2f %8.3f\n' "$k" "$rps" "$(median "$k" 3)" "$(awk -v a="$rps" -v b="$base" 'BEGIN {print a / b}')"
done
