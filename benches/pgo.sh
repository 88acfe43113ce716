#!/usr/bin/env bash
# Trains the profile that every optimized x86_64 Linux build of the proxy is compiled with
# (pgo/x86_64-linux.llvm<N>.profdata, handed to rustc by pgo/rustc): builds the proxy
# instrumented, runs it alone under benches/compare.sh's load (small, graphql, big, churn, h2:
# graphql's small JSON answers are read for a rejection, as a GraphQL API's are), merges what
# it counted, and rebuilds the release binary with the new profile.
#
#   benches/pgo.sh            # about 10 minutes on 2 cores
#   DUR=8 benches/pgo.sh      # seconds of load per scenario (default 4)
#
# Run it after changes to the request path: functions changed since the profile was written
# lose its guidance (they are compiled as without a profile; nothing breaks). Needs what
# compare.sh needs, and llvm-profdata of rustc's LLVM version (rustup component add
# llvm-tools, or apt-get install llvm-<N>).
#
#   benches/pgo.sh --check    # is the profile still the binary's? (CI runs this)
#
# The check fails where the profile no longer fits what it is compiled into: the compiler,
# Cargo.lock or Cargo.toml differ from those it was trained with (pgo/x86_64-linux.inputs;
# each changes every symbol's name, so no function would find its counts), or LLVM reports a
# function whose code changed since the training ("hash mismatch") when the proxy's crate is
# compiled again for release.
set -euo pipefail
cd "$(dirname "$0")/.."

inputs() {
  rustc -vV | sed -n 's/^release: /rustc /p; s/^LLVM version: /llvm /p'
  sha256sum Cargo.lock Cargo.toml
}

if [[ ${1:-} == --check ]]; then
  [[ $(uname -m)-$(uname -s) == x86_64-Linux ]] || { echo "pgo: no profile for this host; nothing to check" >&2; exit 0; }
  if ! diff <(inputs) pgo/x86_64-linux.inputs >&2; then
    echo "pgo: the profile was trained with other inputs (above: < now, > then); retrain it with benches/pgo.sh and commit pgo/" >&2
    exit 1
  fi
  # Only this crate is rebuilt: LLVM's warnings about the dependencies' code are not shown by
  # cargo, and their sources cannot change under the same Cargo.lock.
  touch src/lib.rs src/main.rs
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  cargo build --release --locked --bin mosaic-auth-proxy 2>&1 | tee "$log" >&2
  if grep -q 'hash mismatch' "$log"; then
    demangle=cat
    command -v c++filt >/dev/null && demangle=c++filt
    grep -o 'hash mismatch) [^ ]*' "$log" | sed 's/^hash mismatch) //' | sort -u | "$demangle" \
      | sed 's/^/pgo: changed since the training: /' >&2
    echo "pgo: functions above changed since the profile was trained; retrain it with benches/pgo.sh and commit pgo/" >&2
    exit 1
  fi
  echo "pgo: the profile fits this tree" >&2
  exit 0
fi

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
  PROXIES=ours ROUNDS=1 DUR=${DUR:-4} SCENARIOS="small graphql big churn h2" benches/compare.sh
shopt -s nullglob
raw=("$WORK"/run/*.profraw)
((${#raw[@]} > 0)) || { echo "pgo: the training wrote no profile" >&2; exit 1; }

# Sparse: functions the training never ran carry no counts, so they are compiled as without
# a profile rather than as cold.
rm -f pgo/x86_64-linux.llvm*.profdata
"$profdata" merge --sparse -o "pgo/x86_64-linux.llvm$llvm.profdata" "${raw[@]}"
inputs >pgo/x86_64-linux.inputs
"$profdata" show "pgo/x86_64-linux.llvm$llvm.profdata" | sed -n 's/^Total functions:/pgo: functions counted:/p' >&2

# Cargo does not see the profile change: rebuild everything optimized with it.
echo "pgo: rebuilding the release binary with pgo/x86_64-linux.llvm$llvm.profdata" >&2
cargo clean --release --quiet
cargo build --release --locked --quiet
