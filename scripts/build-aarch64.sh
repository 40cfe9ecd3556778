#!/usr/bin/env bash
# Cross-builds the workspace for aarch64-unknown-linux-gnu with Debian's rustc-web (REFERENCE.md,
# "aarch64"): rustup's cargo drives /usr/bin/rustc, which ships the arm64 std; output in
# target/aarch64. With --test, also runs the tests under qemu-aarch64-static.
#
#   scripts/build-aarch64.sh [--test] [extra cargo args...]
#   scripts/build-aarch64.sh --leapd     (only leapd, release: for the ARM SoC VM)
#
# Needs (scripts/install-deps.sh installs them): rustc-web, libstd-rust-web-dev:arm64,
# gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user-static (for --test).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
run_tests=0 leapd_only=0
if [ "${1:-}" = --test ]; then run_tests=1; shift; fi
if [ "${1:-}" = --leapd ]; then leapd_only=1; shift; fi

die() { echo "build-aarch64: ERROR: $*" >&2; exit 1; }
[ -x /usr/bin/rustc ] || die "/usr/bin/rustc missing (apt-get install rustc-web; scripts/install-deps.sh)"
command -v aarch64-linux-gnu-gcc >/dev/null || die "aarch64-linux-gnu-gcc missing (gcc-aarch64-linux-gnu)"
sysroot=$(/usr/bin/rustc --print sysroot)
ls "$sysroot"/lib/rustlib/aarch64-unknown-linux-gnu/lib/libstd-*.rlib >/dev/null 2>&1 \
  || die "no aarch64 std under $sysroot/lib/rustlib (apt-get install libstd-rust-web-dev:arm64)"
if [ "$run_tests" = 1 ]; then
  command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static missing (qemu-user-static)"
fi

export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static \
  CARGO_TARGET_DIR=target/aarch64 LEAP_TEST_RUNNER=qemu-aarch64-static
echo "build-aarch64: $(/usr/bin/rustc --version), target dir target/aarch64"
if [ "$leapd_only" = 1 ]; then
  cargo build --release -p leap-soc --bin leapd --target aarch64-unknown-linux-gnu "$@"
  echo "build-aarch64: OK (target/aarch64/aarch64-unknown-linux-gnu/release/leapd)"
  exit 0
fi
cargo build --workspace --all-targets --target aarch64-unknown-linux-gnu "$@"
if [ "$run_tests" = 1 ]; then
  cargo test --workspace --target aarch64-unknown-linux-gnu "$@"
fi
echo "build-aarch64: OK"
