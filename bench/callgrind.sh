#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (deterministic where wrk is noisy):
# `safelb serve --threads 1` under valgrind, two demo backends in a process of their own,
# wrk -t1 -c10 -d10s, total instructions over requests (start-up and the once-a-second control
# work are included, which moves the figure by a few hundred between runs).
# Usage: bench/callgrind.sh ['POOL LINES']   e.g. bench/callgrind.sh 'hedge = false'
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build -q --release -p safelb
safelb=${SAFELB_BIN:-./target/release/safelb}
w=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$w"
}
trap cleanup EXIT
cat > "$w/backends.toml" <<CFG
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
"$safelb" serve --config "$w/backends.toml" --store "$w/b-store" --demo-backends --threads 1 >/dev/null 2>&1 &
pids+=($!)
sleep 1
cat > "$w/lb.toml" <<CFG
[listener.public]
bind = "127.0.0.1:18080"
[admin]
bind = "127.0.0.1:18090"
[access_log]
enabled = false
[[route]]
name = "r"
pool = "p"
[pool.p]
balance = "round_robin"
backends = ["127.0.0.1:18101", "127.0.0.1:18102"]
${1:-}
CFG
valgrind --tool=callgrind --callgrind-out-file="$w/cg.out" "$safelb" serve --config "$w/lb.toml" --store "$w/store" --threads 1 >/dev/null 2>"$w/vg.log" &
lb=$!
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.2; done
out=$(wrk -t1 -c10 -d10s http://127.0.0.1:18080/)
n=$(awk '/requests in/ {print $1}' <<<"$out")
kill -TERM "$lb"; wait "$lb" 2>/dev/null || true
total=$(callgrind_annotate "$w/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "pool lines: '${1:-}'  requests: $n  instructions: $total  per request: $((total / n))"
