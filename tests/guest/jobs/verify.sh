# Guest job "verify" (busybox sh; run by /init with /job/env sourced). Expectations from env:
#   EXPECT_SIZE_BYTES   disk size in bytes (empty: not checked)
#   EXPECT_QUEUES       number of blk-mq hardware queues (empty: not checked)
#   EXPECT_DISCARD      1: discard must be supported and work; 0: not checked
#   EXPECT_WRITE_CACHE  "write back" (default) / "write through" / empty: not checked
#   EXPECT_BLOCK_SIZE   logical block size (empty: not checked)
#   FORCE_WRITE_BACK    1: after the checks, switch a write-through disk to write back through
#                       /sys/block/vda/cache_type (a virtio config write) so FLUSH gets exercised
#   VERIFY_SIZE_MB      MiB written per fio verify job (default 64)
# shellcheck shell=sh source=/dev/null
# shellcheck disable=SC2086  # $common and sizes are split on purpose
. /job/lib.sh

t0=$(uptime_s)
wait_for_disk 30 || die "no $DEV after 30 s (virtio_blk did not find the vhost-user-blk device)"
ENGINE=$(fio_engine)
note "disk $DEV found at uptime ${t0}s, fio engine $ENGINE"

# --- geometry and features ------------------------------------------------------------------
sectors=$(cat "$SYS/size")
bytes=$((sectors * 512))
note "size=$bytes bytes ($sectors sectors) lbs=$(cat "$SYS/queue/logical_block_size") pbs=$(cat "$SYS/queue/physical_block_size")"
if [ -n "${EXPECT_SIZE_BYTES:-}" ]; then
  if [ "$bytes" = "$EXPECT_SIZE_BYTES" ]; then ok "size $bytes"; else fail "size: got $bytes bytes, expected $EXPECT_SIZE_BYTES"; fi
fi
if [ -n "${EXPECT_BLOCK_SIZE:-}" ]; then
  lbs=$(cat "$SYS/queue/logical_block_size")
  if [ "$lbs" = "$EXPECT_BLOCK_SIZE" ]; then ok "logical_block_size $lbs"; else fail "logical_block_size: got $lbs, expected $EXPECT_BLOCK_SIZE"; fi
fi
nq=$(nqueues)
if [ -n "${EXPECT_QUEUES:-}" ]; then
  if [ "$nq" = "$EXPECT_QUEUES" ]; then ok "queues $nq"; else fail "queues: got $nq hardware queues, expected $EXPECT_QUEUES"; fi
else
  note "queues $nq"
fi
dmax=$(cat "$SYS/queue/discard_max_bytes")
wzmax=$(cat "$SYS/queue/write_zeroes_max_bytes" 2>/dev/null || echo 0)
note "discard_max_bytes=$dmax discard_granularity=$(cat "$SYS/queue/discard_granularity") write_zeroes_max_bytes=$wzmax"
if [ "${EXPECT_DISCARD:-0}" = 1 ]; then
  if [ "$dmax" -gt 0 ]; then ok "discard supported"; else fail "discard: discard_max_bytes is 0, expected discard support"; fi
fi
wc_mode=$(cat "$SYS/queue/write_cache")
if [ -n "${EXPECT_WRITE_CACHE:-}" ]; then
  if [ "$wc_mode" = "$EXPECT_WRITE_CACHE" ]; then ok "write_cache '$wc_mode'"; else fail "write_cache: got '$wc_mode', expected '$EXPECT_WRITE_CACHE'"; fi
else
  note "write_cache '$wc_mode'"
fi
if [ "${FORCE_WRITE_BACK:-0}" = 1 ] && [ "$wc_mode" != "write back" ]; then
  if [ -w "$SYS/cache_type" ] && echo "write back" > "$SYS/cache_type" 2>/dev/null; then :
  else echo "write back" > "$SYS/queue/write_cache" || fail "cannot switch the disk to write back"
  fi
  wc_mode=$(cat "$SYS/queue/write_cache")
  note "switched write cache to '$wc_mode'"
fi
ro=$(cat "$SYS/ro")
[ "$ro" = 0 ] || die "device is read-only (ro=$ro); the verify job writes"

# --- data integrity with fio ----------------------------------------------------------------
MB=${VERIFY_SIZE_MB:-64}
[ $((MB * 4 * 1024 * 1024)) -le "$bytes" ] || MB=$((bytes / 4 / 1024 / 1024))
[ "$MB" -ge 4 ] || die "disk too small for the verify job ($bytes bytes)"
common="--filename=$DEV --direct=1 --ioengine=$ENGINE --randrepeat=1 --verify=crc32c --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3"


# 1) 4 KiB random writes, QD16, verified after the write phase (same fio run)
run_fio "randwrite-4k-qd16+verify" --name=rw4k $common --rw=randwrite --bs=4k --iodepth=16 \
  --offset=0 --size=${MB}M --do_verify=1

# 2) mixed 4k-128k random writes from 2 jobs pinned to 2 CPUs (so both hardware queues carry
#    I/O), ended by fsync; then a SEPARATE fio run re-reads and verifies (data survived close)
half=$((MB / 2))
run_fio "randwrite-4k-128k-2jobs" --name=mix $common --rw=randwrite --bsrange=4k-128k --iodepth=16 \
  --offset=${MB}M --size=${half}M --offset_increment=${half}M --numjobs=2 \
  --cpus_allowed=0-1 --cpus_allowed_policy=split --do_verify=0 --end_fsync=1
run_fio "verify-only-4k-128k-2jobs" --name=mix $common --rw=randwrite --bsrange=4k-128k --iodepth=16 \
  --offset=${MB}M --size=${half}M --offset_increment=${half}M --numjobs=2 \
  --cpus_allowed=0-1 --cpus_allowed_policy=split --verify_only=1
# 2b) 1 MiB requests (a back end with a transfer limit gets each split into commands within it;
#     the limit no longer shrinks the guest's segments to 4 KiB), into region 2, verified
note "max_segment_size=$(cat "$SYS/queue/max_segment_size") max_segments=$(cat "$SYS/queue/max_segments") max_sectors_kb=$(cat "$SYS/queue/max_sectors_kb")"
run_fio "write-1m-qd4+verify" --name=big $common --rw=write --bs=1M --iodepth=4 \
  --offset=${MB}M --size=${MB}M --do_verify=1

# 3) flush: a write job with fsync every 8 writes must make FLUSH requests reach the device
f0=$(blkstat 16)
run_fio "write-fsync" --name=fl --filename=$DEV --direct=1 --ioengine=$ENGINE --rw=write --bs=64k \
  --offset=$((MB * 2))M --size=4M --fsync=8 --output-format=terse
sync
f1=$(blkstat 16)
note "flush requests: $f0 -> $f1"
if [ "$wc_mode" = "write back" ]; then
  if [ "$f1" -gt "$f0" ]; then ok "flush reached the device ($((f1 - f0)) flushes)"; else fail "flush: no FLUSH request completed despite write back cache"; fi
fi

# 4) discard (busybox blkdiscard; util-linux one if present) and, when offered, write zeroes
if [ "$dmax" -gt 0 ]; then
  d0=$(blkstat 12)
  off=$((MB * 2 + 8))
  if blkdiscard -o $((off * 1024 * 1024)) -l $((16 * 1024 * 1024)) "$DEV"; then
    d1=$(blkstat 12)
    if [ "$d1" -gt "$d0" ]; then ok "discard 16 MiB ($((d1 - d0)) requests)"; else fail "discard: blkdiscard succeeded but no discard request completed"; fi
  else
    fail "discard: blkdiscard -o ${off}MiB -l 16MiB failed"
  fi
  # discarding must not disturb data outside the range: re-verify region 1
  run_fio "verify-only-after-discard" --name=rw4k $common --rw=randwrite --bs=4k --iodepth=16 \
    --offset=0 --size=${MB}M --verify_only=1
fi
if [ "$wzmax" -gt 0 ] && command -v ul-blkdiscard >/dev/null; then
  off=$((MB * 2 + 32))
  dd if=/dev/urandom of="$DEV" bs=1M seek=$off count=4 oflag=direct conv=fsync 2>/dev/null
  if ul-blkdiscard -z -o $((off * 1024 * 1024)) -l $((4 * 1024 * 1024)) "$DEV"; then
    got=$(dd if="$DEV" bs=1M skip=$off count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    want=$(dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$got" = "$want" ]; then ok "write zeroes 4 MiB reads back as zeroes"; else fail "write zeroes: range does not read back as zeroes"; fi
  else
    fail "write zeroes: blkdiscard -z failed"
  fi
fi

# 5) per-queue activity: each request virtqueue has its own MSI-X vector ("virtioN-req.Q" in
#    /proc/interrupts; 6.1 has no per-hctx counters in debugfs). With 2+ queues, at least two must
#    have signalled completions (fio above ran 2 jobs pinned to different CPUs).
nq_used=0; line=""
for q in $(seq 0 $((nq - 1))); do
  n=$(awk -v q="req.$q" '{ name = $NF } name ~ /^virtio[0-9]+-req\.[0-9]+$/ && substr(name, index(name, "-") + 1) == q {
        for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; else break } END { print s + 0 }' /proc/interrupts)
  line="$line q$q=$n"
  [ "$n" -gt 0 ] && nq_used=$((nq_used + 1))
done
note "interrupts per request queue:$line"
if [ "$nq" -gt 1 ] && [ "$nq_used" -lt 2 ]; then fail "multiqueue: only $nq_used of $nq request queues signalled completions"; fi

note "stat: reads=$(blkstat 1) writes=$(blkstat 5) discards=$(blkstat 12) flushes=$(blkstat 16)"
note "verify job took $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN{printf "%.1f", b-a}') s"
