# shellcheck shell=sh
# The SoC VM's job (scripts/soc-demo.sh): bring up the control network, find the local SSD (an
# emulated NVMe drive) and serve it with leapd in a SoC mode to the host agent, whose connection
# arrives through QEMU's user network (host 127.0.0.1:PORT -> 10.0.2.15:7300). leapd is started
# again whenever it exits. A connection to port 7301 kills it with SIGKILL (the crash test); one
# to port 7302 stops it with SIGTERM (it completes in-flight I/O and syncs the SSD) and ends the
# job, and the VM powers off.
# Env (from /job/env): SOC_MODE (socvm|arm-soc), SOC_QUEUES, SOC_DISK (default /dev/nvme0n1),
# SOC_DISK_OPTS (appended to the disk spec, e.g. ,iops-wr=100).
. /job/lib.sh
disk=${SOC_DISK:-/dev/nvme0n1}
ip link set lo up
ip link set eth0 up || die "no eth0 (virtio-net)"
ip addr add 10.0.2.15/24 dev eth0
i=0
while [ ! -b "$disk" ]; do
  i=$((i + 1)); [ "$i" -gt 300 ] && die "$disk did not appear"
  sleep 0.1
done
echo "LEAP-SOC: up: $(uname -m), kernel $(uname -r), local SSD $disk ($(cat /sys/block/${disk#/dev/}/size) sectors)"
( while :; do
    nc -l -p 7301 < /dev/null > /dev/null 2>&1 || sleep 1
    pid=$(pidof leapd)
    [ -n "$pid" ] && kill -KILL $pid && echo "LEAP-SOC: killed leapd ($pid) with SIGKILL"
  done ) &
( nc -l -p 7302 < /dev/null > /dev/null 2>&1
  touch /run/leap-soc-stop
  pid=$(pidof leapd)
  echo "LEAP-SOC: stopping leapd ($pid)"
  [ -n "$pid" ] && kill -TERM $pid ) &
n=0
rc=0
while [ ! -e /run/leap-soc-stop ]; do
  n=$((n + 1))
  echo "LEAP-SOC: starting leapd ($n)"
  RUST_LOG=${RUST_LOG:-info} RUST_LOG_STYLE=never leapd serve --mode "$SOC_MODE" --listen 0.0.0.0:7300 \
    --disk "$disk${SOC_DISK_OPTS:-}" --queues "${SOC_QUEUES:-2}"
  rc=$?
  echo "LEAP-SOC: leapd exited with status $rc"
  sleep 0.5
done
sync
[ "$rc" = 0 ] || die "leapd's last run ended with status $rc"
echo "LEAP-SOC: stopped"
