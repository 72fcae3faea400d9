#!/usr/bin/env bash
# The io_uring experiment (issue 15): the same minimal HTTP/1.1 keep-alive relay on tokio's epoll
# reactor (safelb's I/O) and on io_uring (tokio-uring), each one thread, in front of one demo
# backend; wrk -t1 -c50 rounds interleaved; req/s and CPU per 1,000 requests (user + system
# time of the relay process). It answers one question: how much of a small proxied request's
# cost the I/O interface itself decides on this kernel. safelb (`serve --threads 1`, access log
# off, the two demo backends) runs in the same rounds: the minimal epoll relay is the floor its
# own work per request sits on. The relay is bench/uring/ (a crate of its own, outside safelb's
# workspace: safelb's build never needs tokio-uring).
# Usage: bench/uring.sh     (BENCH_SECONDS, BENCH_ROUNDS as compare.sh; BENCH_CONNECTIONS: wrk -c)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${BENCH_SECONDS:-5}; rounds=${BENCH_ROUNDS:-3}; conns=${BENCH_CONNECTIONS:-50}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build -q --release -p safelb
(cd bench/uring && cargo build -q --release)
relay=bench/uring/target/release/uring-relay
source bench/two-backends.sh
start_demo_backends ./target/release/safelb
backend=127.0.0.1:18101
declare -A port=([epoll]=18301 [uring]=18302 [safelb]=18080)
declare -A pid
for mode in epoll uring; do
    "$relay" "$mode" "127.0.0.1:${port[$mode]}" "$backend" &
    pid[$mode]=$!
    pids+=("${pid[$mode]}")
done
proxy_config "[access_log]
enabled = false" "" > "$work/lb.toml"
start_proxy
pid[safelb]=$lb_pid
sleep 0.5
for mode in epoll uring safelb; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${port[$mode]}/")
    [ "$code" = 200 ] || { echo "uring.sh: the $mode relay answered $code, not 200" >&2; exit 1; }
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results="$work/results"
for r in $(seq 1 "$rounds"); do
    for mode in epoll uring safelb; do
        before=$(cpu_ticks "${pid[$mode]}")
        out=$(wrk -t1 -c"$conns" -d"${secs}s" "http://127.0.0.1:${port[$mode]}/")
        after=$(cpu_ticks "${pid[$mode]}")
        n=$(awk '/requests in/ {print $1}' <<<"$out")
        errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
        [ -z "$errors" ] || echo "   $mode round $r: $errors"
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        hz=$(getconf CLK_TCK)
        echo "$mode $rps $(awk -v t=$((after - before)) -v hz="$hz" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1000 * 1000 / n}')" >> "$results"
    done
    echo "   round $r done"
done
median() { sort -n | awk '{a[NR] = $1} END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
printf '%-8s %10s %14s\n' relay "req/s" "CPU ms/1k req"
for mode in epoll uring safelb; do
    printf '%-8s %10s %14s\n' "$mode" "$(awk -v m=$mode '$1 == m {print $2}' "$results" | median)" \
        "$(awk -v m=$mode '$1 == m {print $3}' "$results" | median)"
done
e=$(awk '$1 == "epoll" {print $2}' "$results" | median); u=$(awk '$1 == "uring" {print $2}' "$results" | median)
s=$(awk '$1 == "safelb" {print $2}' "$results" | median)
awk -v e="$e" -v u="$u" -v s="$s" 'BEGIN {printf "uring / epoll req/s: %.2f   safelb / epoll relay req/s: %.2f\n", u / e, s / e}'
