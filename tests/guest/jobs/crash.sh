# Guest job "crash" (busybox sh; run by /init with /job/env sourced): a verified write workload
# and a reader run together while the host kills the back end (SIGKILL) and starts it again; QEMU
# reconnects (reconnect-ms). The guest must see only a stall: no I/O error, no broken queue, and
# fio's verify (in the same run, then again in a separate run) must pass.
#   CRASH_WRITE_MB   MiB the writer writes (4 KiB random, QD16; default 4)
# The line "LEAP-CRASH: running" tells the host the workload has started.
# shellcheck shell=sh source=/dev/null
# shellcheck disable=SC2086  # $common is split on purpose
. /job/lib.sh

wait_for_disk 30 || die "no $DEV after 30 s"
ENGINE=$(fio_engine)
MB=${CRASH_WRITE_MB:-4}
common="--filename=$DEV --direct=1 --ioengine=$ENGINE --group_reporting --output-format=terse --terse-version=3"
writer="--name=w --rw=randwrite --bs=4k --iodepth=16 --offset=0 --size=${MB}M --randrepeat=1 --verify=crc32c --verify_fatal=1"
echo "LEAP-CRASH: running"
run_fio "write+verify and read across a back-end crash" $common \
  $writer --do_verify=1 \
  --name=r --rw=randread --bs=4k --iodepth=8 --offset=64M --size=16M --time_based --runtime=20
run_fio "verify-only after the crash" $common $writer --verify_only=1
errs=$(dmesg | grep -ciE "I/O error|is not a head|virtio_blk.*(error|broken)" || true)
if [ "$errs" = 0 ]; then ok "no I/O errors in the kernel log"; else
  dmesg | grep -iE "I/O error|is not a head|virtio_blk" | tail -n 10
  fail "$errs I/O error line(s) in the kernel log"
fi
note "stat: reads=$(blkstat 1) writes=$(blkstat 5)"
