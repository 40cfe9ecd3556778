#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of what guests and peers control, on stable
# Rust: RUSTC_BOOTSTRAP=1 lets stable rustc take the coverage flags cargo-fuzz passes, and
# `--sanitizer none` avoids the nightly-only sanitizers (Rust's own bounds checks and the targets'
# canaries catch out-of-bounds access). Targets (tests/fuzz/fuzz_targets/):
#   exec_command      NVMe I/O command + capsule + guest memory → executor (PRP/SGL, DSM, LBA,
#                     address translation) over a RAM namespace; canaries around guest regions
#   nvmf_pdu          NVMe/TCP common-header check and every PDU / Fabrics / discovery decoder
#   nvmf_stream       the NVMe/TCP receive state machine over a real socket, data into a buffer
#   controller_admin  property and admin-command sessions against the NVMe controller
#   vhost_session     vhost-user sessions over a socketpair against leapd's request handling:
#                     raw and near-valid messages, memory tables, rings, inflight regions, and
#                     guest memory (descriptor chains, requests) served by a real poller
#   virtq_chain       descriptor-chain walking (direct, indirect, loops) over guest memory
#
#   scripts/fuzz.sh [SECONDS-PER-TARGET] [TARGET...]     (default 20 s, all targets)
# Seeds: tests/fuzz/seeds/<target> (checked in); the growing corpus: target/fuzz-corpus/<target>;
# crashes: tests/fuzz/artifacts/<target> (the script fails and prints them). Installs cargo-fuzz
# with `cargo install` when missing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
secs=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(exec_command nvmf_pdu nvmf_stream controller_admin vhost_session virtq_chain)
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build --fuzz-dir tests/fuzz -s none -O
total=0
for t in "${targets[@]}"; do
  mkdir -p "target/fuzz-corpus/$t"
  log=target/fuzz-corpus/$t.log
  if ! cargo fuzz run --fuzz-dir tests/fuzz -s none -O "$t" "target/fuzz-corpus/$t" \
       "tests/fuzz/seeds/$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $t FAILED" >&2
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -20 >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  total=$((total + ${runs:-0}))
  echo "fuzz: $t: ${runs:-?} executions in ${secs}s, no crash ($(sed -n 's/.*\(cov: [0-9]*\).*DONE.*//p;s/.*DONE *\(cov: [0-9]*\).*/\1/p' "$log" | tail -1))"
done
echo "fuzz: PASS ${#targets[@]} target(s), $total executions"
