#!/usr/bin/env bash
# End-to-end test with a real Linux guest: serve a 1 GiB sparse image over vhost-user-blk with the
# chosen back end (2 queues), boot a QEMU (TCG) guest on it and run the "verify" job (size, queues,
# discard, write cache, fio crc32c verify, flush, discard, write zeroes), then stop the back end.
#
#   tests/guest/guest-verify.sh [--backend leapd|qsd] [--block-size 512|4096] [--keep]
#
# --block-size (leapd only): passed to leapd serve and checked as the guest's logical block size.
# --keep: keep the work dir (image) under target/guest/verify-*.
#
# leapd: LEAPD=path overrides target/release/leapd (else built with cargo). It must exit 0 on
#   SIGTERM. Expectations (env): LEAP_GUEST_EXPECT_DISCARD (default 1), LEAP_GUEST_EXPECT_WRITE_CACHE
#   (default "write back"), LEAPD_ARGS (extra leapd serve arguments).
# qsd: qemu-storage-daemon, the peer anchor. It reports "write through"; the guest switches it to
#   write back (virtio config write) so FLUSH is exercised.
# Missing QEMU/kernel/fio/busybox: fails when CI=true or LEAP_REQUIRE_GUEST=1, else a loud skip (exit 0).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
root=$GUEST_ROOT

backend=leapd keep=0 bsize=""
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --block-size) bsize=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "guest-verify: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
case "$backend" in leapd|qsd) ;; *) echo "guest-verify: --backend must be leapd or qsd" >&2; exit 2 ;; esac
if [ -n "$bsize" ]; then
  [ "$backend" = leapd ] || { echo "guest-verify: --block-size needs --backend leapd" >&2; exit 2; }
  LEAPD_ARGS="${LEAPD_ARGS:-} --block-size $bsize"
  export LEAPD_ARGS
fi

need_qsd=0; [ "$backend" = qsd ] && need_qsd=1
missing=$(guest_missing_deps "$need_qsd")
if [ -n "$missing" ]; then
  if [ "${CI:-}" = true ] || [ "${LEAP_REQUIRE_GUEST:-0}" = 1 ]; then
    echo "guest-verify: ERROR: missing $missing (run scripts/install-deps.sh as root)" >&2
    exit 1
  fi
  cat >&2 <<MSG
################################################################################
##  guest-verify: SKIPPED -- the QEMU guest test did NOT run.
##  missing: $missing
##  install with: sudo scripts/install-deps.sh   (LEAP_REQUIRE_GUEST=1 makes this fatal)
################################################################################
MSG
  exit 0
fi

size=$((1024 * 1024 * 1024))
queues=2
mkdir -p "$root/target/guest/logs"
work=$(mktemp -d "$root/target/guest/verify-$backend.XXXXXX")
sock=$work/vhost.sock
if [ ${#sock} -gt 100 ]; then sockdir=$(mktemp -d /tmp/leap-guest.XXXXXX); sock=$sockdir/vhost.sock; else sockdir=""; fi
stamp=$(date +%Y%m%d-%H%M%S)-$$
blog=$root/target/guest/logs/verify-$backend-$stamp.backend.log
glog=$root/target/guest/logs/verify-$backend-$stamp.guest.log

cleanup() {
  local rc=$?
  if backend_alive; then
    kill -KILL "$BACKEND_PID" 2>/dev/null || true
    wait "$BACKEND_PID" 2>/dev/null || true
  fi
  if [ "$keep" = 1 ]; then echo "guest-verify: kept $work" >&2; else rm -rf "$work"; fi
  [ -z "$sockdir" ] || rm -rf "$sockdir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "guest-verify: FAIL ($backend): $*" >&2; exit 1; }

truncate -s "$size" "$work/disk.img"
t0=$(date +%s)
backend_start "$backend" "$work/disk.img" "$sock" "$queues" "$blog" || fail "could not start $backend (log $blog)"
echo "guest-verify: $backend pid $BACKEND_PID serving $sock (log $blog)"

args=(--socket "$sock" --job verify --queues "$queues" --expect-queues "$queues"
      --expect-size-bytes "$size" --log "$glog" --timeout "${LEAP_GUEST_TIMEOUT:-240}")
[ -z "$bsize" ] || args+=(--expect-block-size "$bsize")
if [ "$backend" = leapd ]; then
  args+=(--expect-discard "${LEAP_GUEST_EXPECT_DISCARD:-1}"
         --expect-write-cache "${LEAP_GUEST_EXPECT_WRITE_CACHE-write back}")
else
  args+=(--expect-discard 1 --expect-write-cache "write through" --force-write-back 1)
fi
grc=0
"$here/run-guest.sh" "${args[@]}" || grc=$?

alive=1; backend_alive || alive=0
backend_stop 20
brc=$BACKEND_RC
elapsed=$(( $(date +%s) - t0 ))

[ "$grc" = 0 ] || fail "guest run failed (status $grc; guest log $glog, back end log $blog)"
[ "$alive" = 1 ] || fail "$backend died during the guest run (status $brc); log tail: $(tail -n 20 "$blog")"
if [ "$brc" != 0 ]; then
  if [ "$backend" = leapd ]; then
    fail "leapd exited with status $brc after SIGTERM (must be 0); log tail: $(tail -n 20 "$blog")"
  fi
  echo "guest-verify: note: $backend exited with status $brc after SIGTERM" >&2
fi
echo "guest-verify: PASS backend=$backend size=$size queues=$queues${bsize:+ block_size=$bsize} (${elapsed}s)"
