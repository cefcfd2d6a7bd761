#!/usr/bin/env bash
# A single-node Garage S3 server on 127.0.0.1 for Sluice's S3 tests.
#
#   scripts/s3-server.sh start   # install Garage if missing, start it, create bucket + key
#   scripts/s3-server.sh env     # print the AWS_* exports for the tests
#   scripts/s3-server.sh stop    # stop it
#   scripts/s3-server.sh pause|resume   # SIGSTOP / SIGCONT the server (fault tests)
#
# State lives in $SLUICE_S3_DIR (default ~/.cache/sluice-garage). Ports:
# S3 $SLUICE_S3_PORT (default 3900), RPC +1, admin +3.
set -euo pipefail
DIR="${SLUICE_S3_DIR:-$HOME/.cache/sluice-garage}"
PORT="${SLUICE_S3_PORT:-3900}"
RPC_PORT=$((PORT + 1))
ADMIN_PORT=$((PORT + 3))
BUCKET="${SLUICE_S3_BUCKET:-sluice-test}"
KEY_NAME=sluice-test-key
GARAGE_VERSION=2.5.0
CONF="$DIR/garage.toml"

die() { echo "s3-server: $*" >&2; exit 1; }

garage_bin() {
  if command -v garage >/dev/null 2>&1; then command -v garage; return; fi
  if [ -x "$HOME/.cargo/bin/garage" ]; then echo "$HOME/.cargo/bin/garage"; return; fi
  echo "s3-server: Garage is missing; installing garage $GARAGE_VERSION with cargo (about 9 minutes on 2 cores)" >&2
  CARGO_TARGET_DIR="${GARAGE_BUILD_DIR:-$HOME/.cache/garage-build}" \
    cargo install --locked garage --version "$GARAGE_VERSION" >&2 || die "cargo install garage failed"
  echo "$HOME/.cargo/bin/garage"
}

g() { "$GARAGE" -c "$CONF" "$@"; }

running() { [ -f "$DIR/pid" ] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; }

start() {
  GARAGE="$(garage_bin)"
  mkdir -p "$DIR/meta" "$DIR/data"
  if running; then
    echo "s3-server: already running (pid $(cat "$DIR/pid"))" >&2
  else
    [ -f "$DIR/secret" ] || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$DIR/secret"
    cat > "$CONF" <<CONF
metadata_dir = "$DIR/meta"
data_dir = "$DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(cat "$DIR/secret")"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
CONF
    chmod 600 "$CONF"
    nohup "$GARAGE" -c "$CONF" server > "$DIR/server.log" 2>&1 &
    echo $! > "$DIR/pid"
  fi
  local ok=""
  for _ in $(seq 1 60); do
    if g status >/dev/null 2>&1; then ok=1; break; fi
    running || die "garage server exited; see $DIR/server.log: $(tail -5 "$DIR/server.log")"
    sleep 0.5
  done
  [ -n "$ok" ] || die "garage server did not answer within 30 s; see $DIR/server.log"
  # The layout is assigned once per data directory. After a restart the
  # server may answer before it has loaded its layout, so a marker file, not
  # `layout show`, says whether it was done.
  if [ ! -f "$DIR/layout-applied" ]; then
    if ! g layout show 2>/dev/null | grep -q "dc1"; then
      local node
      node="$(g node id -q 2>/dev/null | cut -d@ -f1)"
      [ -n "$node" ] || die "cannot read the node id"
      g layout assign -z dc1 -c 1G "$node" >/dev/null
      g layout apply --version 1 >/dev/null || g layout show 2>/dev/null | grep -q "dc1" \
        || die "cannot apply the cluster layout; see $DIR/server.log"
    fi
    touch "$DIR/layout-applied"
  fi
  # Wait until the S3 API serves requests (the layout is loaded).
  for _ in $(seq 1 60); do
    if g bucket list >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  g bucket info "$BUCKET" >/dev/null 2>&1 || g bucket create "$BUCKET" >/dev/null
  if [ ! -s "$DIR/env" ]; then
    local out id secret
    out="$(g key create "$KEY_NAME")"
    id="$(echo "$out" | grep -Eo 'GK[0-9a-f]+' | head -1)"
    secret="$(echo "$out" | grep -i 'secret' | grep -Eo '[0-9a-f]{64}' | head -1)"
    [ -n "$id" ] && [ -n "$secret" ] || die "cannot parse the key created by garage: $out"
    g bucket allow --read --write --owner "$BUCKET" --key "$id" >/dev/null
    umask 077
    cat > "$DIR/env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
export AWS_ACCESS_KEY_ID=$id
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=garage
export SLUICE_S3_BUCKET=$BUCKET
ENV
  fi
  echo "s3-server: Garage on http://127.0.0.1:$PORT, bucket $BUCKET (pid $(cat "$DIR/pid"))" >&2
}

stop() {
  if running; then
    local pid
    pid="$(cat "$DIR/pid")"
    kill "$pid"
    # Wait until it is gone, so that a following start can bind the ports.
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$DIR/pid"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) [ -s "$DIR/env" ] || die "not started: run scripts/s3-server.sh start"; cat "$DIR/env" ;;
  pause) running && kill -STOP "$(cat "$DIR/pid")" ;;
  resume) running && kill -CONT "$(cat "$DIR/pid")" ;;
  *) die "usage: scripts/s3-server.sh start|stop|env|pause|resume" ;;
esac
