#!/usr/bin/env bash
# Starts the whole local mesh in the foreground: cloud-hub (QUIC 127.0.0.1:4433, cloud broker 127.0.0.1:1883)
# and the edge agents line1 (127.0.0.1:1884) and line2 (127.0.0.1:1885), from configs/.
# Builds what it needs, creates development certificates in state/certs on first run and keeps them.
# Ctrl-C or SIGTERM stops everything; if one process dies, the others are stopped and the script fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release"
CERTS="state/certs"
STOP_DEADLINE=15 # seconds a process gets to shut down cleanly before SIGKILL

echo "==> building cloud-hub and edge-agent (release)"
cargo build --release -p cloud-hub -p edge-agent

mkdir -p state
if [[ ! -f "$CERTS/ca.pem" ]]; then
    echo "==> creating development CA and hub certificate in $CERTS"
    "$BIN/cloud-hub" pki init --dir "$CERTS"
fi
# The revocation list configs/hub.toml follows (state/ from before it existed has none yet).
"$BIN/cloud-hub" pki crl --dir "$CERTS" > /dev/null
for site in line1 line2; do
    if [[ ! -f "$CERTS/site-$site.pem" || ! -f "$CERTS/site-$site.key" ]]; then
        echo "==> issuing the certificate of site $site"
        "$BIN/cloud-hub" pki issue-site "$site" --dir "$CERTS"
    fi
done

if [[ ! -f "$CERTS/server-edge-line1.pem" || ! -f "$CERTS/server-edge-line1.key" ]]; then
    echo "==> issuing the TLS certificate of line1's MQTT port 8884 (localhost, 127.0.0.1)"
    "$BIN/cloud-hub" pki issue-server edge-line1 --dir "$CERTS" --name localhost --name 127.0.0.1
fi

declare -A PIDS=()

# Runs a program with its output prefixed by its name; records the program's own pid (not the prefixer's).
start() {
    local name="$1"
    shift
    "$@" > >(sed -u "s/^/[$name] /") 2>&1 &
    PIDS[$name]=$!
}

stopping=0
# Sends SIGTERM to the named processes and waits for them, up to STOP_DEADLINE, then SIGKILLs what is left.
stop_group() {
    local name pid
    for name in "$@"; do
        pid="${PIDS[$name]:-}"
        [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
    done
    local deadline=$((SECONDS + STOP_DEADLINE))
    for name in "$@"; do
        pid="${PIDS[$name]:-}"
        [[ -z "$pid" ]] && continue
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "==> $name did not stop within ${STOP_DEADLINE}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}

stopping=0
stop_all() {
    ((stopping)) && return 0
    stopping=1
    # Agents first, so they can hand their in-flight batches to the hub before it goes.
    stop_group line1 line2
    stop_group hub
}

on_signal() {
    # A second signal while stopping (Ctrl-C twice, or TERM from both a supervisor and its child) must not
    # cut the first stop short and leave processes behind.
    ((stopping)) && return 0
    echo
    echo "==> stopping the mesh"
    stop_all
    exit 0
}
trap on_signal INT TERM
trap stop_all EXIT

wait_port() {
    local name="$1" port="$2" deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
            echo "==> $name exited before it was ready" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "==> $name is not listening on 127.0.0.1:$port after 30s" >&2
            exit 1
        fi
        sleep 0.2
    done
}

echo "==> starting hub, line1, line2"
start hub "$BIN/cloud-hub" --config configs/hub.toml
wait_port hub 1883
start line1 "$BIN/edge-agent" --config configs/edge-line1.toml
start line2 "$BIN/edge-agent" --config configs/edge-line2.toml
wait_port line1 1884
wait_port line2 1885

cat <<'MSG'
==> the mesh is up. Try it in two other terminals:
      mosquitto_sub -p 1883 -t 'acme/#' -v
      mosquitto_pub -p 1884 -q 1 -t telemetry/robot5/temp -m 21.5
    The subscriber prints: acme/plant1/line1/telemetry/robot5/temp 21.5
    line1 also listens with TLS on 8884, where a user is required:
      mosquitto_pub -h localhost -p 8884 --cafile state/certs/ca.pem -u robot5 -P robot5-secret \
        -t telemetry/robot5/temp -m 1
    Ctrl-C stops everything.
MSG

# Any process ending (crash or not) ends the mesh: it is not usable with a part missing.
status=0
wait -n "${PIDS[hub]}" "${PIDS[line1]}" "${PIDS[line2]}" || status=$?
for name in hub line1 line2; do
    if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
        echo "==> $name exited (status $status); stopping the others" >&2
        break
    fi
done
stop_all
exit $((status == 0 ? 1 : status))
