#!/usr/bin/env bash
# THE test command for Leap (README; .ci/run calls it). Steps, failing fast:
#   1. scripts/install-deps.sh            (only as root; quick when everything is installed)
#   2. cargo fmt --all -- --check; cargo clippy --workspace --all-targets -- -D warnings;
#      cargo test --workspace --all-targets; the loom checks of leap-queues (--cfg loom, own
#      target dir target/loom); scripts/fuzz.sh (coverage-guided fuzzing, LEAP_FUZZ_SECONDS per
#      target, default 20; cargo-fuzz is installed when missing)
#   3. cargo build --release -p leap-soc, then tests/guest/guest-verify.sh --backend leapd, with
#      512- and 4096-byte logical blocks, tests/guest/guest-crash.sh (leapd killed with SIGKILL
#      and restarted under a guest workload: with inflight tracking the guest sees no error; with
#      --no-inflight it must fail), and tests/guest/nvmf-interop.sh (Linux's NVMe/TCP
#      initiator against leapd target; leapd's initiator against Linux nvmet and leapd target),
#      and tests/guest/vfio-guest.sh (the VFIO NVMe driver on QEMU's emulated NVMe behind its
#      emulated IOMMU, in a guest: the driver's tests with reset and hot-remove, leapd bench
#      against the kernel's nvme driver, and tenant VM → leapd → NVMe/TCP → leapd target → VFIO)
#      (a real QEMU guest; skipped loudly without QEMU/kernel/fio/busybox unless CI=true or
#      LEAP_REQUIRE_GUEST=1)
#   4. scripts/build-aarch64.sh --test    (when CI=true or LEAP_AARCH64=1: cross-builds for
#      aarch64 and runs every test that needs no guest under qemu-user; LEAP_AARCH64_TEST=0 only
#      builds)
#   5. scripts/soc-demo.sh: the SoC modes on emulated hardware (tenant VM + SoC VM + host agent),
#      fio verify through the window, then the SoC's leapd killed (SIGKILL) and restarted under
#      the tenant's workload: --mode socvm always with step 3 (also with the agent killed and
#      restarted); --mode arm-soc (aarch64 SoC VM, 16 KiB pages) when step 4 runs
# Env: LEAP_CARGO_TEST_TIMEOUT (s, default 1800) bounds step 2 (status 124 = it timed out).
#      LEAP_SKIP_GUEST=1 skips step 3 and LEAP_SKIP_FUZZ=1 the fuzzing (neither allowed with
#      CI=true); LEAP_SKIP_AARCH64=1 skips step 4.
# Prints one summary line at the end: "test.sh: PASS ..." or "test.sh: FAIL at <step> ...".
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
t_start=$(date +%s)
done_steps=()
current=""

aarch64=0
if { [ "${CI:-}" = true ] || [ "${LEAP_AARCH64:-0}" = 1 ]; } && [ "${LEAP_SKIP_AARCH64:-0}" != 1 ]; then aarch64=1; fi

# shellcheck disable=SC2317  # invoked by the trap
on_exit() {
  local rc=$?
  local t=$(( $(date +%s) - t_start ))
  if [ "$rc" = 0 ]; then
    echo "test.sh: PASS (${done_steps[*]}) in ${t}s"
  else
    echo "test.sh: FAIL at step '$current' (status $rc) after ${t}s; passed: ${done_steps[*]:-none}" >&2
  fi
}
trap on_exit EXIT

step() { # name, command...
  current=$1; shift
  local t0
  t0=$(date +%s)
  echo
  echo "==> test.sh [$current] $*"
  "$@"
  done_steps+=("$current:$(( $(date +%s) - t0 ))s")
}

# skipped NAME VAR: when VAR=1 asks to skip step NAME, says so and returns 0 (with CI=true that
# is refused: nothing may be skipped there); otherwise returns 1.
skipped() {
  local name=$1 var=$2
  [ "${!var:-0}" = 1 ] || return 1
  if [ "${CI:-}" = true ]; then current=$name; echo "$var=1 is not allowed with CI=true" >&2; exit 1; fi
  echo
  echo "==> test.sh [$name] SKIPPED ($var=1)"
  done_steps+=("$name:skipped")
}

if [ "$(id -u)" = 0 ]; then
  step deps env LEAP_INSTALL_ARM64="${LEAP_INSTALL_ARM64:-$aarch64}" LEAP_INSTALL_SOC=1 scripts/install-deps.sh
fi

# rustfmt and clippy come with the machine's rustup toolchain; add them if a machine lacks them.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  echo "test.sh: adding rustfmt and clippy to the toolchain"
  rustup component add rustfmt clippy
fi

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
# a hung test must not hang CI: LEAP_CARGO_TEST_TIMEOUT seconds (default 1800) for build + tests
step cargo-test timeout -k 30 "${LEAP_CARGO_TEST_TIMEOUT:-1800}" cargo test --workspace --all-targets

if ! skipped fuzz LEAP_SKIP_FUZZ; then
  step fuzz scripts/fuzz.sh "${LEAP_FUZZ_SECONDS:-20}"
fi

step loom env RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  timeout -k 30 "${LEAP_CARGO_TEST_TIMEOUT:-1800}" cargo test -p leap-queues --lib --release -- loom

if ! skipped guest LEAP_SKIP_GUEST; then
  step release-build cargo build --release -p leap-soc
  step guest env LEAPD="${LEAPD:-$root/target/release/leapd}" tests/guest/guest-verify.sh --backend leapd
  step guest-4k env LEAPD="${LEAPD:-$root/target/release/leapd}" tests/guest/guest-verify.sh --backend leapd --block-size 4096
  step guest-crash env LEAPD="${LEAPD:-$root/target/release/leapd}" tests/guest/guest-crash.sh
  step guest-crash-no-inflight env LEAPD="${LEAPD:-$root/target/release/leapd}" tests/guest/guest-crash.sh --no-inflight
  step nvmf-interop env LEAPD="${LEAPD:-$root/target/release/leapd}" tests/guest/nvmf-interop.sh
  step vfio-guest tests/guest/vfio-guest.sh
fi

if [ "$aarch64" = 1 ]; then
  if [ "${LEAP_AARCH64_TEST:-1}" = 1 ]; then step aarch64 scripts/build-aarch64.sh --test
  else step aarch64 scripts/build-aarch64.sh; fi
fi

if [ "${LEAP_SKIP_GUEST:-0}" != 1 ]; then
  leapd_bin=${LEAPD:-$root/target/release/leapd}
  step soc-socvm env LEAPD="$leapd_bin" scripts/soc-demo.sh --mode socvm
  step soc-socvm-crash env LEAPD="$leapd_bin" scripts/soc-demo.sh --mode socvm --crash
  step soc-socvm-agent-crash env LEAPD="$leapd_bin" scripts/soc-demo.sh --mode socvm --crash-agent
  if [ "$aarch64" = 1 ]; then
    step soc-arm env LEAPD="$leapd_bin" scripts/soc-demo.sh --mode arm-soc
    step soc-arm-crash env LEAPD="$leapd_bin" scripts/soc-demo.sh --mode arm-soc --crash
  else
    echo
    echo "==> test.sh [soc-arm] SKIPPED: the ARM SoC demo needs the aarch64 toolchain (CI=true or LEAP_AARCH64=1)"
    done_steps+=("soc-arm:skipped")
  fi
fi
current=""
