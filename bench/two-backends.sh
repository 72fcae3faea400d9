# Sourced by the bench scripts that measure one `safelb serve --threads 1` in front of two demo
# backends on fixed loopback ports. Gives `$work` (removed on exit, after every pid in `pids` is
# stopped), `start_demo_backends SAFELB` (the backends in a safelb process of their own, so the
# proxy's one thread is measured alone) and `proxy_config TOP_TABLES POOL_LINES [ROUTE_LINES]` (the proxy on
# 127.0.0.1:18080, admin 18090, round robin over both backends). `start_proxy` / `stop_proxy` run
# `safelb serve --threads 1` on `$work/lb.toml` (its pid in `lb_pid`); `wrk_p99_ms` reads the p99
# of `wrk --latency` output in milliseconds; `median LABEL COLUMN` is the median of a column over
# the `results` lines whose first word is LABEL.
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_demo_backends() { # $1 = safelb binary
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
${3:-}
[pool.p]
backends = ["127.0.0.1:18101", "127.0.0.1:18102"]
CFG
    "$1" serve --config "$work/backends.toml" --store "$work/b-store" --demo-backends --threads 1 >/dev/null 2>&1 &
    pids+=($!)
    sleep 1
}

proxy_config() { # $1 = top-level tables, $2 = lines of [pool.p]
    cat <<CFG
[listener.public]
bind = "127.0.0.1:18080"
[admin]
bind = "127.0.0.1:18090"
$1
[[route]]
name = "r"
pool = "p"
${3:-}
[pool.p]
balance = "round_robin"
backends = ["127.0.0.1:18101", "127.0.0.1:18102"]
$2
CFG
}

start_proxy() {
    rm -rf "$work/store"
    ./target/release/safelb serve --config "$work/lb.toml" --store "$work/store" --threads 1 >/dev/null 2>&1 &
    lb_pid=$!
    pids+=("$lb_pid")
    for _ in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.1; done
}

stop_proxy() {
    kill "$lb_pid"; wait "$lb_pid" 2>/dev/null || true
}

wrk_p99_ms() { # $1 = wrk --latency output
    awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}' <<<"$1"
}

median() { # $1 = label, $2 = column
    printf '%s\n' "${results[@]}" | awk -v k="$1" -v c="$2" '$1 == k {print $c}' | sort -n |
        awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'
}
