#!/usr/bin/env bash
# Crash test with a real Linux guest: leapd serves a disk whose writes are rate limited
# (iops-wr=100), so throttled writes wait while reads pass them and leapd holds requests out of
# order; QEMU (chardev reconnect-ms=1000) runs the "crash" job (a verified writer plus a reader).
# Once the workload runs, leapd is killed with SIGKILL and started again on the same socket.
# With inflight tracking (the default) the guest must see only a stall: fio verify passes twice,
# no I/O error reaches the kernel log, and every block fio wrote is on disk (checked again on the
# host with fio --verify_only on the image file).
#
#   tests/guest/guest-crash.sh [--no-inflight] [--keep]
#
# --no-inflight: serve with leapd --no-inflight and expect the guest to FAIL (the restarted leapd
#   replays finished requests and loses unfinished ones): shows the test detects what inflight
#   tracking prevents. Exit 0 only if the failure was seen.
# Env: LEAPD (else target/release/leapd, built if missing); CRASH_WRITE_MB (default 4).
# Missing QEMU/kernel/fio/busybox: fails when CI=true or LEAP_REQUIRE_GUEST=1, else a loud skip.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
root=$GUEST_ROOT

inflight=1 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-inflight) inflight=0; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "guest-crash: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

guest_deps_or_skip guest-crash

mb=${CRASH_WRITE_MB:-4}
mkdir -p "$root/target/guest/logs"
work=$(mktemp -d "$root/target/guest/crash.XXXXXX")
sock=$work/vhost.sock
if [ ${#sock} -gt 100 ]; then sockdir=$(mktemp -d /tmp/leap-guest.XXXXXX); sock=$sockdir/vhost.sock; else sockdir=""; fi
stamp=$(date +%Y%m%d-%H%M%S)-$$
blog=$root/target/guest/logs/crash-$stamp.backend.log
glog=$root/target/guest/logs/crash-$stamp.guest.log
guest_pid=""

cleanup() {
  local rc=$?
  [ -z "$guest_pid" ] || kill "$guest_pid" 2>/dev/null || true
  if backend_alive; then kill -KILL "$BACKEND_PID" 2>/dev/null || true; wait "$BACKEND_PID" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then echo "guest-crash: kept $work" >&2; else rm -rf "$work"; fi
  [ -z "$sockdir" ] || rm -rf "$sockdir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() { echo "guest-crash: FAIL: $*" >&2; exit 1; }

timeout_s=${LEAP_GUEST_TIMEOUT:-180}
if [ "$inflight" = 0 ]; then
  LEAPD_ARGS="${LEAPD_ARGS:-} --no-inflight"
  # Lost requests hang the guest's I/O: its watchdog (timeout - 30 s) reports them.
  timeout_s=${LEAP_GUEST_TIMEOUT:-90}
fi
export LEAPD_ARGS
truncate -s $((256 * 1024 * 1024)) "$work/disk.img"
backend_start leapd "$work/disk.img" "$sock" 1 "$blog" "iops-wr=100" || fail "could not start leapd (log $blog)"
"$here/run-guest.sh" --socket "$sock" --reconnect --job crash --queues 1 --env "CRASH_WRITE_MB=$mb" \
  --log "$glog" --timeout "$timeout_s" > "$work/guest.out" 2>&1 &
guest_pid=$!
for ((i = 0; i < 1800; i++)); do
  grep -q "LEAP-CRASH: running" "$glog" 2>/dev/null && break
  kill -0 "$guest_pid" 2>/dev/null || break
  sleep 0.1
done
grep -q "LEAP-CRASH: running" "$glog" 2>/dev/null || { cat "$work/guest.out" >&2; fail "the guest workload never started"; }
# Let writes pile up behind the rate limit while reads pass them, then kill leapd mid-flight.
sleep 3
kill -KILL "$BACKEND_PID"
wait "$BACKEND_PID" 2>/dev/null || true
echo "guest-crash: leapd killed (SIGKILL) with the workload running"
sleep 1
backend_start leapd "$work/disk.img" "$sock" 1 "$blog" "iops-wr=100" || fail "could not restart leapd (log $blog)"
echo "guest-crash: leapd restarted (pid $BACKEND_PID)"
grc=0
wait "$guest_pid" || grc=$?
guest_pid=""
backend_stop 20
resubmitted=$({ grep -o "resubmitting [0-9]* request" "$blog" || true; } | awk '{ s += $2 } END { print s + 0 }')
echo "guest-crash: requests resubmitted by the restarted leapd: $resubmitted"

if [ "$inflight" = 0 ]; then
  if [ "$grc" = 0 ]; then
    fail "--no-inflight: the guest passed; the test could not tell inflight tracking from none"
  fi
  echo "guest-crash: PASS (--no-inflight: the guest failed as expected: $(grep -m3 -E "FAIL|error" "$glog" | tr '\n' ' '))"
  exit 0
fi
[ "$grc" = 0 ] || { tail -n 30 "$work/guest.out" >&2; fail "the guest saw errors (guest log $glog, leapd log $blog)"; }
# Every block the writer wrote (and fio acknowledged) is in the image file.
fio --name=w --filename="$work/disk.img" --rw=randwrite --bs=4k --offset=0 --size="${mb}M" \
  --randrepeat=1 --verify=crc32c --verify_fatal=1 --verify_only=1 --ioengine=psync \
  --output-format=terse > "$work/host-verify.out" 2>&1 || { cat "$work/host-verify.out" >&2; fail "host-side verify of the image failed"; }
echo "guest-crash: PASS (leapd killed and restarted mid-workload; $resubmitted request(s) resubmitted; host verify of ${mb} MiB ok)"
