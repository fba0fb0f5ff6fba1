#!/usr/bin/env bash
# Drain benchmark: the same backlog of scenario events through `augur run` without and
# with the Redis online-store mirror, in one run, against tansu on loopback.
# Prints one JSON line: events/s for each, their ratio, and the mirror's users/s.
# Usage: benches/mirror_drain.sh [EVENTS] [USERS]   (needs tansu and Redis on 6379)
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${1:-300000}"
USERS="${2:-100000}"
unset RUST_BACKTRACE
cargo build --release --quiet
AUGUR="$PWD/target/release/augur"
TANSU="$(command -v tansu || echo "$HOME/.cargo/bin/tansu")"
WORK="$(mktemp -d)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine memory://tansu/ >/dev/null 2>&1 &
TANSU_PID=$!
trap 'kill $TANSU_PID 2>/dev/null; rm -rf "$WORK"' EXIT
sleep 1
for t in events predictions dead-letter; do
    "$TANSU" topic create --broker "tcp://127.0.0.1:$PORT" --partitions 4 "$t" >/dev/null
done
"$AUGUR" gen --events "$EVENTS" --users "$USERS" --to-topic events --brokers "127.0.0.1:$PORT" >&2

# Runs the engine on the backlog; prints "seconds users_written".
drain() {
    local name="$1" store="$2" admin
    admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    sed -e "s#topic: user-events#topic: events#" -e "s#registry: ../models#registry: $PWD/models#" \
        -e "s#prefix: null##" -e "s#url: \"\"#url: \"$store\"\n  prefix: \"augur:bench-$name-$$:user:\"#" \
        topologies/ctr.yaml > "$WORK/$name.yaml"
    "$AUGUR" run --topology "$WORK/$name.yaml" --brokers "127.0.0.1:$PORT" --group "bench-$name-$$" \
        --instance-id "bench-$name" --state-dir "$WORK/state-$name" --admin-listen "127.0.0.1:$admin" 2>/dev/null &
    local pid=$! start="" now count=0
    while [ "$count" -lt "$EVENTS" ]; do
        sleep 0.05
        count=$(curl -s "http://127.0.0.1:$admin/metrics" | awk '/^augur_source_events_total/ {s+=$2} END {print s+0}')
        now=$(date +%s.%N)
        if [ -z "$start" ] && [ "$count" -gt 0 ]; then start=$now; fi
    done
    local done_at=$now written=0 pending=1 mirrored_at=$now
    if [ -n "$store" ]; then
        # The mirror trails the stream by up to a checkpoint; time until it has caught up.
        while [ "$pending" != "0" ] || [ "$written" -lt "$USERS_SEEN" ]; do
            sleep 0.05
            local metrics
            metrics=$(curl -s "http://127.0.0.1:$admin/metrics")
            pending=$(echo "$metrics" | awk '/^augur_online_store_pending_users/ {print $2+0}')
            written=$(echo "$metrics" | awk '/^augur_online_store_users_written_total/ {print $2+0}')
            mirrored_at=$(date +%s.%N)
        done
    fi
    kill -TERM $pid; wait $pid || true
    echo "$(python3 -c "print($done_at - $start, $mirrored_at - $start)") $written"
}
# Every generated user is written at least once (the generator touches all of them).
USERS_SEEN="$USERS"
read -r plain_s _ _ < <(drain plain "")
read -r mirror_s mirrored_s written < <(drain mirror "redis://127.0.0.1:6379")
python3 - "$EVENTS" "$plain_s" "$mirror_s" "$mirrored_s" "$written" <<'PY'
import json, os, sys
events = int(sys.argv[1])
plain, mirror, mirrored, written = (float(x) for x in sys.argv[2:6])
print(json.dumps({
    "events": events, "cores": os.cpu_count(),
    "without_mirror_events_per_s": round(events / plain), "with_mirror_events_per_s": round(events / mirror),
    "with_over_without": round(plain / mirror, 3), "mirror_users_written": int(written),
    "mirror_caught_up_after_s": round(mirrored, 2), "mirror_users_per_s": round(written / mirrored),
}))
PY
