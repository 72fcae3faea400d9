#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (deterministic where wrk is noisy):
# `safelb serve --threads 1` under valgrind, two demo backends in a process of their own,
# wrk -t1 -c10 -d10s, instructions of every thread counted during wrk's run over its requests
# (instrumentation is switched on once the proxy answers: start-up, whose one-time entropy
# gathering for the TLS library's random generator alone is about 420M instructions under
# valgrind, is left out; the once-a-second control work is in, which moves the figure by a few
# hundred between runs).
# Usage: bench/callgrind.sh ['POOL LINES' ['ROUTE LINES']]   e.g. bench/callgrind.sh 'hedge = false'
# SAFELB_BIN=PATH profiles another build (e.g. an older one, for a before/after).
# CALLGRIND_CASE=tls measures HTTPS keep-alive requests instead, CALLGRIND_CASE=tlsnew HTTPS with
# `Connection: close` (a TLS handshake each; ECDSA P-256 certificate, wrk resumes sessions); the
# default case is `small` (plain HTTP keep-alive); CALLGRIND_CASE=close: plain HTTP with
# `Connection: close` (a new client connection each); CALLGRIND_CASE=64k: a 64 KiB body each;
# CALLGRIND_CASE=h2c: h2load -n 20000 -c 50 -m 10 over
# cleartext HTTP/2 (prior knowledge), as compare.sh's h2c case. Under valgrind, the crypto library may pick
# other code than on the bare CPU (no SHA or ADX extensions): compare builds, not TLS libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build -q --release -p safelb
safelb=${SAFELB_BIN:-./target/release/safelb}
source bench/two-backends.sh
start_demo_backends "$safelb"
case=${CALLGRIND_CASE:-small}
# CALLGRIND_ACCESS_LOG=1 writes the access log (to a file) instead of turning it off.
if [ "${CALLGRIND_ACCESS_LOG:-0}" = 1 ]; then
    top="[access_log]
path = \"$work/access.log\""
else
    top="[access_log]
enabled = false"
fi
url=http://127.0.0.1:18080/
wrk_extra=()
if [ "$case" = tls ] || [ "$case" = tlsnew ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench.example" \
        -addext "subjectAltName=DNS:bench.example,IP:127.0.0.1" -keyout "$work/site.key" -out "$work/site.pem" 2>/dev/null
    top="$top
[listener.tls]
bind = \"127.0.0.1:18443\"
tls = { cert = \"$work/site.pem\", key = \"$work/site.key\" }"
    url=https://127.0.0.1:18443/
    [ "$case" = tlsnew ] && wrk_extra=(-H "Connection: close")
fi
[ "$case" = close ] && wrk_extra=(-H "Connection: close")
# The 64 KiB body comes from the demo backends' /bytes/65536.
[ "$case" = 64k ] && url=http://127.0.0.1:18080/bytes/65536
proxy_config "$top" "${1:-}" "${2:-}" > "$work/lb.toml"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" "$safelb" serve --config "$work/lb.toml" --store "$work/store" --threads 1 >/dev/null 2>"$work/vg.log" &
lb=$!
pids+=("$lb")
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.2; done
callgrind_control -i on "$lb" >/dev/null 2>&1
if [ "$case" = h2c ]; then
    command -v h2load >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }
    n=20000
    out=$(h2load -n "$n" -c 50 -m 10 "$url")
    grep -q "$n succeeded, 0 failed, 0 errored" <<<"$out" || { echo "callgrind: h2load saw failures:" >&2; echo "$out" >&2; exit 1; }
else
    out=$(wrk -t1 -c10 -d10s "${wrk_extra[@]}" "$url")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
fi
kill -TERM "$lb"; wait "$lb" 2>/dev/null || true
total=$(callgrind_annotate "$work/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
# CALLGRIND_OUT=FILE keeps the profile (for callgrind_annotate --inclusive=yes FILE).
[ -n "${CALLGRIND_OUT:-}" ] && cp "$work/cg.out" "$CALLGRIND_OUT"
echo "case: $case  pool lines: '${1:-}'  route lines: '${2:-}'  requests: $n  instructions: $total  per request: $((total / n))"
