#!/usr/bin/env bash
# Guest benchmark: leapd vs qemu-storage-daemon (the peer anchor) serving the same image to a QEMU
# (TCG) guest that runs a short fio job set (tests/guest/jobs/bench.sh). Runs are interleaved
# (leapd, qsd / qsd, leapd / ...) so drift hits both alike; the tables show medians over runs.
#
#   scripts/guest-bench.sh [--runs N] [--only leapd|qsd] [--runtime S] [--queues N]
#                          [--direct on|off] [--qsd-aio threads|native|io_uring] [--jobs "A B"]
#
#   --runs N        guest boots per back end (default 3)
#   --only B        benchmark one back end (no ratio)
#   --runtime S     seconds per fio job (default 5; each job also has 1 s ramp-up)
#   --queues N      vhost-user-blk queues (default 2); a list ("1 2" or 1,2) runs the whole
#                   benchmark once per count, in one invocation, and prints each report
#   --direct on|off O_DIRECT on the host side for both back ends (default off: both use the page
#                   cache; leapd gets direct=on|off, qsd cache.direct=on|off)
#   --qsd-aio A     qsd's aio= (default threads, as in the reference command)
#   --jobs "A B"    subset of: randread-qd1 randread-qd32 randwrite-qd32 seqread-128k-qd8
# CPU cost: utime+stime of the back end process (all threads) from /proc/PID/stat, delta over the
# guest run (boot included), divided by the requests the guest's disk completed (reads+writes from
# /sys/block/vda/stat, ramp-up included). Under TCG the guest CPU is the bottleneck: IOPS mostly
# measure the guest; CPU per I/O is the back end's own figure. Expect ±15-25 % noise in IOPS.
# Results: target/guest/bench/<stamp>/ (raw TSV + logs). LEAPD=path as for guest-verify.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gdir=$root/tests/guest
# shellcheck source-path=SCRIPTDIR source=../tests/guest/lib.sh
. "$gdir/lib.sh"

runs=3 only="" runtime=5 queues=2 direct=off qsd_aio=threads jobs=""
size=$((1024 * 1024 * 1024))
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --queues) queues=$2; shift 2 ;;
    --direct) direct=$2; shift 2 ;;
    --qsd-aio) qsd_aio=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "guest-bench: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
queues=${queues//,/ }
if [ "$(wc -w <<< "$queues")" -gt 1 ]; then
  # One benchmark per queue count, same options otherwise.
  for q in $queues; do
    "${BASH_SOURCE[0]}" --runs "$runs" ${only:+--only "$only"} --runtime "$runtime" --queues "$q" \
      --direct "$direct" --qsd-aio "$qsd_aio" ${jobs:+--jobs "$jobs"} || exit $?
  done
  exit 0
fi
[[ "$queues" =~ ^[1-9][0-9]*$ ]] || { echo "guest-bench: --queues must be positive integers" >&2; exit 2; }
case "$only" in ""|leapd|qsd) ;; *) echo "guest-bench: --only must be leapd or qsd" >&2; exit 2 ;; esac
case "$direct" in on|off) ;; *) echo "guest-bench: --direct must be on or off" >&2; exit 2 ;; esac
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "guest-bench: --runs must be a positive integer" >&2; exit 2; }

if [ -n "$only" ]; then backends=("$only"); else backends=(leapd qsd); fi
need_qsd=0; [[ " ${backends[*]} " == *" qsd "* ]] && need_qsd=1
missing=$(guest_missing_deps "$need_qsd")
[ -z "$missing" ] || { echo "guest-bench: ERROR: missing $missing (run scripts/install-deps.sh as root)" >&2; exit 1; }
if [[ " ${backends[*]} " == *" leapd "* ]]; then
  LEAPD=$(leapd_path) || exit 1
  export LEAPD
fi

stamp=$(date +%Y%m%d-%H%M%S)
out=$root/target/guest/bench/$stamp
mkdir -p "$out"
img=$root/target/guest/bench/disk.img
# a fully allocated image, so reads hit real blocks (not holes) for both back ends
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" != "$size" ] || [ "$(($(stat -c %b "$img") * 512))" -lt "$size" ]; then
  echo "guest-bench: writing a fully allocated ${size}-byte image at $img"
  dd if=/dev/zero of="$img.tmp" bs=1M count=$((size / 1024 / 1024)) conv=fsync status=none
  mv "$img.tmp" "$img"
fi
sock=$out/vhost.sock
if [ ${#sock} -gt 100 ]; then sockdir=$(mktemp -d /tmp/leap-bench.XXXXXX); sock=$sockdir/vhost.sock; else sockdir=""; fi

# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$?
  if backend_alive; then kill -KILL "$BACKEND_PID" 2>/dev/null || true; wait "$BACKEND_PID" 2>/dev/null || true; fi
  rm -f "$sock"; [ -z "$sockdir" ] || rm -rf "$sockdir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

tck=$(getconf CLK_TCK)
jobs_tsv=$out/jobs.tsv     # run backend job iops bw_kib lat_us ios
runs_tsv=$out/runs.tsv     # run backend cpu_s guest_ios wall_s
printf 'run\tbackend\tjob\tiops\tbw_kib\tlat_us\tios\n' > "$jobs_tsv"
printf 'run\tbackend\tcpu_s\tguest_ios\twall_s\n' > "$runs_tsv"
echo "guest-bench: ${backends[*]}, $runs run(s), ${runtime}s per job, queues=$queues, direct=$direct, qsd aio=$qsd_aio -> $out"

for ((r = 1; r <= runs; r++)); do
  order=("${backends[@]}")
  if [ ${#order[@]} = 2 ] && [ $((r % 2)) = 0 ]; then order=("${order[1]}" "${order[0]}"); fi
  for b in "${order[@]}"; do
    if [ "$b" = leapd ]; then extra="direct=$direct"
    else extra="aio=$qsd_aio"; [ "$direct" = on ] && extra="$extra,cache.direct=on"; fi
    backend_start "$b" "$img" "$sock" "$queues" "$out/$b-run$r.backend.log" "$extra" \
      || { echo "guest-bench: could not start $b" >&2; exit 1; }
    t0=$(proc_cpu_ticks "$BACKEND_PID")
    w0=$(date +%s.%N)
    args=(--socket "$sock" --job bench --queues "$queues" --bench-runtime "$runtime" --log "$out/$b-run$r.guest.log")
    [ -z "$jobs" ] || args+=(--bench-jobs "$jobs")
    if ! res=$("$gdir/run-guest.sh" "${args[@]}"); then
      echo "guest-bench: guest run $r with $b failed (log $out/$b-run$r.guest.log)" >&2
      exit 1
    fi
    t1=$(proc_cpu_ticks "$BACKEND_PID")
    w1=$(date +%s.%N)
    backend_alive || { echo "guest-bench: $b died during run $r" >&2; exit 1; }
    backend_stop 20
    if [ "$b" = leapd ] && [ "$BACKEND_RC" != 0 ]; then echo "guest-bench: warning: leapd exited with $BACKEND_RC" >&2; fi
    ios=$(awk '/^GUEST-STAT /{ for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "reads" || kv[1] == "writes") s += kv[2] } } END { print s + 0 }' <<< "$res")
    awk -v r="$r" -v b="$b" '/^GUEST-FIO /{
        delete v; for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r, b, v["job"], v["iops"], v["bw_kib"], v["lat_us"], v["ios"] }' <<< "$res" >> "$jobs_tsv"
    cpu=$(awk -v a="$t0" -v b="$t1" -v t="$tck" 'BEGIN { printf "%.2f", (b - a) / t }')
    wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$b" "$cpu" "$ios" "$wall" >> "$runs_tsv"
    echo "guest-bench: run $r $b: cpu=${cpu}s guest_ios=$ios wall=${wall}s $(awk '/^GUEST-FIO /{ printf "%s:%s ", substr($2, 5), substr($3, 6) }' <<< "$res")"
  done
done

# ---- report (medians over runs) -------------------------------------------------------------
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { # backend job column(4=iops 5=bw 6=lat) -> median
  awk -F'\t' -v b="$1" -v j="$2" -v c="$3" 'NR > 1 && $2 == b && $3 == j { print $c }' "$jobs_tsv" | median
}
joblist=$(awk -F'\t' 'NR > 1 && !seen[$3]++ { print $3 }' "$jobs_tsv")
report=$out/report.txt
{
  echo
  echo "== guest fio (median of $runs run(s); TCG guest, ${runtime}s per job, queues=$queues, direct=$direct) =="
  for b in "${backends[@]}"; do
    cpu=$(awk -F'\t' -v b="$b" 'NR > 1 && $2 == b { print $3 }' "$runs_tsv" | median)
    cpio=$(awk -F'\t' -v b="$b" 'NR > 1 && $2 == b && $4 > 0 { print $3 / $4 * 1e6 }' "$runs_tsv" | median)
    gios=$(awk -F'\t' -v b="$b" 'NR > 1 && $2 == b { print $4 }' "$runs_tsv" | median)
    echo
    echo "[$b]  back-end CPU per guest run: $(printf "%.2f" "$cpu")s over ${gios} guest I/Os = $(printf '%.2f' "$cpio") CPU-us per I/O"
    printf '  %-18s %10s %12s %10s\n' job iops bw_kib lat_us
    for j in $joblist; do
      printf '  %-18s %10.0f %12.0f %10.1f\n' "$j" "$(col "$b" "$j" 4)" "$(col "$b" "$j" 5)" "$(col "$b" "$j" 6)"
    done
  done
  if [ ${#backends[@]} = 2 ]; then
    echo
    echo "[leapd / qsd]"
    printf '  %-18s %12s\n' job iops_ratio
    for j in $joblist; do
      printf '  %-18s %12s\n' "$j" "$(awk -v a="$(col leapd "$j" 4)" -v b="$(col qsd "$j" 4)" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
    done
    l=$(awk -F'\t' 'NR > 1 && $2 == "leapd" && $4 > 0 { print $3 / $4 * 1e6 }' "$runs_tsv" | median)
    q=$(awk -F'\t' 'NR > 1 && $2 == "qsd" && $4 > 0 { print $3 / $4 * 1e6 }' "$runs_tsv" | median)
    printf '  %-18s %12s   (leapd %.2f us, qsd %.2f us)\n' cpu_us_per_io "$(awk -v a="$l" -v b="$q" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')" "$l" "$q"
  fi
} | tee "$report"
echo
echo "guest-bench: raw data $jobs_tsv, $runs_tsv; report $report"
