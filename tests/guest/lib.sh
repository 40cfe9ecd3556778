# Host-side helpers for Leap's guest scripts (bash; sourced, not run).
#   guest_missing_deps          prints what the guest tests need but cannot find (empty: all there)
#   guest_deps_or_skip WHO [CMD...]  returns if the guest tests' tools (and CMDs) are there;
#                               otherwise exits: 1 with CI=true or LEAP_REQUIRE_GUEST=1, else 0
#                               after a loud SKIPPED banner
#   backend_start KIND IMG SOCK QUEUES LOG [EXTRA]   KIND = leapd | qsd; sets BACKEND_PID
#   backend_stop [TIMEOUT_S]    SIGTERM + wait; sets BACKEND_RC (exit status, 124 if it hung)
#   proc_cpu_ticks PID          utime+stime of PID (all threads) in clock ticks
#   leapd_path                  prints the leapd binary (LEAPD, else builds target/release/leapd)
# shellcheck shell=bash

GUEST_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BACKEND_PID=""
BACKEND_KIND=""
BACKEND_RC=""

guest_missing_deps() {
  local need_qsd=${1:-0} m=() k="" f
  command -v "${QEMU:-qemu-system-x86_64}" >/dev/null || m+=("qemu-system-x86_64")
  command -v fio >/dev/null || m+=("fio")
  command -v nvme >/dev/null || m+=("nvme(-cli)")
  command -v busybox >/dev/null || m+=("busybox(-static)")
  command -v cpio >/dev/null || m+=("cpio")
  for f in /boot/vmlinuz-*; do [ -e "$f" ] && k=$f; done
  if [ -z "$k" ] || [ ! -r "$k" ]; then m+=("guest kernel (/boot/vmlinuz-*, linux-image-amd64)")
  elif [ ! -f "/lib/modules/${k#/boot/vmlinuz-}/modules.dep" ]; then m+=("/lib/modules/${k#/boot/vmlinuz-}")
  fi
  [ "$need_qsd" = 1 ] && ! command -v qemu-storage-daemon >/dev/null && m+=("qemu-storage-daemon")
  echo "${m[*]}"
}

guest_deps_or_skip() {
  local who=$1 missing c
  shift
  missing=$(guest_missing_deps 0)
  for c in "$@"; do command -v "$c" >/dev/null || missing="${missing:+$missing }$c"; done
  [ -n "$missing" ] || return 0
  if [ "${CI:-}" = true ] || [ "${LEAP_REQUIRE_GUEST:-0}" = 1 ]; then
    echo "$who: FAIL: missing $missing (scripts/install-deps.sh installs them)" >&2
    exit 1
  fi
  echo "########################################################################" >&2
  echo "$who: SKIPPED -- these guest tests did NOT run: missing $missing" >&2
  echo "(scripts/install-deps.sh installs them; CI=true or LEAP_REQUIRE_GUEST=1 makes this fatal)" >&2
  echo "########################################################################" >&2
  exit 0
}

leapd_path() {
  if [ -n "${LEAPD:-}" ]; then
    [ -x "$LEAPD" ] || { echo "LEAPD=$LEAPD is not an executable" >&2; return 1; }
    echo "$LEAPD"; return 0
  fi
  # always ask cargo: a no-op when up to date, and never a stale binary
  echo "building leapd (cargo build --release -p leap-soc)" >&2
  (cd "$GUEST_ROOT" && cargo build --release -p leap-soc >&2) || { echo "cargo build --release -p leap-soc failed" >&2; return 1; }
  [ -x "$GUEST_ROOT/target/release/leapd" ] || { echo "target/release/leapd missing after the build" >&2; return 1; }
  echo "$GUEST_ROOT/target/release/leapd"
}

# backend_start KIND IMG SOCK QUEUES LOG [EXTRA_DISK_OPTS]
backend_start() {
  local kind=$1 img=$2 sock=$3 queues=$4 log=$5 extra=${6:-} bin i extra_args=()
  rm -f "$sock"
  case "$kind" in
    leapd)
      bin=$(leapd_path) || return 1
      read -r -a extra_args <<< "${LEAPD_ARGS:-}"
      RUST_LOG=${RUST_LOG:-info} "$bin" serve --socket "$sock" --disk "$img${extra:+,$extra}" \
        --queues "$queues" "${extra_args[@]}" >"$log" 2>&1 &
      ;;
    qsd)
      qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$img,discard=unmap${extra:+,$extra}" \
        --blockdev driver=raw,node-name=d,file=f,discard=unmap \
        --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues" \
        >"$log" 2>&1 &
      ;;
    *) echo "unknown back end '$kind' (leapd|qsd)" >&2; return 1 ;;
  esac
  BACKEND_PID=$!
  BACKEND_KIND=$kind
  for ((i = 0; i < 300; i++)); do
    [ -S "$sock" ] && return 0
    if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
      wait "$BACKEND_PID" 2>/dev/null && BACKEND_RC=0 || BACKEND_RC=$?
      echo "$kind exited (status $BACKEND_RC) before creating $sock; its log:" >&2
      tail -n 30 "$log" >&2
      BACKEND_PID=""
      return 1
    fi
    sleep 0.1
  done
  echo "$kind did not create $sock within 30 s; its log:" >&2
  tail -n 30 "$log" >&2
  return 1
}

backend_alive() { [ -n "$BACKEND_PID" ] && kill -0 "$BACKEND_PID" 2>/dev/null; }

# backend_stop [TIMEOUT_S]: SIGTERM, wait; SIGKILL after the timeout (BACKEND_RC=124)
backend_stop() {
  local t=${1:-20} i
  BACKEND_RC=""
  [ -n "$BACKEND_PID" ] || return 0
  if kill -0 "$BACKEND_PID" 2>/dev/null; then
    kill -TERM "$BACKEND_PID" 2>/dev/null || true
    for ((i = 0; i < t * 10; i++)); do
      kill -0 "$BACKEND_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$BACKEND_PID" 2>/dev/null; then
      echo "$BACKEND_KIND (pid $BACKEND_PID) ignored SIGTERM for ${t}s: SIGKILL" >&2
      kill -KILL "$BACKEND_PID" 2>/dev/null || true
      wait "$BACKEND_PID" 2>/dev/null || true
      BACKEND_RC=124 BACKEND_PID=""
      return 0
    fi
  fi
  wait "$BACKEND_PID" 2>/dev/null && BACKEND_RC=0 || BACKEND_RC=$?
  BACKEND_PID=""
}

proc_cpu_ticks() {
  # fields after "(comm)": state is 1st, utime 12th, stime 13th (stat fields 14 and 15)
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }
  awk '{ print $12 + $13 }' <<< "$s"
}
