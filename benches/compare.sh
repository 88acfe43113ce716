#!/usr/bin/env bash
# Side by side on loopback: this proxy against nginx and haproxy doing the same job (add
# "Authorization: Bearer <jwt>", forward to a keep-alive upstream, stream the answer back),
# in alternating rounds so that the machine's noise hits every proxy alike.
#
#   benches/compare.sh                 # 3 rounds x 5 s per scenario (about 4 minutes)
#   QUICK=1 benches/compare.sh         # 1 round x 2 s: a smoke test, not a verdict
#   ROUNDS=5 DUR=10 SCENARIOS="small h2" PROXIES="ours nginx" benches/compare.sh
#   BIN=path/to/mosaic-auth-proxy benches/compare.sh   # that binary instead of a release build
#   CONNECTIONS=8 SCENARIOS=small benches/compare.sh    # small over 8 connections instead of 64
#   SCENARIOS="small graphql" benches/compare.sh        # and small JSON answers
#   FORWARDING='[]' benches/compare.sh  # no forwarding headers: the peers' job exactly
#
# Needs wrk and h2load (apt-get install wrk nghttp2-client); nginx and haproxy are compared
# when installed (apt-get install nginx haproxy). Each proxy runs alone on CPU 1 with one
# worker; the load generator and the upstream (nginx answering 100 bytes, or 1 MiB for
# "big") share CPU 0. Scenarios: small (GET, 100-byte answer, $CONNECTIONS keep-alive
# connections, 64 by default), graphql (the same with a 100-byte GraphQL answer, JSON, which
# this proxy reads for a token rejection: the answers of a GraphQL API such as Mosaic's),
# big (1 MiB answers, 16 connections), churn (a new connection per request, 16 at once),
# h2 (h2c in, HTTP/1.1 out, 8 connections x 8 streams). Per proxy and scenario: requests/s,
# p99 latency, the proxy's CPU time per request (user + system, from /proc) and the user
# part of it, and its RSS at the end of the run, with ratios to the best proxy. Everything
# stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then ROUNDS=${ROUNDS:-1}; DUR=${DUR:-2}; else ROUNDS=${ROUNDS:-3}; DUR=${DUR:-5}; fi
SCENARIOS=${SCENARIOS:-"small big churn h2"}
PROXIES=${PROXIES:-"ours nginx haproxy"}
CONNECTIONS=${CONNECTIONS:-64}
[[ $CONNECTIONS =~ ^[1-9][0-9]{0,4}$ ]] || { echo "CONNECTIONS must be a number of connections, 1 to 99999" >&2; exit 1; }
LOAD_CPU=${LOAD_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}

for tool in wrk h2load taskset python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install wrk nghttp2-client util-linux)" >&2; exit 1; }
done
command -v nginx >/dev/null || { echo "nginx is needed for the upstream (apt-get install nginx)" >&2; exit 1; }
available=()
for p in $PROXIES; do
  case $p in
    ours) available+=(ours) ;;
    nginx|haproxy) if command -v "$p" >/dev/null; then available+=("$p"); else echo "skipping $p: not installed" >&2; fi ;;
    *) echo "unknown proxy $p" >&2; exit 1 ;;
  esac
done
for s in $SCENARIOS; do
  case $s in small | graphql | big | churn | h2) ;; *) echo "unknown scenario $s (small, graphql, big, churn, h2)" >&2; exit 1 ;; esac
done

. benches/loopback.sh
begin compare
# The upstream (nginx on CPU 0 answering from memory) and the token, which this proxy's
# identity stand-in hands to the token command once.
start_upstream
start_identity
fetch_token

# start_proxy NAME PORT: runs the proxy pinned to the proxy CPU; sets PROXY_PID.
start_proxy() {
  local name=$1 port=$2
  case $name in
    ours)
      config_ours "$port"
      BENCH_SECRET=demo-secret RUST_LOG=error taskset -c "$PROXY_CPU" "$BIN" run --config "$WORK/ours.toml" --wait-ready 10 >/dev/null &
      ;;
    nginx)
      config_nginx "$port"
      taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK" 2>/dev/null &
      ;;
    haproxy)
      cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend in
  bind 127.0.0.1:$port proto h2
  bind 127.0.0.1:$((port + 1))
  http-request set-header Authorization "Bearer $TOKEN"
  default_backend up
backend up
  server up 127.0.0.1:$UP
EOF
      taskset -c "$PROXY_CPU" haproxy -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 &
      ;;
  esac
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
}

# A proxy's processes: itself and its children (nginx's worker).
family() { echo "$1" $(pgrep -P "$1" || true); }
# "user system" clock ticks of a proxy's processes.
cpu_ticks() {
  local u=0 s=0 p pu ps
  for p in $(family "$1"); do
    read -r pu ps < <(awk '{print $14, $15}' "/proc/$p/stat")
    u=$((u + pu)) s=$((s + ps))
  done
  echo "$u $s"
}
rss_kb() { local r=0 p; for p in $(family "$1"); do r=$((r + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $r; }

# measure NAME SCENARIO: one run; appends "name scenario rps p99_ms cpu_us user_us rss_kb"
# to results.
measure() {
  local name=$1 scenario=$2 port url out user0 sys0 user1 sys1 n rps p99 hz
  port=$(free_port)
  # nginx and haproxy serve h2c on port and HTTP/1.1 on port+1; ours takes both on one.
  start_proxy "$name" "$port"
  wait_port "$port"
  local h1=$port
  [[ $name != ours ]] && { h1=$((port + 1)); wait_port "$h1"; }
  url="http://127.0.0.1:$h1/"
  hz=$(getconf CLK_TCK)
  read -r user0 sys0 < <(cpu_ticks "$PROXY_PID")
  case $scenario in
    small) out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DUR}s" --latency "$url") ;;
    graphql) out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DUR}s" --latency "${url}graphql") ;;
    big) out=$(taskset -c "$LOAD_CPU" wrk -t1 -c16 -d"${DUR}s" --latency "${url}big") ;;
    churn) out=$(taskset -c "$LOAD_CPU" wrk -t1 -c16 -d"${DUR}s" --latency -H "Connection: close" "$url") ;;
    h2) out=$(taskset -c "$LOAD_CPU" h2load -c8 -m8 -D"$DUR" "http://127.0.0.1:$port/") ;;
  esac
  read -r user1 sys1 < <(cpu_ticks "$PROXY_PID")
  local rss; rss=$(rss_kb "$PROXY_PID")
  if [[ $scenario == h2 ]]; then
    n=$(awk '/^requests:/ {print $8}' <<<"$out")
    rps=$(awk '/^finished in/ {gsub(",","",$4); print $4}' <<<"$out")
    p99=$(awk '/^time for request:/ {print $5}' <<<"$out")  # the max; h2load gives no p99
  else
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  fi
  kill "$PROXY_PID" 2>/dev/null; wait "$PROXY_PID" 2>/dev/null || true
  local cpu_us user_us
  cpu_us=$(python3 -c "print(f'{($user1 + $sys1 - $user0 - $sys0) / $hz * 1e6 / max($n, 1):.1f}')")
  user_us=$(python3 -c "print(f'{($user1 - $user0) / $hz * 1e6 / max($n, 1):.1f}')")
  echo "$name $scenario $rps $p99 $cpu_us $user_us $rss" >> "$WORK/results"
}

echo "rounds: $ROUNDS x ${DUR}s; proxies: ${available[*]}; scenarios: $SCENARIOS (small over $CONNECTIONS connections)" >&2
for round in $(seq 1 "$ROUNDS"); do
  # Rotate the order each round.
  order=("${available[@]:$(( (round - 1) % ${#available[@]} ))}" "${available[@]:0:$(( (round - 1) % ${#available[@]} ))}")
  for scenario in $SCENARIOS; do
    for name in "${order[@]}"; do
      echo "round $round: $scenario $name" >&2
      measure "$name" "$scenario"
    done
  done
done

python3 - "$WORK/results" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, scenario, rps, p99, cpu, user, rss = line.split()
    def ms(v):
        v = v.strip()
        for unit, f in (("us", 1e-3), ("ms", 1), ("s", 1e3)):
            if v.endswith(unit):
                return float(v[: -len(unit)]) * f
        return float(v)
    rows[(scenario, name)].append((float(rps), ms(p99), float(cpu), float(user), int(rss) / 1024))
print("| scenario | proxy | req/s | p99 ms | CPU µs/req | CPU × best | of it user | RSS MB |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for scenario in dict.fromkeys(s for s, _ in rows):
    med = {n: [statistics.median(c) for c in zip(*v)] for (s, n), v in rows.items() if s == scenario}
    best_cpu = min(m[2] for m in med.values()) or 1
    for name, (rps, p99, cpu, user, rss) in sorted(med.items(), key=lambda kv: kv[1][2]):
        print(f"| {scenario} | {name} | {rps:,.0f} | {p99:.2f} | {cpu:.1f} | {cpu / best_cpu:.2f} | {user:.1f} | {rss:.1f} |")
print("\nMedians over rounds; h2's latency column is h2load's maximum (it reports no p99).")
PY
