# Sourced by the bench scripts that measure one `safelb serve --threads 1` in front of two demo
# backends on fixed loopback ports. Gives `$work` (removed on exit, after every pid in `pids` is
# stopped), `start_demo_backends SAFELB` (the backends in a safelb process of their own, so the
# proxy's one thread is measured alone) and `proxy_config TOP_TABLES POOL_LINES [ROUTE_LINES]` (the proxy on
# 127.0.0.1:18080, admin 18090, round robin over both backends).
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
