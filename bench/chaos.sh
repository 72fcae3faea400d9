#!/usr/bin/env bash
# The chaos table: one `safelb serve` at its default settings in front of a pool of three
# backends (separate processes: crates/safelb-testkit/src/bin/chaos-backend.rs, 5 ms per answer),
# under steady mixed load (chaos-load: keep-alive GETs, POSTs with and without Idempotency-Key, a
# WebSocket echo session, an h2c client), one fault at a time: the load starts, the fault is
# injected and removed, the load stops, one row is printed. Columns: requests, failed, p99, max
# latency, avoidable failures (failed, replayable, before a usable response head, while two
# healthy backends existed: every fault here hits one backend only). The causes of failures are
# listed under the table.
#
# The third backend lives in a network namespace of its own, reached over a veth pair with
# loopback-range addresses (127.1.0.1 here, 127.1.0.2 there): `route_localnet=1` on both ends
# lets 127/8 cross a non-loopback interface, and a /32 route in each side's `local` table beats
# the `local 127.0.0.0/8 dev lo` route there (longest prefix wins inside a table), so only that
# one address leaves through the veth. Deleting the namespace deletes the pair and its routes.
# The network faults are applied there: tc netem delay and 5% loss where the kernel has netem
# (else the loss is an nft rule dropping one packet in 20 each way, and the delay row is
# skipped), TCP resets from an nft rule. Without `ip netns` (not root, no netns support) those
# rows say "skipped (reason)".
#
# Non-default settings, each because a fault is about it: an active health check at its defaults
# (`health = { path = "/healthz" }`: the flapping row is about health), and a short rollout
# (`canary_steps = [100]`, `step_bake = "1s"`, no shadow stage) so that 100 changes go through
# the whole pipeline (preflight, canary, promotion: a snapshot swap each) in minutes.
#
# Usage: bench/chaos.sh [--short]    (--short: a few seconds per fault, 3 swaps, for CI)
# Bounded: every loop has a count, every wait a limit; every process started here is stopped by
# its pid on exit, the namespace deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

short=0
[ "${1:-}" = "--short" ] && short=1
if [ $short = 1 ]; then
    secs=4; hold=2; swaps=3; profile=debug
    cargo build -q -p safelb -p safelb-testkit --bins
else
    secs=${CHAOS_SECONDS:-20}; hold=${CHAOS_HOLD:-8}; swaps=${CHAOS_SWAPS:-100}; profile=release
    cargo build -q --release -p safelb -p safelb-testkit --bins
fi
bin=$root/target/$profile
began=$(date +%s)

work=$(mktemp -d)
pids=()
ns=chaos$$
veth=chv$$
netns=0
cleanup() {
    for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ $netns = 1 ] && ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

LB=18480; ADMIN=18490
B1=127.0.0.1:18501; C1=127.0.0.1:18511
B2=127.0.0.1:18502; C2=127.0.0.1:18512
B3=127.0.0.1:18503; C3=127.0.0.1:18513

. "$root/bench/lib.sh"

# --- the namespace of the third backend ---------------------------------------------------------
skip_net="no network namespace"
if [ "$(id -u)" -ne 0 ]; then
    skip_net="needs root"
elif ip netns add "$ns" 2>/dev/null; then
    netns=1
    if ip link add "${veth}a" type veth peer name "${veth}b" netns "$ns" &&
        ip addr add 127.1.0.1/30 dev "${veth}a" && ip link set "${veth}a" up &&
        sysctl -qw "net.ipv4.conf.${veth}a.route_localnet=1" &&
        ip route add 127.1.0.2/32 dev "${veth}a" table local src 127.1.0.1 &&
        ip netns exec "$ns" sh -c "ip addr add 127.1.0.2/30 dev ${veth}b && ip link set ${veth}b up &&
            ip link set lo up && sysctl -qw net.ipv4.conf.${veth}b.route_localnet=1 &&
            ip route add 127.1.0.1/32 dev ${veth}b table local src 127.1.0.2"; then
        B3=127.1.0.2:18503; C3=127.1.0.2:18513; skip_net=""
    else
        skip_net="veth with loopback addresses refused"
    fi
fi

start_backend() { # $1 = index: sets pid_b$1
    local b c
    eval "b=\$B$1; c=\$C$1"
    if [ "$1" = 3 ] && [ -z "$skip_net" ]; then
        ip netns exec "$ns" "$bin/chaos-backend" "b$1" "$b" "$c" 5 >/dev/null 2>&1 &
    else
        "$bin/chaos-backend" "b$1" "$b" "$c" 5 >/dev/null 2>&1 &
    fi
    eval "pid_b$1=$!"
    pids+=($!)
    wait_port "${c#*:}" "${c%:*}"
}
ctl() { curl -s -m 2 -o /dev/null "http://$1/$2"; } # $1 = control address, $2 = command
for i in 1 2 3; do start_backend $i; done

# --- safelb ----------------------------------------------------------------------------------------
config() { # $1 = a harmless value that differs between versions, $2 = the pool's backends
    cat <<CFG
[listener.public]
bind = "127.0.0.1:$LB"
[admin]
bind = "127.0.0.1:$ADMIN"
[access_log]
path = "$work/access.log"
[rollout]
canary_steps = [100]
step_bake = "1s"
shadow = false
[[route]]
name = "all"
pool = "p"
response_headers = { set = { "X-Chaos-Version" = "$1" } }
[pool.p]
backends = [$2]
health = { path = "/healthz" }
CFG
}
pool="\"$B1\", \"$B2\", \"$B3\""
# A fresh safelb (and store) for every row, so that no row inherits the last one's ejections,
# backoffs or versions: each starts from the defaults.
lb=""; row=0
start_lb() {
    if [ -n "$lb" ]; then kill "$lb"; wait "$lb" 2>/dev/null || true; fi
    row=$((row + 1)); version=0
    config 0 "$pool" > "$work/lb.toml"
    "$bin/safelb" serve --config "$work/lb.toml" --store "$work/store$row" >"$work/safelb.out" 2>"$work/safelb.log" &
    lb=$!
    pids+=("$lb")
    wait_port $LB
}
apply() { # $1 = file, then extra arguments; prints the exit code
    local rc=0 file=$1
    shift
    "$bin/safelb" apply --admin "http://127.0.0.1:$ADMIN" --token-file "$work/store$row/admin.token" \
        -m chaos "$@" "$file" >>"$work/apply.log" 2>&1 || rc=$?
    echo $rc
}
# Waits (at most 30 s) until no rollout runs, so that the next change is not refused as busy.
settle() {
    for _ in $(seq 1 300); do
        curl -s -H "Authorization: Bearer $(cat "$work/store$row/admin.token")" "http://127.0.0.1:$ADMIN/api/v1/status" |
            grep -q '"rollout":null' && return 0
        sleep 0.1
    done
}

# --- the rows --------------------------------------------------------------------------------------
rows="$work/rows"; details="$work/details"
: > "$rows"; : > "$details"
load_start() { # $1 = seconds, then extra chaos-load arguments; sets load_pid
    for c in $C1 $C2 $C3; do ctl "$c" ok; done
    start_lb
    "$bin/chaos-load" --target 127.0.0.1:$LB --seconds "$1" "${@:2}" > "$work/load.out" 2>&1 &
    load_pid=$!
    pids+=("$load_pid")
    sleep 1
}
load_end() { # $1 = fault name, $2 = note
    wait "$load_pid" || true
    local summary
    summary=$(head -1 "$work/load.out")
    echo "$1|$summary|$2" >> "$rows"
    { echo "== $1"; tail -n +2 "$work/load.out"; } >> "$details"
}
skip_row() { echo "$1|skipped ($2)|" >> "$rows"; }
next_config() { version=$((version + 1)); config "$version" "$pool" > "$work/lb.toml"; }

load_start "$secs"; load_end "none (baseline)" ""

load_start "$secs"; sleep 1; kill -9 "$pid_b1"; wait "$pid_b1" 2>/dev/null || true; sleep "$hold"; start_backend 1
load_end "backend kill -9 (restarted after ${hold} s)" ""

load_start "$secs"; kill -STOP "$pid_b1"; sleep "$hold"; kill -CONT "$pid_b1"
load_end "backend SIGSTOP ${hold} s, SIGCONT" ""

load_start "$secs"; ctl $C1 status/503; sleep "$hold"; ctl $C1 ok
load_end "5xx storm from one backend (${hold} s)" ""

load_start "$secs"; ctl $C1 delay/100; sleep "$hold"; ctl $C1 ok
load_end "one backend 20x slower (100 ms, ${hold} s)" ""

load_start "$secs"; ctl $C1 flap/2000; sleep $((hold + 4)); ctl $C1 ok
load_end "health flapping every 2 s ($((hold + 4)) s)" ""

load_start 900
t0=$(date +%s); ok=0
for _ in $(seq 1 "$swaps"); do
    next_config
    [ "$(apply "$work/lb.toml")" = 0 ] && ok=$((ok + 1))
done
kill -TERM "$load_pid" 2>/dev/null || true
load_end "$swaps config changes promoted (apply)" "$ok promoted in $(($(date +%s) - t0)) s"

load_start "$secs"
config bad "\"127.0.0.1:18599\"" > "$work/bad.toml"
refused=$(apply "$work/bad.toml")
settle
forced=$(apply "$work/bad.toml" --skip-preflight)
load_end "bad change: pool at a dead port" "apply exit $refused; with --skip-preflight exit $forced"

load_start "$secs"; next_config
for _ in $(seq 1 10); do kill -HUP "$lb"; sleep 0.1; done
sleep 3; settle
load_end "10 SIGHUPs in a second" "$(grep -c 'configuration file submitted' "$work/safelb.out" "$work/safelb.log" | awk -F: '{s += $2} END {print s}') submitted"

load_start "$secs" --abort-clients
wait "$load_pid" || true
load_end "clients abort mid-body" "$(head -1 "$work/load.out" | sed 's/.*aborted=//') aborting clients"

load_start "$secs"; ctl $C1 close-mid-body; sleep "$hold"; ctl $C1 ok
load_end "backend closes mid-body (${hold} s)" ""

# tc netem where the kernel has it (CONFIG_NET_SCH_NETEM); loss and resets can also be made by
# nft rules inside the namespace, which need no netem.
netem=0
if [ -z "$skip_net" ] && tc qdisc add dev "${veth}a" root netem delay 1ms 2>/dev/null; then
    tc qdisc del dev "${veth}a" root; netem=1
fi
nft_ok=0
[ -z "$skip_net" ] && command -v nft >/dev/null 2>&1 && nft_ok=1
nft_rule() { # $1 = the rule's statement, applied to packets to and from b3's port
    ip netns exec "$ns" nft -f - <<NFT
table inet chaos {
    chain input { type filter hook input priority 0; tcp dport ${B3#*:} $1; }
    chain output { type filter hook output priority 0; tcp sport ${B3#*:} $1; }
}
NFT
}
netem_row() { # $1 = name, $2 = netem arguments, $3 = nft statement (without netem), or empty
    if [ -n "$skip_net" ]; then skip_row "$1" "$skip_net"; return; fi
    if [ $netem = 0 ] && { [ -z "$3" ] || [ $nft_ok = 0 ]; }; then
        skip_row "$1" "this kernel has no tc netem (CONFIG_NET_SCH_NETEM)"; return
    fi
    load_start "$secs"
    if [ $netem = 1 ]; then
        tc qdisc add dev "${veth}a" root netem $2
        ip netns exec "$ns" tc qdisc add dev "${veth}b" root netem $2
    else
        nft_rule "$3"
    fi
    sleep "$hold"
    if [ $netem = 1 ]; then
        tc qdisc del dev "${veth}a" root
        ip netns exec "$ns" tc qdisc del dev "${veth}b" root
    else
        ip netns exec "$ns" nft delete table inet chaos
    fi
    load_end "$1" "$([ $netem = 1 ] && echo "tc netem $2" || echo "nft: $3")"
}
netem_row "delay 50 ms each way to b3 (${hold} s)" "delay 50ms" ""
netem_row "5% packet loss each way to b3 (${hold} s)" "loss 5%" "numgen random mod 20 == 0 drop"
if [ -n "$skip_net" ]; then
    skip_row "TCP resets from b3" "$skip_net"
elif [ $nft_ok = 0 ]; then
    skip_row "TCP resets from b3" "nft not installed"
else
    load_start "$secs"
    # One packet in 20 toward the backend's port is answered with a reset instead.
    ip netns exec "$ns" nft -f - <<NFT
table inet chaos {
    chain input {
        type filter hook input priority 0;
        tcp dport ${B3#*:} numgen random mod 20 == 0 reject with tcp reset
    }
}
NFT
    sleep "$hold"
    ip netns exec "$ns" nft delete table inet chaos
    load_end "TCP resets, 5% of packets to b3 (${hold} s)" "nft reject with tcp reset"
fi

# --- the table -----------------------------------------------------------------------------------
echo
echo "chaos table ($([ $short = 1 ] && echo short || echo full) mode, ${secs} s of load per row, $profile build; $(($(date +%s) - began)) s)"
echo
echo "| fault | requests | failed | p99 ms | max ms | avoidable | note |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
while IFS='|' read -r name summary note; do
    case $summary in
        skipped*) echo "| $name | $summary | | | | | |"; continue ;;
    esac
    v() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$summary"; }
    echo "| $name | $(v requests) | $(v failed) | $(v p99_ms) | $(v max_ms) | $(v avoidable) | $note |"
done < "$rows"
echo
echo "failures by kind and cause:"
cat "$details"
