# Guest job "bench" (busybox sh). Runs a short fio job set on the disk and prints one line per job:
#   GUEST-FIO job=<name> iops=<N> bw_kib=<N> lat_us=<mean> ios=<N> runtime_ms=<N>
# and at the end the device's completed request counts (all I/O since boot, ramp-up included):
#   GUEST-STAT reads=<N> writes=<N> discards=<N> flushes=<N>
# env: BENCH_RUNTIME (s per job, default 5), BENCH_RAMP (s, default 1), BENCH_JOBS (names, default all)
# shellcheck shell=sh source=/dev/null
. /job/lib.sh

wait_for_disk 30 || die "no $DEV after 30 s"
ENGINE=$(fio_engine)
RT=${BENCH_RUNTIME:-5}
RAMP=${BENCH_RAMP:-1}
JOBS=${BENCH_JOBS:-randread-qd1 randread-qd32 randwrite-qd32 seqread-128k-qd8}
note "bench: engine=$ENGINE runtime=${RT}s ramp=${RAMP}s size=$(($(cat "$SYS/size") * 512)) queues=$(nqueues) uptime=$(uptime_s)"

for j in $JOBS; do
  case "$j" in
    randread-qd1)     rw=randread;  bs=4;   qd=1 ;;
    randread-qd32)    rw=randread;  bs=4;   qd=32 ;;
    randwrite-qd32)   rw=randwrite; bs=4;   qd=32 ;;
    seqread-128k-qd8) rw="read";    bs=128; qd=8 ;;
    *) fail "unknown bench job $j"; continue ;;
  esac
  if ! out=$(fio --name="$j" --filename="$DEV" --direct=1 --ioengine="$ENGINE" --rw="$rw" --bs="${bs}k" \
               --iodepth="$qd" --numjobs=1 --time_based --runtime="$RT" --ramp_time="$RAMP" \
               --norandommap --randrepeat=0 --group_reporting \
               --output-format=terse --terse-version=3 2>&1); then
    echo "$out" | tail -n 20
    fail "fio $j failed"
    continue
  fi
  # terse v3: read kb/bw/iops/runtime = fields 6-9, read lat mean 40; write 47-50, lat mean 81
  echo "$out" | grep '^3;' | tail -n 1 | awk -F';' -v j="$j" -v bs="$bs" '{
    kb = $6 + $47; bw = $7 + $48; iops = $8 + $49; rt = ($9 > $50 ? $9 : $50)
    lat = ($8 > 0 ? $40 : $81)
    printf "GUEST-FIO job=%s iops=%d bw_kib=%d lat_us=%.1f ios=%d runtime_ms=%d\n", j, iops, bw, lat, kb / bs, rt
  }'
done
echo "GUEST-STAT reads=$(blkstat 1) writes=$(blkstat 5) discards=$(blkstat 12) flushes=$(blkstat 16)"
