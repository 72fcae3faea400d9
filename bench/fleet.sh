#!/usr/bin/env bash
# Fleet mode at N instances (default 10) on this machine, one etcd member on loopback, the
# default rollout policy, light steady load on every instance (h2load, 50 req/s each):
#   - etcd writes per second at rest and during a rollout (the store's revision, which every
#     write moves by one);
#   - apply-to-all-serving: from `POST /apply` on one instance until every instance serves it;
#   - propagation: from a manual rollback (which moves `state/running` at once) until every
#     instance serves it.
# Bounded: every wait has a limit, every process started here is stopped by its pid on exit.
# Usage: bench/fleet.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
./scripts/install-test-deps >/dev/null
cargo build --release -q
bin=./target/release/safelb
# shellcheck source=bench/two-backends.sh
source bench/two-backends.sh
start_demo_backends "$bin"

etcd_url=http://127.0.0.1:18379
etcd --data-dir "$work/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls http://127.0.0.1:18380 --initial-advertise-peer-urls http://127.0.0.1:18380 \
    --initial-cluster default=http://127.0.0.1:18380 >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -s -o /dev/null "$etcd_url/health" && break; sleep 0.1; done

head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
fleet_config() { # $1 = extra lines of the route
    cat <<CFG
[listener.public]
bind = "127.0.0.1:18080"
[admin]
bind = "127.0.0.1:18090"
token_file = "$work/token"
[access_log]
enabled = false
[[route]]
name = "r"
pool = "p"
$1
[pool.p]
backends = ["127.0.0.1:18101", "127.0.0.1:18102"]
CFG
}
fleet_config "" > "$work/fleet.toml"
fleet_config 'request_headers = { set = { "X-Fleet" = "2" } }' > "$work/v2.toml"

for i in $(seq 1 "$n"); do
    "$bin" serve --config "$work/fleet.toml" --store "$work/s$i" --threads 1 \
        --etcd "$etcd_url" --cluster bench --instance "$(printf 'i%02d' "$i")" \
        --bind "public=127.0.0.1:$((18200 + i))" --admin-bind "127.0.0.1:$((18300 + i))" >"$work/log$i" 2>&1 &
    pids+=($!)
done

api() { # $1 = instance, $2 = path
    curl -s -H "Authorization: Bearer $(cat "$work/token")" "http://127.0.0.1:$((18300 + $1))/api/v1$2"
}
serving() { api "$1" /status | python3 -c 'import json,sys; print(json.load(sys.stdin)["running"]["id"])' 2>/dev/null || echo 0; }
revision() {
    curl -s -X POST "$etcd_url/v3/kv/range" -d '{"key":"AA=="}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])'
}
now() { date +%s.%N; }
# Waits (at most $2 seconds) until every instance serves version $1; prints the seconds taken.
until_all_serve() {
    local start; start=$(now)
    while :; do
        local all=1
        for i in $(seq 1 "$n"); do [ "$(serving "$i")" = "$1" ] || { all=0; break; }; done
        [ $all = 1 ] && break
        if (( $(echo "$(now) - $start > $2" | bc) )); then echo "timeout"; return; fi
        sleep 0.1
    done
    echo "$(now) - $start" | bc
}

# Every instance up and in etcd.
for _ in $(seq 1 300); do
    live=$(api 1 /status | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["fleet"]["instances"]))' 2>/dev/null || echo 0)
    [ "$live" = "$n" ] && break
    sleep 0.2
done
echo "instances up: $live of $n"

r0=$(revision); sleep 10; r1=$(revision)
rest=$(echo "scale=1; ($r1 - $r0) / 10" | bc)

for i in $(seq 1 "$n"); do
    h2load --h1 -c1 --rps 50 -D 600 "http://127.0.0.1:$((18200 + i))/" >/dev/null 2>&1 &
    pids+=($!)
done
sleep 2
r0=$(revision); t0=$(now)
version=$(curl -s -H "Authorization: Bearer $(cat "$work/token")" -H 'content-type: application/json' \
    -X POST "http://127.0.0.1:18301/api/v1/apply" \
    -d "$(python3 -c 'import json,sys; print(json.dumps({"source": open(sys.argv[1]).read(), "reason": "bench", "author": "bench"}))' "$work/v2.toml")" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
applied=$(until_all_serve "$version" 600)
t1=$(now); r1=$(revision)
during=$(echo "scale=1; ($r1 - $r0) / ($t1 - $t0)" | bc)

t0=$(now)
"$bin" rollback --admin http://127.0.0.1:18302 --token-file "$work/token" -m bench >/dev/null
back=$(api 2 /status | python3 -c 'import json,sys; print(json.load(sys.stdin)["running"]["id"])')
until_all_serve "$back" 60 >/dev/null
# From the rollback command until the last instance logged that it serves the new version (each
# instance's own clock and log line: polling ten admin APIs would add its own delay).
last=$(for i in $(seq 1 "$n"); do
    sed 's/\x1b\[[0-9;]*m//g' "$work/log$i" |
        awk -v v="version=$back" '/serving the fleet.s running version/ && $0 ~ (v "( |$)") {print $1}'
done | sort | tail -1)
propagated=$(echo "$(date -d "$last" +%s.%N) - $t0" | bc)

printf '\n| fleet of %s instances | value |\n| --- | --- |\n' "$n"
printf '| etcd writes/s at rest | %s |\n' "$rest"
printf '| etcd writes/s during the rollout | %s |\n' "$during"
printf '| apply to all serving (default rollout) | %s s |\n' "$applied"
printf '| rollback to all serving (state/running moved) | %s s |\n' "$propagated"
