#!/usr/bin/env bash
# Instructions per request, counted under callgrind: the work of the proxy's whole process,
# which repeats to the instruction for the same binary and load whatever else the machine is
# doing, where timings move by 10-20 % from run to run. The proxy runs with one worker against
# the upstream and identity stand-in of compare.sh (and nginx, with PROXIES="ours nginx", as
# compare.sh configures it, in one process); the count starts after a warm-up and covers
# exactly N requests of one shape:
#   keepalive  GET, 100-byte answer, $CONNECTIONS keep-alive connections (64; h2load --h1)
#   graphql    keepalive's, with a 100-byte GraphQL answer (JSON: read for a rejection)
#   churn      the same with a new connection per request, 8 at a time
#   h2         h2c in, HTTP/1.1 out, 8 connections x 8 streams
#
#   benches/instructions.sh                          # the three, 20,000 requests each (about 30 s)
#   SHAPES=keepalive N=50000 benches/instructions.sh
#   TOP=12 benches/instructions.sh                   # and the 12 functions that cost the most
#   PROXIES="ours nginx" benches/instructions.sh     # nginx counted the same way
#   CACHE=1 benches/instructions.sh                  # and cache misses, mispredicted branches
#   CACHE=1 SORT=D1mw TOP=12 benches/instructions.sh # the 12 functions with the most D1 write misses
#   BIN=path/to/mosaic-auth-proxy benches/instructions.sh   # that binary instead of a release build
#   FORWARDING='[]' benches/instructions.sh          # no forwarding headers (server.forwarding_headers)
#
# A function's own cost is what was not inlined into its caller: with fat LTO and the trained
# profile, most of the request path is counted in a handful of functions. Names come from the
# release binary's symbol table. Line attribution needs debug info, and a build with it
# (CARGO_PROFILE_RELEASE_DEBUG=line-tables-only) gets other symbol names, which the trained
# profile does not match: it counts about 40 % more, so compare such builds only with each
# other. With CACHE=1, callgrind also simulates the caches and branch predictors (a run takes
# about twice as long) and each line adds, per request, the misses of a 32 KiB L1
# instruction cache and a 32 KiB L1 data cache (8-way, 64-byte lines, whatever the host
# has) on reads and on writes, and the mispredicted branches (conditional and indirect):
# the model's, not the machine's, but counted the same way for every binary, so that code
# layouts and data footprints can be compared where timings cannot tell 5 % apart. SORT
# ranks the TOP listing by one of those events instead of instructions. Needs valgrind,
# h2load (apt-get install valgrind nghttp2-client) and nginx.
set -euo pipefail
cd "$(dirname "$0")/.."

SHAPES=${SHAPES:-"keepalive churn h2"}
N=${N:-20000}
CONNECTIONS=${CONNECTIONS:-64}
TOP=${TOP:-0}
CACHE=${CACHE:-0}
SORT=${SORT:-Ir}
PROXIES=${PROXIES:-ours}
[[ $N =~ ^[1-9][0-9]{2,6}$ ]] || { echo "N must be a number of requests, 100 to 9999999" >&2; exit 1; }
[[ $CONNECTIONS =~ ^[1-9][0-9]{0,3}$ ]] || { echo "CONNECTIONS must be 1 to 9999" >&2; exit 1; }
[[ $TOP =~ ^[0-9]{1,3}$ ]] || { echo "TOP must be a number of functions, 0 to 999" >&2; exit 1; }
[[ $CACHE =~ ^[01]$ ]] || { echo "CACHE must be 0 or 1" >&2; exit 1; }
case $SORT in
  Ir) ;;
  I1mr | D1mr | D1mw | Bcm | Bim) [[ $CACHE == 1 ]] || { echo "SORT=$SORT needs CACHE=1" >&2; exit 1; } ;;
  *) echo "SORT must be Ir, I1mr, D1mr, D1mw, Bcm or Bim" >&2; exit 1 ;;
esac
callgrind=(valgrind --tool=callgrind)
# The caches are modelled the same on every machine (callgrind takes the host's otherwise: a
# 48 KiB L1 data cache on one, 32 KiB on another), so that figures compare across machines.
[[ $CACHE == 0 ]] || callgrind+=(--cache-sim=yes --branch-sim=yes
  --I1=32768,8,64 --D1=32768,8,64 --LL=33554432,16,64)
for tool in valgrind callgrind_control callgrind_annotate h2load nginx python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install valgrind nghttp2-client nginx)" >&2; exit 1; }
done

. benches/loopback.sh
begin instructions
start_upstream
start_identity

# load SHAPE PORT COUNT: COUNT requests of SHAPE; fails unless every one succeeded.
load() {
  local out url="http://127.0.0.1:$2/"
  case $1 in
    keepalive) out=$(h2load --h1 -n "$3" -c "$CONNECTIONS" "$url") ;;
    graphql) out=$(h2load --h1 -n "$3" -c "$CONNECTIONS" "${url}graphql") ;;
    churn) out=$(h2load --h1 -n "$3" -c 8 -H 'Connection: close' "$url") ;;
    h2) out=$(h2load -n "$3" -c 8 -m 8 "$url") ;;
  esac
  grep -q "^requests: $3 total, $3 started, $3 done, $3 succeeded" <<<"$out" \
    || { echo "$1: not every request succeeded:" >&2; grep "^requests:\|^status codes:" <<<"$out" >&2; return 1; }
}

for proxy in $PROXIES; do
  case $proxy in ours | nginx) ;; *) echo "unknown proxy $proxy (ours, nginx)" >&2; exit 1 ;; esac
done
for shape in $SHAPES; do
  case $shape in keepalive | graphql | churn | h2) ;; *) echo "unknown shape $shape (keepalive, graphql, churn, h2)" >&2; exit 1 ;; esac
done
[[ " $PROXIES " != *" nginx "* ]] || fetch_token

# counted PROXY SHAPE: one proxy under callgrind, N requests of SHAPE counted.
counted() {
  local proxy=$1 shape=$2 port h1 out=$WORK/callgrind.$1.$2 pid total
  port=$(free_port)
  case $proxy in
    ours)
      config_ours "$port"
      h1=$port
      BENCH_SECRET=demo-secret RUST_LOG=error "${callgrind[@]}" --callgrind-out-file="$out" \
        "$BIN" run --config "$WORK/ours.toml" --wait-ready 60 >/dev/null 2>"$out.log" &
      ;;
    nginx)
      config_nginx "$port"
      h1=$((port + 1))
      "${callgrind[@]}" --callgrind-out-file="$out" \
        nginx -g "master_process off;" -c "$WORK/nginx.conf" -p "$WORK" >/dev/null 2>"$out.log" &
      ;;
  esac
  pid=$!
  PIDS+=("$pid")
  wait_port "$h1" 600
  [[ $shape == h2 ]] && h1=$port
  load "$shape" "$h1" $((N / 10 + 500))   # pools filled, caches grown, code paged in
  callgrind_control -z "$pid" >/dev/null 2>&1
  load "$shape" "$h1" "$N"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  # The counts since the zeroing, by event name (Ir, and I1mr ... Bim with CACHE=1).
  local ir i1 d1r d1w mispredicted
  read -r total ir i1 d1r d1w mispredicted < <(awk -v n="$N" -v sort="$SORT" '
    /^events:/ { for (i = 2; i <= NF; i++) name[i] = $i }
    /^summary:/ { for (i = 2; i <= NF; i++) count[name[i]] = $i }
    END { printf "%.0f %d %d %d %d %d\n", count[sort], count["Ir"] / n, count["I1mr"] / n,
            count["D1mr"] / n, count["D1mw"] / n, (count["Bcm"] + count["Bim"]) / n }' "$out.1")
  if [[ $CACHE == 0 ]]; then
    printf '%-5s %-9s %8d instructions per request\n' "$proxy" "$shape" "$ir"
  else
    printf '%-5s %-9s %8d instructions, %5d I1 misses, %5d / %5d D1 misses (read / write), %5d mispredicted branches per request\n' \
      "$proxy" "$shape" "$ir" "$i1" "$d1r" "$d1w" "$mispredicted"
  fi
  if ((TOP > 0)); then
    # The frames under way when the count began are listed with all of it: left out. The
    # figures are per request, of the event SORT names.
    callgrind_annotate --threshold=100 --show="$SORT" --sort="$SORT" "$out.1" 2>/dev/null \
      | awk -v n="$N" -v top="$TOP" -v total="$total" -v whole="$([[ $SORT == Ir ]] && echo 1 || echo 0)" '
          /^-+$/ { rule++; next }
          rule >= 5 && NF >= 3 && $1 ~ /^[0-9,]+$/ {
            c = $1; gsub(",", "", c); c += 0
            if (c >= 0.99 * total) next
            name = $0; sub(/^ *[0-9,]+ *(\([^)]*\))? */, "", name); sub(/ \[[^]]*\]$/, "", name); sub(/^[^:]*:/, "", name)
            if (shown++ < top) printf(whole ? "                %8d  %s\n" : "                %8.1f  %s\n", c / n, name)
          }'
  fi
}

echo "$N requests per shape; $BIN" >&2
for shape in $SHAPES; do
  for proxy in $PROXIES; do
    counted "$proxy" "$shape"
  done
done
