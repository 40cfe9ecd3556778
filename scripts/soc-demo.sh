#!/usr/bin/env bash
# The SoC modes on emulated hardware (docs/deployment.md): three parties on this machine.
#
#   tenant VM   QEMU x86_64, RAM in a shared file (memory-backend-file), a vhost-user-blk disk
#               on the host agent's socket; runs fio with crc32c verification
#   host agent  `leapd agent`: terminates vhost-user, relays only control over TCP
#   SoC VM      --mode socvm:   QEMU x86_64 (a SoC VM on a server without a SmartNIC)
#               --mode arm-soc: QEMU aarch64 `-M virt -cpu max`, Debian's 16 KiB-page kernel
#               It maps the tenant's RAM file as a PCI BAR (ivshmem-plain): the window onto host
#               memory; and the agent's inflight file as a second one. leapd serves its local SSD
#               (an emulated NVMe drive) through them.
#
#   scripts/soc-demo.sh --mode socvm|arm-soc [--crash | --crash-agent] [--keep]
#
# --crash: the tenant runs the crash workload (a verified writer and a reader); 3 s in, leapd in
#          the SoC VM is killed with SIGKILL and started again. The tenant must see a stall, not
#          an error: the inflight region travels through the agent.
# --crash-agent: the same workload; 3 s in, the host agent is killed with SIGKILL and started
#          again: the SoC ends the old session (its rings drain), QEMU reconnects to the new agent
#          and hands it the inflight region, and the tenant again sees only a stall.
# --keep:  keep the work directory (logs, SSD image) under target/soc/.
#
# Prints one line and exits 0 only if everything held:
#   soc-demo mode=M verify=PASS window_bytes=N agent_data_bytes=0
# window_bytes: request data the SoC's leapd copied through the window (its bounce counters);
# agent_data_bytes: guest memory the agent had mapped (0: it maps none, checked in
# /proc/PID/maps), so no request data can have passed through it.
# Run as root, it first installs what it needs (scripts/install-deps.sh). Env: LEAPD (host
# leapd), LEAPD_AARCH64 (the SoC's leapd for arm-soc), LEAP_SOC_BOOT_TIMEOUT (s, default 300).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
mode="" crash=0 keep=0 victim=soc
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=$2; shift 2 ;;
    --crash) crash=1; shift ;;
    --crash-agent) crash=1 victim=agent; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "soc-demo: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "soc-demo: $*" >&2; }
die() { echo "soc-demo: ERROR: $*" >&2; exit 1; }
case "$mode" in
  socvm) arch=x86_64 soc_qemu=qemu-system-x86_64 ;;
  arm-soc) arch=aarch64 soc_qemu=qemu-system-aarch64 ;;
  *) die "--mode must be socvm or arm-soc" ;;
esac

# --- what it needs ----------------------------------------------------------------------------
if [ "$(id -u)" = 0 ]; then
  LEAP_INSTALL_SOC=1 LEAP_INSTALL_ARM64=$([ "$mode" = arm-soc ] && echo 1 || echo "${LEAP_INSTALL_ARM64:-0}") \
    scripts/install-deps.sh >&2
fi
for t in qemu-system-x86_64 "$soc_qemu" fio busybox cpio; do
  command -v "$t" >/dev/null || die "$t not found (run scripts/install-deps.sh as root)"
done
leapd=${LEAPD:-}
if [ -z "$leapd" ]; then
  cargo build --release -p leap-soc --bin leapd >&2
  leapd=$root/target/release/leapd
fi
if [ "$mode" = arm-soc ]; then
  soc_leapd=${LEAPD_AARCH64:-}
  if [ -z "$soc_leapd" ]; then
    scripts/build-aarch64.sh --leapd >&2
    soc_leapd=$root/target/aarch64/aarch64-unknown-linux-gnu/release/leapd
  fi
else
  soc_leapd=$leapd
fi
socdir=$(tests/guest/build-soc-initramfs.sh --arch "$arch" --leapd "$soc_leapd" "$root/target/soc")

# --- the machine -------------------------------------------------------------------------------
mkdir -p "$root/target/soc"
work=$(mktemp -d "$root/target/soc/run-$mode.XXXXXX")
sockdir=$(mktemp -d /tmp/leap-soc.XXXXXX)
sock=$sockdir/tenant.sock
ram=/dev/shm/leap-soc-demo-$$
inflight=/dev/shm/leap-soc-demo-inflight-$$
ram_size=512M
port=$((17300 + $$ % 500))
killport=$((port + 500))
stopport=$((port + 1000))
soc_pid="" agent_pid="" tenant_pid=""
cleanup() {
  local rc=$?
  for p in $tenant_pid $agent_pid $soc_pid; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in $tenant_pid $agent_pid $soc_pid; do kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$ram" "$inflight"
  rm -rf "$sockdir"
  if [ "$keep" = 1 ] || [ "$rc" != 0 ]; then log "logs in $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
truncate -s "$ram_size" "$ram"
truncate -s 1G "$work/ssd.img"

# The SoC VM's job environment, appended to its initramfs.
mkdir -p "$work/env/job"
{
  echo "SOC_MODE=$mode"
  echo "SOC_QUEUES=2"
  echo "GUEST_TIMEOUT=3600"
  [ "$crash" = 0 ] || echo "SOC_DISK_OPTS=,iops-wr=100"
} > "$work/env/job/env"
(cd "$work/env" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 -n) > "$work/env.cpio.gz"
cat "$socdir/soc.cpio.gz" "$work/env.cpio.gz" > "$work/soc-initrd.cpio.gz"

# The agent first: it creates the inflight file the SoC VM maps, then waits for the SoC.
start_agent() {
  "$leapd" agent --socket "$sock" --window-file "$ram" --inflight-file "$inflight" \
    --soc "127.0.0.1:$port" >>"$work/agent.log" 2>&1 &
  agent_pid=$!
  for ((i = 0; i < 100; i++)); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { cat "$work/agent.log" >&2; die "the agent did not create $sock"; }
}
start_agent

if [ "$arch" = x86_64 ]; then
  machine=(-machine q35 -cpu max) console=ttyS0
else
  machine=(-machine virt -cpu max) console=ttyAMA0
fi
"$soc_qemu" -accel tcg "${machine[@]}" -m 512M -smp 2 \
  -nographic -monitor none -no-reboot -serial "file:$work/soc.log" \
  -kernel "$socdir/vmlinuz" -initrd "$work/soc-initrd.cpio.gz" \
  -append "console=$console rdinit=/init panic=-1 quiet" \
  -object "memory-backend-file,id=window,mem-path=$ram,size=$ram_size,share=on" \
  -device ivshmem-plain,memdev=window \
  -object "memory-backend-file,id=inflight,mem-path=$inflight,size=1M,share=on" \
  -device ivshmem-plain,memdev=inflight \
  -drive "file=$work/ssd.img,if=none,id=ssd,format=raw" -device nvme,serial=leap-ssd,drive=ssd \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:7300,hostfwd=tcp:127.0.0.1:$killport-:7301,hostfwd=tcp:127.0.0.1:$stopport-:7302" \
  -device virtio-net-pci,netdev=n0,romfile= \
  </dev/null >"$work/soc-qemu.log" 2>&1 &
soc_pid=$!
log "SoC VM ($soc_qemu, pid $soc_pid) booting; console $work/soc.log"
limit=${LEAP_SOC_BOOT_TIMEOUT:-300}
for ((i = 0; i < limit * 2; i++)); do
  grep -q "to host agents on" "$work/soc.log" 2>/dev/null && break
  kill -0 "$soc_pid" 2>/dev/null || { cat "$work/soc-qemu.log" >&2; die "the SoC VM exited"; }
  grep -q "LEAP-GUEST: FAIL" "$work/soc.log" 2>/dev/null && { tail -n 30 "$work/soc.log" >&2; die "the SoC VM's job failed"; }
  sleep 0.5
done
grep -q "to host agents on" "$work/soc.log" || { tail -n 30 "$work/soc.log" >&2; die "leapd in the SoC VM did not start within ${limit}s"; }
log "SoC leapd up after $((i / 2)) s: $(grep -m1 -o 'platform [^)]*)' "$work/soc.log" | tr -d '\r')"

# --- the tenant's workload -----------------------------------------------------------------------
tenant=(tests/guest/run-guest.sh --socket "$sock" --reconnect --mem "$ram_size" --mem-file "$ram"
        --log "$work/tenant.log")
if [ "$crash" = 0 ]; then
  tenant+=(--job verify --queues 2 --verify-size-mb 16 --expect-size-bytes $((1 << 30)) --expect-discard 1)
else
  tenant+=(--job crash --queues 1 --env CRASH_WRITE_MB=4 --timeout 400)
fi
"${tenant[@]}" >"$work/tenant.out" 2>&1 &
tenant_pid=$!
if [ "$crash" = 1 ]; then
  for ((i = 0; i < 3000; i++)); do
    grep -q "LEAP-CRASH: running" "$work/tenant.log" 2>/dev/null && break
    kill -0 "$tenant_pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 3
  if [ "$victim" = soc ]; then
    # The SoC VM's job kills its leapd on a connection to this port, then starts it again.
    exec 3<>"/dev/tcp/127.0.0.1/$killport" && exec 3>&- || die "could not reach the SoC VM's kill port"
    log "asked the SoC VM to kill leapd (SIGKILL) mid-workload"
  else
    kill -KILL "$agent_pid"
    wait "$agent_pid" 2>/dev/null || true
    log "killed the agent (SIGKILL) mid-workload; starting it again"
    sleep 1
    start_agent
  fi
fi
verify=PASS
wait "$tenant_pid" || verify=FAIL
tenant_pid=""
[ "$verify" = PASS ] || { tail -n 40 "$work/tenant.out" >&2; log "tenant failed; SoC console tail:"; tail -n 20 "$work/soc.log" >&2; }

# The agent must not have mapped the tenant's memory: then no request data passed through it.
mapped=0
if [ -r "/proc/$agent_pid/maps" ]; then
  while read -r range _ _ _ _ path; do
    [ "$path" = "$ram" ] || continue
    mapped=$((mapped + 0x${range#*-} - 0x${range%-*}))
  done < "/proc/$agent_pid/maps"
else
  mapped=unknown
fi
kill -TERM "$agent_pid"
wait "$agent_pid" || true
agent_pid=""
# Stop the SoC's leapd cleanly (in-flight I/O completes, the SSD is synced); the VM powers off.
exec 3<>"/dev/tcp/127.0.0.1/$stopport" && exec 3>&- || die "could not reach the SoC VM's stop port"
for ((i = 0; i < 120; i++)); do
  kill -0 "$soc_pid" 2>/dev/null || break
  sleep 0.5
done
kill -0 "$soc_pid" 2>/dev/null && { tail -n 20 "$work/soc.log" >&2; die "the SoC VM did not power off after leapd was stopped"; }
wait "$soc_pid" 2>/dev/null || true
soc_pid=""
grep -q "LEAP-SOC: stopped" "$work/soc.log" || { tail -n 20 "$work/soc.log" >&2; die "leapd in the SoC VM did not stop cleanly"; }
window_bytes=$(grep -o "window_bytes_total=[0-9]*" "$work/soc.log" | tail -1 | cut -d= -f2)
window_bytes=${window_bytes:-0}
resubmitted=$({ grep -o "resubmitting [0-9]* request" "$work/soc.log" || true; } | awk '{ s += $2 } END { print s + 0 }')

extra=""
[ "$crash" = 0 ] || extra=" crash=$victim resubmitted=$resubmitted"
echo "soc-demo mode=$mode verify=$verify window_bytes=$window_bytes agent_data_bytes=$mapped$extra"
[ "$verify" = PASS ] || exit 1
[ "$mapped" = 0 ] || die "the agent mapped $mapped bytes of the tenant's memory"
[ "$window_bytes" -gt 0 ] || die "no request data went through the SoC's window"
if [ "$crash" = 1 ] && [ "$victim" = soc ]; then
  grep -q "killed leapd" "$work/soc.log" || die "the SoC's leapd was never killed"
  [ "$resubmitted" -gt 0 ] || die "the restarted leapd resubmitted nothing: the crash hit no request in flight"
fi
if [ "$crash" = 1 ] && [ "$victim" = agent ]; then
  [ "$(grep -c "host agent .* connected" "$work/soc.log")" -ge 2 ] || die "the SoC never served the restarted agent"
fi
if [ "$crash" = 1 ]; then
  # What the tenant wrote is on the SoC's SSD (the emulated NVMe drive's image).
  fio --name=w --filename="$work/ssd.img" --rw=randwrite --bs=4k --offset=0 --size=4M \
    --randrepeat=1 --verify=crc32c --verify_fatal=1 --verify_only=1 --ioengine=psync \
    --output-format=terse > "$work/ssd-verify.out" 2>&1 \
    || { cat "$work/ssd-verify.out" >&2; die "host-side verify of the SoC's SSD image failed"; }
fi
exit 0
