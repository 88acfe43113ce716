#!/usr/bin/env bash
# Load test on loopback: the demo stack (identity stand-in, Mosaic stand-in, proxy) with
# short-lived tokens, driven by wrk. Every answer that is not a 200 carrying data counts as
# a failure. Bounded: DURATION (default 30s), then everything stops.
#
#   benches/load.sh                    # 30 s, 2-second tokens, 64 connections
#   DURATION=2m LIFETIME=2s CONNECTIONS=128 benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30s}
LIFETIME=${LIFETIME:-2s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}

if ! command -v wrk >/dev/null; then
  echo "wrk is needed: apt-get install wrk" >&2
  exit 1
fi
cargo build --release --locked --quiet

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RUST_LOG=${RUST_LOG:-warn} target/release/mosaic-auth-proxy demo \
  --listen "127.0.0.1:$port" --token-lifetime "$LIFETIME" >/dev/null &
demo=$!
trap 'kill "$demo" 2>/dev/null; wait "$demo" 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/whoami" >/dev/null 2>&1; then break; fi
  sleep 0.1
done

wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
  -s benches/wrk-check.lua "http://127.0.0.1:$port/whoami"
