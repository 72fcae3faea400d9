#!/usr/bin/env bash
# safelb against nginx and HAProxy on this machine, in one run.
#
# Two backends (one nginx process, one worker, two ports) on loopback; each proxy configured for
# round robin over both with upstream keep-alive and ONE worker (safelb --threads 1, nginx
# worker_processes 1, haproxy nbthread 1), access logs off; plus a direct run to one backend as
# the limit. wrk rounds are interleaved (every proxy once per round) so the machine's drift hits
# all alike; the table shows medians. Cases: small body keep-alive, Connection: close, 64 KiB
# body, TLS keep-alive (`tls`) and a TLS handshake per request (`tlsnew`, Connection: close over
# https; no direct row: the backend is plain), and h2c (h2load) for every proxy. Also: RSS with N
# idle client connections (safelb vs nginx), and the snapshot build/swap micro-benchmark (5k
# routes, 1k backends).
#
# Usage: bench/compare.sh [--short]     (--short: a few seconds, for CI; numbers not meaningful)
# SAFELB_BEFORE=/path/to/an/older/safelb adds that binary as proxy `before`, measured in the same
# interleaved rounds, for the before/after of a change.
# BENCH_WORKERS=N gives every proxy N workers (safelb --threads N, nginx worker_processes N,
# haproxy nbthread N; the backend keeps one); BENCH_WRK_THREADS sets wrk's -t (default 1).
# BENCH_CASES picks what runs (default: all of `small close 64k tls tlsnew h2c memory swap`),
# e.g. BENCH_CASES="tls tlsnew" for a TLS change.
# BENCH_ACCESS_LOG=1 turns every proxy's access log on, each writing to a file: safelb its JSON
# lines (its default format), nginx `combined`, HAProxy `option httplog` on stdout (its only
# file-like target without a syslog daemon); the line counts, and the lines safelb dropped
# (safelb_access_log_dropped_total), are printed at the end.
# SAFELB_POOL_EXTRA adds lines to safelb's pool (e.g. SAFELB_POOL_EXTRA='hedge = false' to
# measure what hedging costs a healthy pool).
# Peers are installed with apt-get by bench/install-peers when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

short=0
[ "${1:-}" = "--short" ] && short=1
if [ $short = 1 ]; then
    secs=1; rounds=1; h2n=2000; idle=500
    cargo build -q -p safelb
    safelb=$root/target/debug/safelb
else
    secs=${BENCH_SECONDS:-8}; rounds=${BENCH_ROUNDS:-3}; h2n=${BENCH_H2_REQUESTS:-200000}; idle=${BENCH_IDLE:-10000}
    cargo build -q --release -p safelb -p safelb-proxy --bins --examples
    safelb=$root/target/release/safelb
fi
./bench/install-peers
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

workers=${BENCH_WORKERS:-1}
cases=" ${BENCH_CASES:-small close 64k tls tlsnew h2c memory swap} "
wants() { [[ "$cases" == *" $1 "* ]]; }
wrk_threads=${BENCH_WRK_THREADS:-1}
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work" "${logdir:-}"
}
trap cleanup EXIT
access_log=${BENCH_ACCESS_LOG:-0}
if [ "$access_log" = 1 ]; then
    # In memory: on this machine's disk, writeback of a few hundred MB of log throttled nginx's
    # worker (it writes each line itself) by half in a 3-round run, which measures the disk.
    logdir=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
    safelb_log="path = \"$logdir/safelb-access.log\""
    nginx_log="access_log $logdir/nginx-access.log combined;"
    haproxy_log="log stdout format raw local0"
    haproxy_httplog="log global
    option httplog"
else
    safelb_log="enabled = false"; nginx_log="access_log off;"; haproxy_log=""; haproxy_httplog=""
fi

B1=18101; B2=18102; P_SAFELB=18201; P_NGINX=18202; P_NGINX_H2=18212; P_HAPROXY=18203; P_BEFORE=18204
P_SAFELB_TLS=18221; P_BEFORE_TLS=18224; P_NGINX_TLS=18222; P_HAPROXY_TLS=18223; P_HAPROXY_H2=18213
ADMIN=18291; ADMIN_BEFORE=18292
proxies=(safelb nginx haproxy)
if [ -n "${SAFELB_BEFORE:-}" ]; then
    proxies=(safelb before nginx haproxy)
fi

. "$root/bench/lib.sh"

# --- backends: one nginx, one worker, two ports ---------------------------------------------
mkdir -p "$work/backend/logs"
head -c 65536 /dev/urandom > "$work/64k.bin"
# nginx's workers run as an unprivileged user: the file and its directory must be readable to
# them, or every /64k answer is a 403 page and the case measures nothing.
chmod 755 "$work"; chmod 644 "$work/64k.bin"
cat > "$work/backend/nginx.conf" <<CFG
worker_processes 1;
pid $work/backend/nginx.pid;
error_log $work/backend/logs/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 19000; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/backend/body;
    proxy_temp_path $work/backend/proxy;
    fastcgi_temp_path $work/backend/fastcgi;
    uwsgi_temp_path $work/backend/uwsgi;
    scgi_temp_path $work/backend/scgi;
    server {
        listen 127.0.0.1:$B1;
        listen 127.0.0.1:$B2;
        location = /64k { alias $work/64k.bin; }
        location / { return 200 "hello from a backend\n"; }
    }
}
CFG
nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' >/dev/null 2>&1 &
backend_pid=$!
pids+=($backend_pid)
wait_port $B1; wait_port $B2

# --- the proxies ------------------------------------------------------------------------------
# One self-signed ECDSA P-256 certificate for all three TLS listeners (each proxy's defaults for
# sessions and tickets otherwise).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench.example" \
    -addext "subjectAltName=DNS:bench.example,IP:127.0.0.1" -keyout "$work/site.key" -out "$work/site.pem" 2>/dev/null
cat "$work/site.pem" "$work/site.key" > "$work/site-haproxy.pem"
chmod 644 "$work/site.key" "$work/site.pem"
cat > "$work/safelb.toml" <<CFG
[listener.public]
bind = "127.0.0.1:$P_SAFELB"
[listener.tls]
bind = "127.0.0.1:$P_SAFELB_TLS"
tls = { cert = "$work/site.pem", key = "$work/site.key" }
[admin]
bind = "127.0.0.1:$ADMIN"
[access_log]
$safelb_log
[limits]
max_body_bytes = 104857600
[[route]]
name = "r"
pool = "p"
[pool.p]
balance = "round_robin"
backends = ["127.0.0.1:$B1", "127.0.0.1:$B2"]
${SAFELB_POOL_EXTRA:-}
CFG
sed -e "s/:$P_SAFELB\"/:$P_BEFORE\"/" -e "s/safelb-access.log/before-access.log/" -e "s/:$P_SAFELB_TLS\"/:$P_BEFORE_TLS\"/" -e "s/:$ADMIN\"/:$ADMIN_BEFORE\"/" "$work/safelb.toml" > "$work/before.toml"
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<CFG
worker_processes $workers;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 19000; }
http {
    $nginx_log
    keepalive_requests 1000000;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    upstream be {
        server 127.0.0.1:$B1;
        server 127.0.0.1:$B2;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$P_NGINX;
        listen 127.0.0.1:$P_NGINX_H2 http2;
        listen 127.0.0.1:$P_NGINX_TLS ssl;
        ssl_certificate $work/site.pem;
        ssl_certificate_key $work/site.key;
        # nginx before 1.23.4 leaves TLS 1.3 off by default; without this line its tlsnew
        # rows are TLS 1.2 session resumptions (no key exchange at all) against the TLS 1.3
        # handshakes of safelb and HAProxy, which run X25519 on every connection.
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CFG
cat > "$work/haproxy.cfg" <<CFG
global
    nbthread $workers
    maxconn 9000
    $haproxy_log
defaults
    mode http
    $haproxy_httplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:$P_HAPROXY
    default_backend be
frontend fe_h2c
    bind 127.0.0.1:$P_HAPROXY_H2 proto h2
    default_backend be
frontend fe_tls
    bind 127.0.0.1:$P_HAPROXY_TLS ssl crt $work/site-haproxy.pem
    default_backend be
backend be
    balance roundrobin
    server s1 127.0.0.1:$B1
    server s2 127.0.0.1:$B2
CFG

start_proxy() { # $1 = name; sets $pid
    case $1 in
        safelb)
            rm -rf "$work/store"
            "$safelb" serve --config "$work/safelb.toml" --store "$work/store" --threads "$workers" >/dev/null 2>"$work/safelb.log" &
            pid=$!; wait_port $P_SAFELB ;;
        before)
            rm -rf "$work/store-before"
            "$SAFELB_BEFORE" serve --config "$work/before.toml" --store "$work/store-before" --threads "$workers" >/dev/null 2>"$work/before.log" &
            pid=$!; wait_port $P_BEFORE ;;
        nginx)
            nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' >/dev/null 2>&1 &
            pid=$!; wait_port $P_NGINX ;;
        haproxy)
            haproxy -f "$work/haproxy.cfg" -db >>"${logdir:-$work}/haproxy-access.log" 2>/dev/null &
            pid=$!; wait_port $P_HAPROXY ;;
    esac
    pids+=("$pid")
}
port_of() { case $1 in safelb) echo $P_SAFELB ;; before) echo $P_BEFORE ;; nginx) echo $P_NGINX ;; haproxy) echo $P_HAPROXY ;; direct) echo $B1 ;; esac; }
h2port_of() { case $1 in safelb) echo $P_SAFELB ;; before) echo $P_BEFORE ;; nginx) echo $P_NGINX_H2 ;; haproxy) echo $P_HAPROXY_H2 ;; esac; }
tlsport_of() { case $1 in safelb) echo $P_SAFELB_TLS ;; before) echo $P_BEFORE_TLS ;; nginx) echo $P_NGINX_TLS ;; haproxy) echo $P_HAPROXY_TLS ;; esac; }
# CPU ticks (user + system) of a process and its children (nginx's workers).
cpu_ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo $total
}
hz=$(getconf CLK_TCK)

to_ms() { # wrk latency like 1.23ms, 456.00us, 1.02s
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'
}

results="$work/results"
: > "$results"
run_wrk() { # $1 case $2 proxy
    local port path="/" extra=() scheme=http
    port=$(port_of "$2")
    case $1 in
        close) extra=(-H "Connection: close") ;;
        64k) path="/64k" ;;
        # TLS keep-alive, and a TLS handshake for every request.
        tls) scheme=https; port=$(tlsport_of "$2") ;;
        tlsnew) scheme=https; port=$(tlsport_of "$2"); extra=(-H "Connection: close") ;;
    esac
    local out serving cpu0 cpu1
    if [ "$2" = direct ]; then serving=$backend_pid; else serving=$pid; fi
    cpu0=$(cpu_ticks "$serving")
    out=$(wrk -t"$wrk_threads" -c50 -d"${secs}s" --latency "${extra[@]}" "$scheme://127.0.0.1:$port$path" 2>&1)
    cpu1=$(cpu_ticks "$serving")
    # A number is only a number if every answer was a success.
    if grep -q "Non-2xx or 3xx responses" <<<"$out"; then
        echo "bench: $2 answered $1 requests with errors; the run is not valid:" >&2
        echo "$out" >&2
        exit 1
    fi
    local rps p50 p99 total cpu
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    # CPU of the process that served (the proxy; for `direct` the backend) per 1,000 requests.
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v a="$cpu0" -v b="$cpu1" -v n="${total:-0}" -v hz="$hz" 'BEGIN { if (n > 0) printf "%.1f", (b - a) * 1000 / hz / n * 1000; else print 0 }')
    echo "$1 $2 ${rps:-0} $p50 $p99 $cpu" >> "$results"
}
run_h2() { # $1 proxy
    local out rps mean
    out=$(h2load -n "$h2n" -c 50 -m 10 "http://127.0.0.1:$(h2port_of "$1")/" 2>&1)
    if ! grep -q "$h2n succeeded, 0 failed, 0 errored" <<<"$out" || ! grep -q "status codes: $h2n 2xx" <<<"$out"; then
        echo "bench: h2load through $1 saw failures; the run is not valid:" >&2
        echo "$out" >&2
        exit 1
    fi
    rps=$(awk '/^finished in/ {print $4}' <<<"$out")
    mean=$(awk '/^time for request:/ {print $6}' <<<"$out")
    echo "h2c $1 ${rps:-0} $(to_ms "${mean:-0ms}") - -" >> "$results"
}

echo "== $workers worker(s) per proxy; throughput: wrk -t$wrk_threads -c50 -d${secs}s --latency, $rounds interleaved round(s); h2load -n $h2n -c 50 -m 10"
[ "$access_log" = 1 ] && echo "== access logs on, to files"
for r in $(seq 1 "$rounds"); do
    for c in small close 64k; do
        wants $c && run_wrk "$c" direct
    done
    for p in "${proxies[@]}"; do
        start_proxy $p
        for c in small close 64k tls tlsnew; do
            wants $c && run_wrk "$c" "$p"
        done
        wants h2c && run_h2 "$p"
        # safelb drops access-log lines rather than slow a request: count them (its metric).
        if [ "$access_log" = 1 ] && [ "$p" = safelb ]; then
            curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '$1 == "safelb_access_log_dropped_total" {print $2}' >> "$work/dropped" || true
        fi
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
    echo "   round $r done"
done

# --- memory: RSS with idle client connections ----------------------------------------------------
rss_kb() { # sum of VmRSS of a pid and its children
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo $total
}
cat > "$work/idle.py" <<'PY'
import socket, sys, time
port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    socks.append(socket.create_connection(("127.0.0.1", port)))
print("open", len(socks), flush=True)
time.sleep(hold)
PY
memory="$work/memory"
: > "$memory"
for p in safelb nginx; do
    wants memory || break
    start_proxy $p
    sleep 0.3
    before=$(rss_kb "$pid")
    python3 "$work/idle.py" "$(port_of $p)" "$idle" 30 > "$work/idle.out" &
    client=$!
    for _ in $(seq 1 200); do grep -q open "$work/idle.out" 2>/dev/null && break; sleep 0.05; done
    sleep 0.5
    after=$(rss_kb "$pid")
    kill "$client" 2>/dev/null || true; wait "$client" 2>/dev/null || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$p $before $after" >> "$memory"
done

# --- report -------------------------------------------------------------------------------------------
median() { sort -n | awk '{a[NR] = $1} END { if (NR == 0) print 0; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
field() { awk -v c="$1" -v p="$2" -v f="$3" '$1 == c && $2 == p {print $f}' "$results" | median; }
echo
printf '%-8s %-8s %12s %9s %9s %14s\n' case proxy "req/s" "p50 ms" "p99 ms" "CPU ms/1k req"
for c in small close 64k tls tlsnew h2c; do
    wants $c || continue
    for p in direct "${proxies[@]}"; do
        n=$(awk -v c=$c -v p=$p '$1 == c && $2 == p' "$results" | wc -l)
        [ "$n" -eq 0 ] && continue
        p99=$(field $c $p 5); cpu=$(field $c $p 6)
        [ "$c" = h2c ] && { p99="-"; cpu="-"; }
        printf '%-8s %-8s %12.0f %9s %9s %14s\n' $c $p "$(field $c $p 3)" "$(field $c $p 4)" "$p99" "$cpu"
    done
done
echo
echo "ratios (safelb / other, req/s; above 1 is faster; vs direct: the share of the backend-alone ceiling):"
others=(nginx haproxy direct)
[ -n "${SAFELB_BEFORE:-}" ] && others+=(before)
for c in small close 64k tls tlsnew h2c; do
    wants $c || continue
    s=$(field $c safelb 3)
    line=$(printf '%-8s' $c)
    for p in "${others[@]}"; do
        v=$(field $c $p 3)
        if awk -v v="$v" 'BEGIN { exit !(v > 0) }'; then
            line="$line $(printf 'vs %-8s %5.2f  ' $p "$(awk -v a="$s" -v b="$v" 'BEGIN {print a / b}')")"
        fi
    done
    echo "  $line"
done
if [ "$access_log" = 1 ]; then
    echo "access-log lines written (every request of every case and round):"
    for f in safelb-access before-access nginx-access haproxy-access; do
        [ -f "$logdir/$f.log" ] && printf '  %-30s %10d\n' "$f.log" "$(wc -l < "$logdir/$f.log")"
    done
    printf '  %-30s %10d\n' "safelb lines dropped" "$(awk '{ n += $1 } END { print n + 0 }' "$work/dropped" 2>/dev/null || echo 0)"
fi
wants memory && echo && echo "memory: RSS with $idle idle client connections"
while read -r p before after; do
    printf '  %-8s before %8.1f MiB   with connections %8.1f MiB   (+%.1f KiB per connection)\n' "$p" \
        "$(awk -v k="$before" 'BEGIN {print k / 1024}')" "$(awk -v k="$after" 'BEGIN {print k / 1024}')" \
        "$(awk -v a="$after" -v b="$before" -v n="$idle" 'BEGIN {print (a - b) / n}')"
done < "$memory"
s_after=$(awk '$1 == "safelb" {print $3}' "$memory"); n_after=$(awk '$1 == "nginx" {print $3}' "$memory")
awk -v a="$s_after" -v b="$n_after" 'BEGIN { if (b > 0) printf "  safelb / nginx RSS = %.2f\n", a / b }'
wants swap || exit 0
echo
echo "snapshot build and swap (5k routes, 1k backends):"
if [ $short = 1 ]; then
    cargo run -q -p safelb-proxy --example snapshot_swap -- 500 100
else
    "$root/target/release/examples/snapshot_swap"
fi
