#!/usr/bin/env bash
# Soak: safelb at its defaults under moderate steady load for a long time, with a config change
# every minute through the whole pipeline (preflight, shadow, canary, bake, promote). Every 10 s
# it samples safelb's resident memory, open file descriptors, threads, and live tasks on each
# runtime (safelb_runtime_tasks); it prints one row a minute and, at the end, the first and last
# five minutes side by side. A leak shows as a column that only grows.
#
# Usage: bench/soak.sh [MINUTES] [RATE]   (default 30 minutes at 500 requests/s; not run in CI)
# Load: h2load over HTTP/1.1, 10 keep-alive clients, rate-limited. Backends: one nginx, two ports.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
minutes=${1:-30}
rate=${2:-500}
clients=10
cargo build -q --release -p safelb
safelb=$root/target/release/safelb
./bench/install-peers
command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

B1=18401; B2=18402; PORT=18411; ADMIN=18491
. "$root/bench/lib.sh"

mkdir -p "$work/backend/logs"
cat > "$work/backend/nginx.conf" <<CFG
worker_processes 1;
pid $work/backend/nginx.pid;
error_log $work/backend/logs/error.log warn;
events { worker_connections 4096; }
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
        location / { return 200 "hello from a backend\n"; }
    }
}
CFG
nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' >/dev/null 2>&1 &
pids+=($!)
wait_port $B1 127.0.0.1 200; wait_port $B2 127.0.0.1 200

# The config at change N: only a response header differs, so every change is promoted.
config() {
    cat <<CFG
[listener.public]
bind = "127.0.0.1:$PORT"
[admin]
bind = "127.0.0.1:$ADMIN"
[[route]]
name = "r"
pool = "p"
response_headers = { set = { "X-Soak-Change" = "$1" } }
[pool.p]
backends = ["127.0.0.1:$B1", "127.0.0.1:$B2"]
CFG
}
config 0 > "$work/safelb.toml"
# Access log on, as by default, to a file on the same disk.
(cd "$work" && exec "$safelb" serve --config safelb.toml --store store >"$work/access.log" 2>"$work/serve.log") &
lb=$!
pids+=($lb)
wait_port $PORT 127.0.0.1 200; wait_port $ADMIN 127.0.0.1 200
export SAFELB_ADMIN="http://127.0.0.1:$ADMIN" SAFELB_TOKEN_FILE="$work/store/admin.token"

total=$((minutes * 60))
per_client=$((rate / clients))
h2load --h1 -c $clients --rps "$per_client" -D "$total" "http://127.0.0.1:$PORT/" >"$work/h2load.txt" 2>&1 &
load=$!
pids+=($load)

metric() {
    curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v want="$1" '$1 == want { print $2 }'
}
sample() {
    local rss fds threads
    rss=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$lb/status")
    threads=$(awk '/^Threads:/ { print $2 }' "/proc/$lb/status")
    fds=$(find "/proc/$lb/fd" -mindepth 1 -maxdepth 1 | wc -l)
    printf '%s %s %s %s %s %s\n' "$1" "$rss" "$fds" "$threads" \
        "$(metric 'safelb_runtime_tasks{runtime="data"}')" "$(metric 'safelb_runtime_tasks{runtime="control"}')"
}

: > "$work/samples"
changes=0; promoted=0; change_pid=
started=$(date +%s)
printf '%-6s %8s %5s %8s %11s %14s %8s\n' minute rss_mb fds threads tasks_data tasks_control promoted
for ((t = 0; t <= total; t += 10)); do
    now=$(( $(date +%s) - started ))
    [ "$now" -lt "$t" ] && sleep $((t - now))
    sample "$t" >> "$work/samples"
    if [ $((t % 60)) = 0 ] && [ "$t" -lt "$total" ]; then
        # The previous change must be done; one change at a time, as apply enforces.
        if [ -n "$change_pid" ]; then
            if wait "$change_pid"; then promoted=$((promoted + 1)); fi
        fi
        changes=$((changes + 1))
        config "$changes" > "$work/change.toml"
        "$safelb" apply "$work/change.toml" -m "soak change $changes" >>"$work/apply.log" 2>&1 &
        change_pid=$!
        row=$(tail -1 "$work/samples")
        read -r _ rss fds threads td tc <<<"$row"
        printf '%-6s %8s %5s %8s %11s %14s %8s\n' $((t / 60)) "$rss" "$fds" "$threads" "$td" "$tc" "$promoted"
    fi
done
if [ -n "$change_pid" ] && wait "$change_pid"; then promoted=$((promoted + 1)); fi
wait "$load" || true

echo
echo "changes: $changes submitted, $promoted promoted"
grep -E "requests:|status codes:" "$work/h2load.txt" | sed 's/^/load: /'
# First five minutes against the last five: mean of each column.
awk -v last=$((total - 300)) '
    $1 < 300 { n1++; for (i = 2; i <= 6; i++) a[i] += $i }
    $1 >= last { n2++; for (i = 2; i <= 6; i++) b[i] += $i }
    END {
        split("rss_mb fds threads tasks_data tasks_control", name, " ")
        printf "%-14s %12s %12s %8s\n", "", "first 5 min", "last 5 min", "change"
        for (i = 2; i <= 6; i++) {
            x = a[i] / n1; y = b[i] / n2
            printf "%-14s %12.1f %12.1f %7.1f%%\n", name[i-1], x, y, (x > 0 ? (y - x) * 100 / x : 0)
        }
    }' "$work/samples"
