# Sourced by compare.sh and instructions.sh: the proxy, ports, the upstream and the token on
# loopback. LOAD_CPU pins the upstream and the identity stand-in if set.

# begin NAME: BIN (the proxy: as given, or a release build of this tree), WORK (a directory
# of the run's own, removed at exit unless KEEP is set) and PIDS (killed at exit).
begin() {
  if [[ -z ${BIN:-} ]]; then
    cargo build --release --locked --quiet
    BIN=$PWD/target/release/mosaic-auth-proxy
  fi
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  PIDS=()
  trap end EXIT
}
end() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n ${KEEP:-} ]] || rm -rf "$WORK"
}

# A port free together with the one above it (nginx and haproxy take both), below the
# ephemeral range, so that the churn scenario's client sockets cannot be holding either.
free_port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
top = low - 1 if low > 11000 else 65534  # a low ephemeral range leaves no room below it
for _ in range(1000):
    port = random.randrange(10000, top)
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", port))
            b.bind(("127.0.0.1", port + 1))
    except OSError:
        continue
    print(port)
    break
else:
    raise SystemExit("no two free ports below the ephemeral range")
PY
}

# wait_port PORT [TRIES]: until something accepts on PORT, 0.1 s apart (100 tries).
wait_port() {
  for _ in $(seq 1 "${2:-100}"); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}

# The command prefix that pins a process to LOAD_CPU (none if unset). A prefix, not a
# function: what runs in the background must be the process itself, for $! to be its PID.
pin=()
[[ -z ${LOAD_CPU:-} ]] || pin=(taskset -c "$LOAD_CPU")

# start_upstream: nginx answering from memory, 100 bytes at / and 1 MiB at /big, and at /graphql
# a 100-byte GraphQL answer (application/json, which the proxy reads for a rejection); sets UP.
start_upstream() {
  UP=$(free_port)
  mkdir -p "$WORK/up"
  head -c 100 /dev/zero | tr '\0' x > "$WORK/up/small"
  head -c 1048576 /dev/zero | tr '\0' x > "$WORK/up/big"
  printf '{"data":{"media":{"title":"%s"}}}' "$(head -c 69 /dev/zero | tr '\0' t)" > "$WORK/up/graphql"
  cat > "$WORK/up.conf" <<EOF
daemon off; worker_processes 1; pid $WORK/up.pid; error_log $WORK/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server { listen 127.0.0.1:$UP; root $WORK/up;
    location = /big { default_type application/octet-stream; }
    location = /graphql { default_type application/json; }
    location / { default_type text/plain; try_files /small =404; } } }
EOF
  "${pin[@]}" nginx -c "$WORK/up.conf" -p "$WORK" 2>/dev/null & PIDS+=($!)
  wait_port "$UP"
}

# start_identity: the proxy's identity stand-in; sets ID.
start_identity() {
  ID=$(free_port)
  "${pin[@]}" "$BIN" identity-stub --listen "127.0.0.1:$ID" --lifetime 1h >/dev/null 2>&1 & PIDS+=($!)
  wait_port "$ID"
}

# config_ours PORT: the proxy's configuration for the job, one worker, in $WORK/ours.toml;
# the secret comes from BENCH_SECRET=demo-secret. FORWARDING, if set, is the proxy's
# server.forwarding_headers: FORWARDING='[]' sends none, the job nginx and haproxy are given.
config_ours() {
  local forwarding=
  if [[ -n ${FORWARDING:-} ]]; then
    [[ $FORWARDING =~ ^\[[a-z\",\ -]*\]$ ]] || { echo "FORWARDING must be a TOML list of header names, e.g. '[]'" >&2; return 1; }
    forwarding="forwarding_headers = $FORWARDING"
  fi
  cat > "$WORK/ours.toml" <<EOF
[server]
listen = "127.0.0.1:$1"
workers = 1
$forwarding
[identity]
origin = "http://127.0.0.1:$ID"
[accounts.bench]
client_id = "demo-client"
client_secret_env = "BENCH_SECRET"
[[routes]]
upstream = "http://127.0.0.1:$UP"
account = "bench"
EOF
}

# fetch_token: TOKEN, the stand-in's token for the proxy's account, as the token command
# prints it (for the peers, which send it as a fixed header).
fetch_token() {
  config_ours 0
  TOKEN=$(BENCH_SECRET=demo-secret "$BIN" token bench --config "$WORK/ours.toml")
}

# config_nginx PORT: nginx doing the proxy's job with a fixed token (TOKEN), h2c on PORT and
# HTTP/1.1 on PORT+1, in $WORK/nginx.conf.
config_nginx() {
  cat > "$WORK/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  upstream up { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$1 http2; listen 127.0.0.1:$(($1 + 1));
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN"; proxy_buffering off; } } }
EOF
}
