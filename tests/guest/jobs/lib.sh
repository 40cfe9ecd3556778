# shellcheck shell=sh
# Helpers sourced by the guest job scripts (busybox sh). /job/env is already sourced by /init.
# A failed check appends a line to $LEAP_FAILFILE; /init turns that into "LEAP-GUEST: FAIL ...".
DEV=${DEV:-/dev/vda}
SYS=/sys/block/${DEV#/dev/}

note() { echo "LEAP-CHECK: $*"; }
fail() { echo "LEAP-CHECK: FAIL $*"; echo "$*" >> "$LEAP_FAILFILE"; }
die() { fail "$@"; exit 1; }
ok() { echo "LEAP-CHECK: ok $*"; }

# wait_for_disk SECONDS
wait_for_disk() {
  i=0
  while [ ! -b "$DEV" ] || [ ! -e "$SYS/size" ]; do
    i=$((i + 1))
    [ "$i" -gt $(($1 * 10)) ] && return 1
    sleep 0.1
  done
  return 0
}

# /sys/block/X/stat fields (1-based): 1 reads, 5 writes, 12 discards, 16 flushes
blkstat() { awk -v f="$1" '{ print ($f == "" ? 0 : $f) }' "$SYS/stat"; }

fio_engine() {
  if fio --enghelp 2>/dev/null | grep -qw libaio; then echo libaio; else echo psync; fi
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

nqueues() { n=0; for q in "$SYS"/mq/*; do [ -e "$q" ] && n=$((n + 1)); done; echo "$n"; }
