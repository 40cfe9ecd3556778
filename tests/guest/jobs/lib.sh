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

# load_ondemand MODULE...: insmod the named on-demand modules (names as in build-initramfs.sh's
# ondemand_modules, e.g. nvmet_tcp vfio_pci nvme), each with its dependencies first. A module
# already loaded is fine. Returns 1 (saying why) when one cannot be loaded.
load_ondemand() {
  for want in "$@"; do
    line=$(grep "^$want\( \|$\)" /etc/leap-modules-ondemand-deps 2>/dev/null)
    if [ -z "$line" ]; then
      echo "load_ondemand: $want is not an on-demand module of this initramfs (build-initramfs.sh)"
      return 1
    fi
    for m in ${line#"$want"}; do
      if ! insmod "/lib/modules/leap/$m" 2>/run/insmod.err && ! grep -q "File exists" /run/insmod.err; then
        echo "load_ondemand: insmod $m (for $want): $(cat /run/insmod.err)"
        return 1
      fi
    done
  done
  return 0
}

# kill_tree PID [SIGNAL]: signal PID and every descendant (children first, found through
# /proc/*/stat's parent field)
kill_tree() {
  # shellcheck disable=SC2013  # PIDs are words
  for c in $(awk -v p="$1" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null); do
    kill_tree "$c" "${2:-TERM}"
  done
  kill "-${2:-TERM}" "$1" 2>/dev/null
}

# run_bounded SECONDS WHAT CMD...: the job's own bound on a command (/init's run_bounded powers the
# guest off; this one does not): runs CMD; if it has not finished after SECONDS, reports WHAT as
# a failed check, kills CMD with its descendants (SIGTERM, then SIGKILL after 3 s) and returns
# 124. Otherwise returns CMD's status.
run_bounded() {
  rb_limit=$1 rb_what=$2; shift 2
  "$@" &
  rb_pid=$!
  rb_ticks=0
  while kill -0 "$rb_pid" 2>/dev/null; do
    rb_ticks=$((rb_ticks + 1))
    if [ "$rb_ticks" -gt $((rb_limit * 5)) ]; then
      fail "$rb_what did not finish within ${rb_limit}s"
      kill_tree "$rb_pid" TERM
      sleep 3
      kill_tree "$rb_pid" KILL
      wait "$rb_pid" 2>/dev/null
      return 124
    fi
    sleep 0.2
  done
  wait "$rb_pid"
}

# --- PCI NVMe controller (run-guest.sh --nvme) and its drivers ---------------------------------
# nvme_pci_bdf: prints the PCI address of the first NVMe controller (class 0x010802); returns 1
# when there is none.
nvme_pci_bdf() {
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class" 2>/dev/null)" = 0x010802 ] || continue
    echo "${d##*/}"
    return 0
  done
  return 1
}

# pci_driver BDF: prints the name of the driver bound to BDF (empty: none)
pci_driver() {
  [ -e "/sys/bus/pci/devices/$1/driver" ] || return 0
  basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
}

# bind_vfio BDF: binds BDF to vfio-pci (loading the VFIO modules) and waits for its group's
# /dev/vfio/N. Sets VFIO_GROUP. On failure reports a failed check and returns 1.
bind_vfio() {
  bv=$1 d=/sys/bus/pci/devices/$1
  [ -e "$d" ] || { fail "bind_vfio: no PCI device $bv"; return 1; }
  if [ -z "$(ls /sys/kernel/iommu_groups 2>/dev/null)" ]; then
    fail "bind_vfio: no IOMMU groups: the guest needs an IOMMU (run-guest.sh --nvme adds -device intel-iommu,intremap=on and intel_iommu=on)"
    return 1
  fi
  [ -e "$d/iommu_group" ] || { fail "bind_vfio: $bv is in no IOMMU group"; return 1; }
  VFIO_GROUP=$(basename "$(readlink "$d/iommu_group")")
  if ! out=$(load_ondemand vfio_pci vfio_iommu_type1); then
    fail "bind_vfio: cannot load the VFIO modules: $out"
    return 1
  fi
  [ -d /sys/bus/pci/drivers/vfio-pci ] || { fail "bind_vfio: vfio-pci loaded but /sys/bus/pci/drivers/vfio-pci is missing"; return 1; }
  drv=$(pci_driver "$bv")
  if [ "$drv" != vfio-pci ]; then
    [ -z "$drv" ] || echo "$bv" > "/sys/bus/pci/drivers/$drv/unbind" || { fail "bind_vfio: cannot unbind $bv from $drv"; return 1; }
    echo vfio-pci > "$d/driver_override" || { fail "bind_vfio: cannot set $bv's driver_override"; return 1; }
    echo "$bv" > /sys/bus/pci/drivers_probe 2>/run/bind.err
  fi
  i=0
  while [ "$(pci_driver "$bv")" != vfio-pci ] || [ ! -c "/dev/vfio/$VFIO_GROUP" ]; do
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then
      fail "bind_vfio: $bv not bound to vfio-pci with /dev/vfio/$VFIO_GROUP after 10 s (driver '$(pci_driver "$bv")', $(cat /run/bind.err 2>/dev/null); dmesg: $(dmesg | grep -iE 'vfio|DMAR' | tail -n 3 | tr '\n' ' '))"
      return 1
    fi
    sleep 0.1
  done
  [ -c /dev/vfio/vfio ] || { fail "bind_vfio: no /dev/vfio/vfio"; return 1; }
  # without interrupt remapping vfio_iommu_type1 refuses VFIO_SET_IOMMU (EPERM)
  if ! dmesg | grep -q "DMAR-IR: Enabled IRQ remapping" \
     && [ "$(cat /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts 2>/dev/null)" != Y ]; then
    note "WARNING: the IOMMU does no interrupt remapping: VFIO_SET_IOMMU will fail with EPERM (QEMU: -device intel-iommu,intremap=on)"
  fi
  # other devices in the group must be bound to vfio-pci too (or to nothing) for VFIO to open it
  for m in /sys/kernel/iommu_groups/"$VFIO_GROUP"/devices/*; do
    [ "${m##*/}" = "$bv" ] && continue
    note "bind_vfio: group $VFIO_GROUP also holds ${m##*/} (driver '$(pci_driver "${m##*/}")')"
  done
  return 0
}

# nvme_ns_dev BDF: prints the block device of namespace 1 of the kernel's controller on BDF. With
# native multipath (Debian's kernel) it is the subsystem's head (/dev/nvme<subsys>n1), not a
# name under the controller (nvme<ctrl>c<ctrl>n1 has no device node).
nvme_ns_dev() {
  for c in /sys/bus/pci/devices/"$1"/nvme/nvme*; do
    [ -e "$c" ] || continue
    cn=${c##*/}
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
      [ -e "$s/$cn" ] || continue
      for n in "$s"/nvme*n1; do
        case "${n##*/}" in *c*n*) continue ;; esac
        [ -e "$n/size" ] && echo "/dev/${n##*/}" && return 0
      done
    done
    [ -e "$c/${cn}n1/size" ] && echo "/dev/${cn}n1" && return 0
  done
  return 1
}

# bind_kernel_nvme BDF: gives BDF back to the kernel's nvme driver (loading it) and waits for the
# namespace's block device. Sets NVME_DEV (e.g. /dev/nvme0n1). On failure reports a failed check
# and returns 1.
bind_kernel_nvme() {
  bk=$1 d=/sys/bus/pci/devices/$1
  [ -e "$d" ] || { fail "bind_kernel_nvme: no PCI device $bk"; return 1; }
  drv=$(pci_driver "$bk")
  if [ -n "$drv" ] && [ "$drv" != nvme ]; then
    echo "$bk" > "/sys/bus/pci/drivers/$drv/unbind" || { fail "bind_kernel_nvme: cannot unbind $bk from $drv"; return 1; }
  fi
  echo > "$d/driver_override" || { fail "bind_kernel_nvme: cannot clear $bk's driver_override"; return 1; }
  if ! out=$(load_ondemand nvme); then
    fail "bind_kernel_nvme: cannot load nvme: $out"
    return 1
  fi
  [ "$(pci_driver "$bk")" = nvme ] || echo "$bk" > /sys/bus/pci/drivers_probe 2>/dev/null
  NVME_DEV=""
  i=0
  while :; do
    NVME_DEV=$(nvme_ns_dev "$bk") && [ -b "$NVME_DEV" ] && break
    NVME_DEV=""
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then
      fail "bind_kernel_nvme: no namespace block device for $bk after 30 s (driver '$(pci_driver "$bk")'; dmesg: $(dmesg | grep -iE 'nvme|DMAR' | tail -n 3 | tr '\n' ' '))"
      return 1
    fi
    sleep 0.1
  done
  return 0
}

# dmar_faults: how many remapping faults the kernel logged (the IOMMU blocked a device's DMA or
# interrupt; one "DMAR: [DMA Read ...] Request device [..] fault addr ..." line each)
dmar_faults() { dmesg | grep -cE "DMAR: \[(DMA (Read|Write)|INTR-REMAP)" ; }
