#!/usr/bin/env bash
# Overhead of safelb's observability on throughput, measured in one run on this machine:
# 1. the cost of recording a request's metrics (micro-benchmark, ns per request);
# 2. wrk through `safelb serve --threads 1` with the access log off and on (to a file), rounds
#    interleaved so that the machine's drift hits both alike. Metrics are always recorded.
# Usage: bench/overhead.sh [seconds per round, default 5] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
rounds=${2:-3}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p safelb -p safelb-proxy --examples --bins
echo "== micro-benchmark"
cargo run --release -q -p safelb-proxy --example record_cost

source bench/two-backends.sh
start_demo_backends ./target/release/safelb

run_round() { # $1 = label, $2 = access log table
    proxy_config "$2" "" > "$work/lb.toml"
    start_proxy
    rps=$(wrk -t1 -c50 -d"${secs}s" http://127.0.0.1:18080/ | awk '/Requests\/sec/ {print $2}')
    stop_proxy
    echo "$1 $rps"
}

echo "== wrk -t1 -c50 -d${secs}s through safelb --threads 1, $rounds interleaved rounds"
results=()
for r in $(seq 1 "$rounds"); do
    results+=("$(run_round off "[access_log]
enabled = false")")
    results+=("$(run_round file "[access_log]
path = \"$work/access.log\"")")
done
off=$(median off 2)
on=$(median file 2)
printf 'access log off   median %10.0f req/s   rounds: %s\n' "$off" "$(printf '%s\n' "${results[@]}" | awk '$1=="off"{printf "%s ", $2}')"
printf 'access log file  median %10.0f req/s   rounds: %s\n' "$on" "$(printf '%s\n' "${results[@]}" | awk '$1=="file"{printf "%s ", $2}')"
awk -v a="$on" -v b="$off" 'BEGIN {printf "access log on / off = %.3f\n", a / b}'
