#!/usr/bin/env bash
# Boots a QEMU (TCG) guest, optionally with a vhost-user-blk disk served on SOCK and a user-mode
# network and/or an emulated NVMe controller behind an emulated IOMMU, runs a job
# (tests/guest/jobs/JOB.sh) inside it and checks the result.
#
#   tests/guest/run-guest.sh [--socket SOCK] --job verify|bench|crash|nvmf-host|nvmf-target|vfio [options]
#     --net                      add a virtio-net NIC on QEMU's user-mode network (the guest is
#                                10.0.2.15 and reaches the host's 127.0.0.1 at 10.0.2.2)
#     --hostfwd SPEC             with --net: forward a host port to the guest, e.g.
#                                tcp:127.0.0.1:14420-:4420 (loopback only; repeatable)
#     --env KEY=VALUE            pass a variable to the job (repeatable)
#     --nvme IMG                 add an emulated NVMe controller (serial leapvfio, PCI 0000:00:04.0)
#                                on the raw image IMG, behind an emulated Intel IOMMU
#                                (-device intel-iommu,intremap=on; kernel argument intel_iommu=on),
#                                for vfio-pci in the guest. No driver binds it at boot (the guest's
#                                nvme and vfio modules load on demand: jobs/lib.sh bind_vfio and
#                                bind_kernel_nvme). Env LEAP_GUEST_NVME_CACHE: the drive's cache
#                                mode (default writeback; none needs O_DIRECT, so not on tmpfs)
#     --nvme-args EXTRA          with --nvme: appended to the nvme device, e.g. max_ioqpairs=4
#     --file SRC:DEST            copy the host file SRC into the guest at DEST (absolute, e.g.
#                                /job/bin/leapd), mode kept (repeatable; static binaries only:
#                                the guest has no libraries but fio's)
#     --queues N                 num-queues of vhost-user-blk-pci (default 1)
#     --reconnect                QEMU reconnects to SOCK when the back end goes away
#                                (chardev reconnect-ms=1000), as for a back end that may restart
#     --expect-size-bytes B      verify: disk size in bytes
#     --expect-queues N          verify: hardware queues the guest sees (default: --queues)
#     --expect-discard 0|1       verify: discard must be supported and work (default 0)
#     --expect-write-cache MODE  verify: "write back" (default), "write through", or "" to skip
#     --expect-block-size N      verify: logical block size
#     --force-write-back 0|1     verify: if the disk comes up write through, switch it to write back
#                                (virtio config write) so FLUSH is exercised (default 0)
#     --verify-size-mb N         verify: MiB per fio verify job (default 64)
#     --bench-runtime S          bench: seconds per fio job (default 5)
#     --bench-jobs "A B"         bench: subset of randread-qd1 randread-qd32 randwrite-qd32 seqread-128k-qd8
#     --timeout S                hard limit for QEMU (default 240 verify / 300 bench)
#     --log FILE                 serial console log (default target/guest/logs/<job>-<time>-<pid>.log)
#     --mem SIZE                 guest RAM (default 768M)
#     --mem-file FILE            guest RAM is FILE (memory-backend-file, shared), which another
#                                party can map (the SoC VM's window onto the tenant's memory)
#     --smp N                    guest CPUs (default 2)
# Exit status: 0 only if the guest printed "LEAP-GUEST: PASS", no check failed and QEMU exited
# cleanly; on failure the tail of the guest log (and QEMU's stderr) is printed.
# bench: the guest's "GUEST-FIO ..." and "GUEST-STAT ..." lines are copied to stdout; so are any
# job's "GUEST-BENCH ..." lines (vfio).
# Env: QEMU (default qemu-system-x86_64), LEAP_GUEST_ACCEL (default tcg), LEAP_GUEST_CPU (default max),
#      LEAP_GUEST_BOOT_TIMEOUT (s, default 90: a guest that has not reached init by then is
#      booted once more — TCG occasionally stalls in early boot), LEAP_GUEST_APPEND (extra kernel arguments; e.g. "loglevel=7" with LEAP_GUEST_QUIET=0 to see
#      the kernel's messages), LEAP_GUEST_QEMU_ARGS (extra QEMU arguments, split on spaces).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
die() { echo "run-guest: ERROR: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

sock="" job="" queues=1 expect_size="" expect_queues="" expect_discard=0
expect_wc="write back" expect_bs="" force_wb=0 verify_mb=64 bench_rt=5 bench_jobs="" timeout_s="" log=""
mem=768M mem_file="" smp=2 net=0 hostfwd="" envs=() reconnect="" nvme_img="" nvme_args="" files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --socket) sock=$2; shift 2 ;;
    --job) job=$2; shift 2 ;;
    --queues) queues=$2; shift 2 ;;
    --expect-size-bytes) expect_size=$2; shift 2 ;;
    --expect-queues) expect_queues=$2; shift 2 ;;
    --expect-discard) expect_discard=$2; shift 2 ;;
    --expect-write-cache) expect_wc=$2; shift 2 ;;
    --expect-block-size) expect_bs=$2; shift 2 ;;
    --force-write-back) force_wb=$2; shift 2 ;;
    --verify-size-mb) verify_mb=$2; shift 2 ;;
    --bench-runtime) bench_rt=$2; shift 2 ;;
    --bench-jobs) bench_jobs=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --mem-file) mem_file=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --net) net=1; shift ;;
    --reconnect) reconnect=",reconnect-ms=1000"; shift ;;
    --hostfwd) hostfwd=${hostfwd:+$hostfwd,hostfwd=}$2; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --nvme) nvme_img=$2; shift 2 ;;
    --nvme-args) nvme_args=$2; shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -z "$sock" ] || [ -S "$sock" ] || die "$sock is not a unix socket (is the back end running?)"
[ -n "$job" ] && [ -f "$here/jobs/$job.sh" ] || die "--job must name a script in $here/jobs (verify, bench, crash, nvmf-host, nvmf-target, vfio)"
case "$job" in verify|bench|crash) [ -n "$sock" ] || die "--job $job needs --socket" ;; esac
for f in ${hostfwd//,hostfwd=/ }; do
  case "$f" in tcp:127.0.0.1:*) ;; *) die "--hostfwd must forward from 127.0.0.1 (tcp:127.0.0.1:HOSTPORT-:GUESTPORT)" ;; esac
done
if [ -n "$nvme_img" ]; then
  [ -f "$nvme_img" ] || [ -b "$nvme_img" ] || die "--nvme $nvme_img: no such image (create it, e.g. truncate -s 256M IMG)"
  case "$nvme_img" in *,*) die "--nvme $nvme_img: the path must not contain a comma" ;; esac
else
  [ -z "$nvme_args" ] || die "--nvme-args needs --nvme"
fi
for f in ${files[@]+"${files[@]}"}; do
  case "$f" in
    *:/*) [ -f "${f%:*}" ] || die "--file $f: ${f%:*} is not a file" ;;
    *) die "--file $f: must be SRC:DEST with an absolute DEST" ;;
  esac
  case "${f##*:}" in */../*|*/..|/init|/job/run.sh|/job/lib.sh|/job/env) die "--file $f: DEST ${f##*:} not allowed" ;; esac
done
[ -n "$expect_queues" ] || expect_queues=$queues
[ -n "$timeout_s" ] || { [ "$job" = verify ] && timeout_s=240 || timeout_s=300; }
qemu=${QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || die "$qemu not found (scripts/install-deps.sh)"

gdir=$root/target/guest
mkdir -p "$gdir/logs" "$gdir/runs"
[ -n "$log" ] || log=$gdir/logs/$job-$(date +%Y%m%d-%H%M%S)-$$.log
mkdir -p "$(dirname "$log")"
: > "$log"
qerr=$log.qemu-stderr

base=$("$here/build-initramfs.sh" "$gdir")
kernel=$gdir/vmlinuz

run=$(mktemp -d "$gdir/runs/$job.XXXXXX")
qpid=""
# stop_qemu: SIGTERM to our `timeout` process (it relays the signal to QEMU), then SIGKILL to
# QEMU (timeout's child, by PID) and timeout if they are still there after 3 s
# shellcheck disable=SC2317  # also invoked by the trap
stop_qemu() {
  local i c
  [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null || return 0
  kill -TERM "$qpid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do kill -0 "$qpid" 2>/dev/null || return 0; sleep 0.1; done
  for c in $(pgrep -P "$qpid" 2>/dev/null); do kill -KILL "$c" 2>/dev/null || true; done
  kill -KILL "$qpid" 2>/dev/null || true
}
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  stop_qemu
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# per-run cpio: /job/{run.sh,lib.sh,env}
mkdir -p "$run/cpio/job"
cp "$here/jobs/$job.sh" "$run/cpio/job/run.sh"
cp "$here/jobs/lib.sh" "$run/cpio/job/lib.sh"
for f in ${files[@]+"${files[@]}"}; do
  dest=$run/cpio/${f##*:}
  mkdir -p "$(dirname "$dest")"
  cp -p "${f%:*}" "$dest"
done
q() { printf '%s=%q\n' "$1" "$2"; }
{
  q EXPECT_SIZE_BYTES "$expect_size"
  q EXPECT_QUEUES "$expect_queues"
  q EXPECT_DISCARD "$expect_discard"
  q EXPECT_WRITE_CACHE "$expect_wc"
  q EXPECT_BLOCK_SIZE "$expect_bs"
  q FORCE_WRITE_BACK "$force_wb"
  q VERIFY_SIZE_MB "$verify_mb"
  q BENCH_RUNTIME "$bench_rt"
  # the guest's own watchdog fires first and reports stuck I/O; QEMU's timeout is the backstop
  q GUEST_TIMEOUT "$(( timeout_s > 60 ? timeout_s - 30 : timeout_s / 2 ))"
  [ -z "$bench_jobs" ] || q BENCH_JOBS "$bench_jobs"
  for kv in ${envs[@]+"${envs[@]}"}; do q "${kv%%=*}" "${kv#*=}"; done
} > "$run/cpio/job/env"
# printf %q may emit $'..' quoting that busybox sh does not know: refuse such values
grep -q "\\\$'" "$run/cpio/job/env" && die "an --expect value contains characters the guest shell cannot take"
(cd "$run/cpio" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 -n) > "$run/job.cpio.gz"
cat "$base" "$run/job.cpio.gz" > "$run/initrd.cpio.gz"

append="console=ttyS0 rdinit=/init panic=-1 edd=off"  # edd: no BIOS disk I/O at boot
[ "${LEAP_GUEST_QUIET:-1}" = 0 ] || append="$append quiet"
[ -z "${LEAP_GUEST_APPEND:-}" ] || append="$append $LEAP_GUEST_APPEND"
read -r -a extra_qemu <<< "${LEAP_GUEST_QEMU_ARGS:-}"
machine=q35,memory-backend=mem
dev_args=()
if [ -n "$nvme_img" ]; then
  # The IOMMU must come before the PCI devices it translates. Interrupt remapping (intremap=on)
  # is what lets VFIO_SET_IOMMU succeed in the guest (EPERM without it). Under TCG the irqchip is
  # QEMU's own and needs nothing more; with KVM, intremap needs kernel-irqchip=split.
  case "${LEAP_GUEST_ACCEL:-tcg}" in *kvm*) machine=$machine,kernel-irqchip=split ;; esac
  dev_args+=(-device "intel-iommu,intremap=on"
             -drive "file=$nvme_img,if=none,id=nvm,format=raw,cache=${LEAP_GUEST_NVME_CACHE:-writeback}"
             -device "nvme,serial=leapvfio,drive=nvm,addr=04.0${nvme_args:+,$nvme_args}")
  append="$append intel_iommu=on"
fi
if [ -n "$sock" ]; then
  dev_args+=(-chardev "socket,id=c0,path=$sock$reconnect" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues")
fi
if [ "$net" = 1 ]; then
  dev_args+=(-netdev "user,id=n0${hostfwd:+,hostfwd=$hostfwd}" -device virtio-net-pci,netdev=n0,romfile=)
else
  dev_args+=(-nic none)
fi

if [ -n "$mem_file" ]; then
  mem_backend="memory-backend-file,id=mem,size=$mem,mem-path=$mem_file,share=on"
else
  mem_backend="memory-backend-memfd,id=mem,size=$mem,share=on"
fi
start=$(date +%s.%N)
launch() {
  timeout -k 10 "$timeout_s" "$qemu" \
    -accel "${LEAP_GUEST_ACCEL:-tcg}" -cpu "${LEAP_GUEST_CPU:-max}" \
    -machine "$machine" \
    -object "$mem_backend" -m "$mem" -smp "$smp" \
    -nographic -monitor none -no-reboot \
    -kernel "$kernel" -initrd "$run/initrd.cpio.gz" \
    -append "$append" \
    -serial "file:$log" \
    "${dev_args[@]}" \
    ${extra_qemu[@]+"${extra_qemu[@]}"} \
    </dev/null >"$qerr" 2>&1 &
  qpid=$!
}
# After the guest's poweroff QEMU stops the vhost-user device (GET_VRING_BASE), which waits for the
# back end's in-flight requests: a back end that never completes them keeps QEMU alive. Give it
# LEAP_GUEST_EXIT_GRACE seconds after the END marker, then kill it and say so.
grace=${LEAP_GUEST_EXIT_GRACE:-15}
# Under TCG on this kind of machine a guest kernel occasionally stalls in early boot (RCU stall
# warnings, "timer wakeup didn't happen") before init runs, whatever the back end: a guest that
# has not reached init after LEAP_GUEST_BOOT_TIMEOUT seconds is booted once more, and said so.
boot_limit=${LEAP_GUEST_BOOT_TIMEOUT:-90}
attempt=1
set +e
while :; do
  : > "$log"
  launch
  launched=$(date +%s)
  end_seen="" hung_exit=0 boot_stall=0
  while kill -0 "$qpid" 2>/dev/null; do
    if [ -z "$end_seen" ] && grep -q 'LEAP-GUEST: END' "$log" 2>/dev/null; then end_seen=$(date +%s); fi
    if [ -n "$end_seen" ] && [ $(( $(date +%s) - end_seen )) -ge "$grace" ]; then
      hung_exit=1
      stop_qemu
      break
    fi
    if [ $(( $(date +%s) - launched )) -ge "$boot_limit" ] && ! grep -q 'LEAP-GUEST: BOOTED' "$log" 2>/dev/null; then
      boot_stall=1
      stop_qemu
      break
    fi
    sleep 0.5
  done
  wait "$qpid"
  qrc=$?
  qpid=""
  if [ "$boot_stall" = 1 ] && [ "$attempt" = 1 ]; then
    echo "run-guest: the guest kernel did not reach init within ${boot_limit}s (a TCG boot stall; the job never ran); booting it again (first attempt's log: $log.stall)" >&2
    mv "$log" "$log.stall"
    attempt=2
    continue
  fi
  break
done
set -e
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')

# drop CRs and the firmware's terminal escape sequences so markers start their lines
sed 's/\r//g; s/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' "$log" > "$log.tmp" && mv "$log.tmp" "$log"
status=ok reason=""
if [ "$boot_stall" = 1 ]; then status=fail reason="the guest kernel did not reach init within ${boot_limit}s, twice (TCG boot stall)"
elif [ "$hung_exit" = 1 ]; then status=fail reason="QEMU did not exit within ${grace}s of the guest's poweroff (back end never finished in-flight I/O / GET_VRING_BASE?)"
elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then status=fail reason="QEMU killed after the ${timeout_s}s timeout"
elif [ "$qrc" != 0 ]; then status=fail reason="QEMU exited with status $qrc"
fi
if grep -q '^LEAP-GUEST: FAIL' "$log"; then
  status=fail reason="${reason:+$reason; }$(grep -m1 '^LEAP-GUEST: FAIL' "$log" | sed 's/^LEAP-GUEST: //')"
elif ! grep -q '^LEAP-GUEST: PASS' "$log"; then
  status=fail reason="${reason:+$reason; }no PASS marker in the guest log"
fi
if grep -q '^LEAP-CHECK: FAIL' "$log" && [ "$status" = ok ]; then status=fail reason="a check failed"; fi

if [ "$job" = bench ]; then grep -E '^GUEST-(FIO|STAT) ' "$log" || true; fi
grep -E '^GUEST-BENCH ' "$log" || true
booted=$(sed -n 's/^LEAP-GUEST: BOOTED .*uptime=\([0-9.]*\).*/\1/p' "$log" | head -1)
if [ "$status" = ok ]; then
  echo "run-guest: PASS job=$job queues=$queues wall=${elapsed}s boot_to_init=${booted:-?}s log=$log"
  exit 0
fi
{
  echo "run-guest: FAIL job=$job: $reason (wall ${elapsed}s, log $log)"
  if [ -s "$qerr" ]; then echo "---- QEMU stderr ----"; tail -n 20 "$qerr"; fi
  echo "---- guest log (last 60 lines) ----"
  tail -n 60 "$log"
  echo "----"
} >&2
exit 1
