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

work=$(mktemp -d)
backend_pids=()
cleanup() {
    [ -n "${lb_pid:-}" ] && kill "$lb_pid" 2>/dev/null || true
    for p in "${backend_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Two backends in a process of their own (safelb's demo backends), so the proxy's one thread is measured alone.
cat > "$work/backends.toml" <<CFG
[listener.b]
bind = "127.0.0.1:18181"
[admin]
bind = "127.0.0.1:18199"
[access_log]
enabled = false
[[route]]
name = "r"
pool = "p"
[pool.p]
backends = ["127.0.0.1:18101", "127.0.0.1:18102"]
CFG
./target/release/safelb serve --config "$work/backends.toml" --store "$work/b-store" --demo-backends --threads 1 >/dev/null 2>&1 &
backend_pids+=($!)
sleep 1

config() { # $1 = access log table
    cat <<CFG
[listener.public]
bind = "127.0.0.1:18080"
[admin]
bind = "127.0.0.1:18090"
$1
[[route]]
name = "r"
pool = "p"
[pool.p]
balance = "round_robin"
backends = ["127.0.0.1:18101", "127.0.0.1:18102"]
CFG
}

run_round() { # $1 = label, $2 = access log table
    config "$2" > "$work/lb.toml"
    rm -rf "$work/store"
    ./target/release/safelb serve --config "$work/lb.toml" --store "$work/store" --threads 1 >/dev/null 2>&1 &
    lb_pid=$!
    for _ in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.1; done
    rps=$(wrk -t1 -c50 -d"${secs}s" http://127.0.0.1:18080/ | awk '/Requests\/sec/ {print $2}')
    kill "$lb_pid"; wait "$lb_pid" 2>/dev/null || true; lb_pid=""
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
median() { printf '%s\n' "${results[@]}" | awk -v k="$1" '$1 == k {print $2}' | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
off=$(median off)
on=$(median file)
printf 'access log off   median %10.0f req/s   rounds: %s\n' "$off" "$(printf '%s\n' "${results[@]}" | awk '$1=="off"{printf "%s ", $2}')"
printf 'access log file  median %10.0f req/s   rounds: %s\n' "$on" "$(printf '%s\n' "${results[@]}" | awk '$1=="file"{printf "%s ", $2}')"
awk -v a="$on" -v b="$off" 'BEGIN {printf "access log on / off = %.3f\n", a / b}'
