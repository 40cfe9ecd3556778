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

# run_fio LABEL FIO-ARGS...: runs fio, reports ok/fail with its duration.
run_fio() {
  label=$1; shift
  s=$(uptime_s)
  if out=$(fio "$@" 2>&1); then
    ok "fio $label ($(awk -v a="$s" -v b="$(uptime_s)" 'BEGIN{printf "%.1f", b-a}') s)"
    return 0
  fi
  echo "$out" | tail -n 20
  fail "fio $label failed"
  return 1
}

# net_up: the user-mode network's fixed addresses (QEMU slirp: guest 10.0.2.15, host 10.0.2.2).
net_up() {
  ip link set lo up
  ip link set eth0 up || return 1
  ip addr add 10.0.2.15/24 dev eth0 || return 1
  ip route add default via 10.0.2.2 2>/dev/null || true
}

# load_ondemand MODULE...: insmod the named modules (and whatever on-demand modules precede them
# in dependency order).
load_ondemand() {
  for want in "$@"; do
    while read -r m; do
      [ -n "$m" ] || continue
      insmod "/lib/modules/leap/$m" 2>/dev/null || true
      [ "${m%.ko}" = "$want" ] && break
    done < /etc/leap-modules-ondemand
  done
}
