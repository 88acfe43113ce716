#!/usr/bin/env bash
# The stack frames of the polls every request goes through, read from the release binary's
# code, each against a bound; fails if one is over its bound.
#
#   benches/frames.sh                     # the table (builds the release binary if needed)
#   BIN=path/to/mosaic-auth-proxy benches/frames.sh
#   OVER=4096 benches/frames.sh           # and every function of the proxy, hyper, h2 and
#                                         # tokio whose frame is over 4096 bytes
#
# Why: a step of a request that the compiler inlines into a poll keeps its room in that
# poll's frame on every call, whether the step runs or not, and a frame over a page is
# probed page by page on entry. With the trained profile, a rare step's inlined poll once
# made the upstream exchange's poll (twice per request) a 42 KiB frame: ten probing writes
# and locals spread over more cache lines than L1 holds (README: "Instructions, caches and
# branches"). Nothing else shows it: the tests pass and the instruction count hardly moves. A
# change to the request path, or a retrained profile, can bring it back; this check, run by
# CI on the binary it builds with the profile, says where.
#
# The frame is what a function's prologue takes from the stack pointer: each `sub $n,%rsp`
# and, for a frame probed in a loop, the loop's bound (`lea -n(%rsp),%r11`). Where several
# copies of a function exist (generic code), the largest counts. x86_64 only; elsewhere it
# says so and passes. Needs objdump (binutils) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

OVER=${OVER:-0}
[[ $OVER =~ ^[0-9]{1,7}$ ]] || { echo "OVER must be a number of bytes" >&2; exit 1; }
if [[ $(uname -m) != x86_64 ]]; then
  echo "frames: read from x86_64 code only; nothing checked on $(uname -m)" >&2
  exit 0
fi
for tool in objdump python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install binutils python3)" >&2; exit 1; }
done
if [[ -z ${BIN:-} ]]; then
  cargo build --release --locked --quiet --bin mosaic-auth-proxy
  BIN=$PWD/target/release/mosaic-auth-proxy
fi

# The polls, each as a pattern of its demangled name (a Python regular expression matched
# against the whole name), its bound in bytes, whether it may be inlined (`may`: into a
# caller, whose frame then holds it: the profile decides, and a retraining may change it;
# `must`: the roots, always apart) and what it is. The bounds are the trained
# build's frames with room to spare; one over its bound has taken in something new. Left
# out: polls whose name has several copies that the symbol table cannot tell apart (an
# upstream connection's task, `Http2::poll`: the admin listener's and the HTTP/2 client's
# have the same names); OVER lists them.
BOUNDS=$(
  cat <<'B'
<mosaic_auth_proxy::proxy::service::ProxyService as hyper::service::service::Service<.*>>::call::\{\{closure\}\}::\{\{closure\}\}	8192	must	the request's own poll (filter, token, rewrite, answer)
<mosaic_auth_proxy::proxy::upstream::Exchange as core::future::future::Future>::poll	4096	may	the upstream exchange, twice per request
mosaic_auth_proxy::proxy::pool::Pool::exchange::\{\{closure\}\}	4096	may	taking a pooled connection and sending on it
<mosaic_auth_proxy::server::conn::CountedFuture<F> as core::future::future::Future>::poll	4096	may	the request as hyper polls it
<mosaic_auth_proxy::server::http::Connection<S> as core::future::future::Future>::poll	6144	must	a client connection
mosaic_auth_proxy::server::drive::\{\{closure\}\}	4096	may	a client connection's watchdog loop
B
)

objdump -d --no-show-raw-insn -C "$BIN" | python3 -c '
import re, sys

over, bounds = int(sys.argv[1]), [line.split("\t") for line in sys.argv[2].splitlines()]
head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
sub = re.compile(r"\tsub\s+\$0x([0-9a-f]+),%rsp$")
probe = re.compile(r"\tlea\s+-0x([0-9a-f]+)\(%rsp\),%r11$")
frames, name, seen, looped = {}, None, 0, False
for line in sys.stdin:
    match = head.match(line)
    if match:
        name, seen, looped = match.group(1), 0, False
        frames.setdefault(name, 0)
        size = 0
        continue
    if name is None or seen >= 40:
        continue
    seen += 1
    line = line.rstrip("\n")
    match = probe.search(line)
    if match:
        # A probing loop: its bound is the pages it takes; the loop step is not more.
        size += int(match.group(1), 16)
        looped = True
    else:
        match = sub.search(line)
        if match:
            n = int(match.group(1), 16)
            if looped and n == 0x1000:
                looped = False
            else:
                size += n
    frames[name] = max(frames[name], size)

failed = 0
print("  frame   bound  poll")
for pattern, bound, inlined, what in bounds:
    found = [(size, name) for name, size in frames.items() if re.fullmatch(pattern, name)]
    if not found and inlined == "may":
        print(f"      - {int(bound):>7}  {what}: inlined, counted in the frame of its caller")
        continue
    if not found:
        print(f"      - {int(bound):>7}  {what}: not in the binary (renamed?)")
        failed += 1
        continue
    size = max(found)[0]
    mark = "" if size <= int(bound) else "   <- over its bound"
    failed += size > int(bound)
    print(f"{size:>7} {int(bound):>7}  {what}{mark}")
if over:
    print(f"\nframes over {over} bytes:")
    own = re.compile(r"mosaic_auth_proxy|hyper|h2::|tokio")
    for name, size in sorted(frames.items(), key=lambda item: -item[1]):
        if size > over and own.search(name):
            print(f"{size:>7}  {name[:160]}")
if failed:
    print(f"frames: {failed} poll(s) over their bound or missing; read the function above with objdump -dC for what it took in", file=sys.stderr)
    sys.exit(1)
' "$OVER" "$BOUNDS"
