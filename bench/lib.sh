# Helpers the bench scripts share; sourced, not run.

# wait_port PORT [HOST] [TRIES]: waits (TRIES x 50 ms, default 100) until HOST (default
# 127.0.0.1) accepts connections on PORT; fails with a message if it never does.
wait_port() {
    local port=$1 host=${2:-127.0.0.1} tries=${3:-100}
    for _ in $(seq 1 "$tries"); do
        (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "$host:$port did not open" >&2
    return 1
}
