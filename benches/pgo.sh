#!/usr/bin/env bash
# Trains the profile that every optimized x86_64 Linux build of the proxy is compiled with
# (pgo/x86_64-linux.llvm<N>.profdata, handed to rustc by pgo/rustc): builds the proxy
# instrumented, runs it alone under benches/compare.sh's load (small, big, churn, h2), merges
# what it counted, and rebuilds the release binary with the new profile.
#
#   benches/pgo.sh            # about 10 minutes on 2 cores
#   DUR=8 benches/pgo.sh      # seconds of load per scenario (default 4)
#
# Run it after changes to the request path: functions changed since the profile was written
# lose its guidance (they are compiled as without a profile; nothing breaks). Needs what
# compare.sh needs, and llvm-profdata of rustc's LLVM version (rustup component add
# llvm-tools, or apt-get install llvm-<N>).
set -euo pipefail
cd "$(dirname "$0")/.."

host=$(rustc -vV | sed -n 's/^host: //p')
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ $host == x86_64-unknown-linux-gnu ]] \
  || { echo "the profile is trained for x86_64 Linux; this host is $host" >&2; exit 1; }
profdata=
for candidate in "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
  "llvm-profdata-$llvm" "/usr/lib/llvm-$llvm/bin/llvm-profdata"; do
  if command -v "$candidate" >/dev/null; then profdata=$candidate; break; fi
done
[[ -n $profdata ]] || {
  echo "llvm-profdata of LLVM $llvm is needed: rustup component add llvm-tools, or apt-get install llvm-$llvm" >&2
  exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The instrumented build, in a target directory of its own. RUSTFLAGS reach build scripts
# too: what they count goes to $WORK/build and is not used.
echo "pgo: building the instrumented proxy" >&2
RUSTFLAGS="-Cprofile-generate=$WORK/build" \
  cargo build --release --locked --quiet --bin mosaic-auth-proxy --target-dir target/pgo-train

echo "pgo: training under benches/compare.sh's load" >&2
LLVM_PROFILE_FILE="$WORK/run/%p.profraw" BIN=$PWD/target/pgo-train/release/mosaic-auth-proxy \
  PROXIES=ours ROUNDS=1 DUR=${DUR:-4} benches/compare.sh
shopt -s nullglob
raw=("$WORK"/run/*.profraw)
((${#raw[@]} > 0)) || { echo "pgo: the training wrote no profile" >&2; exit 1; }

# Sparse: functions the training never ran carry no counts, so they are compiled as without
# a profile rather than as cold.
rm -f pgo/x86_64-linux.llvm*.profdata
"$profdata" merge --sparse -o "pgo/x86_64-linux.llvm$llvm.profdata" "${raw[@]}"
"$profdata" show "pgo/x86_64-linux.llvm$llvm.profdata" | sed -n 's/^Total functions:/pgo: functions counted:/p' >&2

# Cargo does not see the profile change: rebuild everything optimized with it.
echo "pgo: rebuilding the release binary with pgo/x86_64-linux.llvm$llvm.profdata" >&2
cargo clean --release --quiet
cargo build --release --locked --quiet
