#!/usr/bin/env bash
# NVMe/TCP benchmark on the host's loopback, with a standard network block protocol beside it:
#   leapd:  `leapd bench` (in-process vhost-user driver → leapd → nvme-tcp:// initiator)
#           → NVMe/TCP → `leapd target` serving FILE
#   nbd:    fio's nbd engine (libnbd) → NBD → `qemu-nbd` serving the same FILE
# Jobs: 4 KiB random read at QD1 and QD32, 128 KiB sequential read at QD8. Prints IOPS, MiB/s,
# mean latency, and CPU per I/O on each side (client: leapd's poller / fio's job; server: the
# whole leapd target / qemu-nbd process), then the leapd/nbd ratio of each.
#
#   scripts/nvmf-bench.sh [SECONDS]     (default 5 per job)
# Env: LEAPD (default target/release/leapd, built if missing), BENCH_FILE (default: a 1 GiB file
# written under target/nvmf-bench; both servers use the page cache, so this measures the
# protocol stacks, not the disk).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
secs=${1:-5}
leapd=${LEAPD:-$root/target/release/leapd}
[ -x "$leapd" ] || cargo build --release -p leap-soc
for t in fio qemu-nbd python3; do
  command -v "$t" >/dev/null || { echo "nvmf-bench: $t not found (scripts/install-deps.sh)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "nvmf-bench: this fio has no nbd engine" >&2; exit 1; }
mkdir -p target/nvmf-bench
img=${BENCH_FILE:-$root/target/nvmf-bench/disk.img}
if [ ! -s "$img" ]; then
  echo "nvmf-bench: writing 1 GiB to $img" >&2
  fio --name=fill --filename="$img" --rw=write --bs=1M --size=1G --ioengine=psync \
    --output=/dev/null
fi
cat "$img" > /dev/null   # into the page cache for both servers
pids=()
cleanup() { for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
jobs=("randread 4096 1" "randread 4096 32" "read 131072 8")
nqn=nqn.2026-12.io.leap:bench
port=$(free_port)
"$leapd" target --listen "127.0.0.1:$port" --discovery-port 0 --nqn "$nqn" --disk "$img" \
  --pollers 1 >target/nvmf-bench/target.log 2>&1 &
tpid=$!; pids+=("$tpid")
for _ in $(seq 100); do grep -q "NVMe/TCP target" target/nvmf-bench/target.log && break; sleep 0.1; done
declare -A L N
for j in "${jobs[@]}"; do
  read -r rw bs qd <<< "$j"
  t0=$(ticks "$tpid")
  line=$("$leapd" bench --backend "nvme-tcp://127.0.0.1:$port/$nqn,queues=1" --rw "$rw" --bs "$bs" \
           --iodepth "$qd" --seconds "$secs" 2>/dev/null | grep '^bench ')
  t1=$(ticks "$tpid")
  get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< "$line"; }
  iops=$(get iops)
  srv=$(python3 -c "print(round(($t1-$t0)/$hz*1e9/max(1,$iops*$secs)))")
  L[$j]="$iops $(get mib_s) $(get mean_us) $(get cpu_ns_per_io) $srv"
done
kill -TERM "$tpid"; wait "$tpid" || true; pids=()
nport=$(free_port)
qemu-nbd --format=raw --persistent --shared=8 --cache=writeback --bind=127.0.0.1 --port="$nport" \
  "$img" >target/nvmf-bench/qemu-nbd.log 2>&1 &
npid=$!; pids+=("$npid")
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$nport),1)" 2>/dev/null && break; sleep 0.1; done
for j in "${jobs[@]}"; do
  read -r rw bs qd <<< "$j"
  t0=$(ticks "$npid")
  json=$(fio --name=j --ioengine=nbd --uri="nbd://127.0.0.1:$nport" --rw="$rw" --bs="$bs" \
           --iodepth="$qd" --size=1G --time_based --runtime="$secs" --output-format=json)
  t1=$(ticks "$npid")
  N[$j]=$(python3 -c '
import json, sys
s = sys.argv[1]
j = json.loads(s[s.index("{"):])["jobs"][0]  # fio prints "connected to NBD server" first
r = j["read"]
ios = max(1, r["total_ios"])
cli = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000 * 1e9 / ios
srv = (int(sys.argv[2]) - int(sys.argv[3])) / int(sys.argv[4]) * 1e9 / ios
print("%.0f %.1f %.2f %.0f %.0f" % (r["iops"], r["bw"] / 1024, r["lat_ns"]["mean"] / 1000, cli, srv))
' "$json" "$t1" "$t0" "$hz")
done
printf '\n%-22s %-6s %10s %9s %9s %12s %12s\n' job stack IOPS MiB/s "mean µs" "client ns/IO" "server ns/IO"
for j in "${jobs[@]}"; do
  read -r rw bs qd <<< "$j"
  name="$rw ${bs}B QD$qd"
  read -r a b c d e <<< "${L[$j]}"; printf '%-22s %-6s %10s %9s %9s %12s %12s\n' "$name" leapd "$a" "$b" "$c" "$d" "$e"
  read -r f g h i k <<< "${N[$j]}"; printf '%-22s %-6s %10s %9s %9s %12s %12s\n' "" nbd "$f" "$g" "$h" "$i" "$k"
  python3 -c "print('%-22s %-6s %10.2fx %8s %8.2fx' % ('', 'ratio', $a/max(1,$f), '', $c/max(0.001,$h)))"
done
