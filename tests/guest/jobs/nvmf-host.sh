# Guest job "nvmf-host": the Linux kernel's NVMe/TCP initiator (nvme-cli) against a target on the
# host, reached through QEMU's user-mode network. Env:
#   NVMF_ADDR         target address as the guest sees it (default 10.0.2.2 = host loopback)
#   NVMF_PORT         I/O port;  NVMF_DISC_PORT  discovery port
#   NVMF_NQN          subsystem NQN
#   NVMF_MODES        space-separated connect modes: "plain" and/or "digests" (header + data)
#   EXPECT_SIZE_BYTES namespace size (empty: not checked)
#   VERIFY_SIZE_MB    MiB per fio verify job (default 16; slirp moves a few MiB/s)
#   NVMF_LIVE_NS      1: after the first mode's checks, ask the host (console line
#                     "LEAP-NVMF: WANT-NS2") to attach namespace 2 live; wait for the kernel to
#                     find it through the Namespace Attribute Changed event, verify I/O on it,
#                     say "LEAP-NVMF: NS2-DONE", and wait for it to go when the host detaches it
#   NVMF_NS2_BYTES    namespace 2's size (checked)
# shellcheck shell=sh source=/dev/null
# shellcheck disable=SC2086  # $common and $args are split on purpose
. /job/lib.sh

ADDR=${NVMF_ADDR:-10.0.2.2}
MB=${VERIFY_SIZE_MB:-16}
net_up || die "cannot bring eth0 up"
mkdir -p /etc/nvme
echo "nqn.2014-08.org.nvmexpress:uuid:6c5b0a3e-1d2f-4c8b-9f0e-1eafe5700001" > /etc/nvme/hostnqn
echo "6c5b0a3e-1d2f-4c8b-9f0e-1eafe5700001" > /etc/nvme/hostid
note "nvme-cli $(nvme version 2>/dev/null | head -1)"

# --- discovery ------------------------------------------------------------------------------
if out=$(nvme discover --transport=tcp --traddr="$ADDR" --trsvcid="$NVMF_DISC_PORT" 2>&1); then
  echo "$out" | sed 's/^/  discover: /'
  if echo "$out" | grep -q "subnqn: *$NVMF_NQN"; then ok "discovery log lists $NVMF_NQN"
  else fail "discovery log does not list $NVMF_NQN"; fi
else
  echo "$out" | tail -n 5
  dmesg | tail -n 20
  fail "nvme discover failed"
fi

ENGINE=$(fio_engine)
for mode in ${NVMF_MODES:-plain}; do
  args=""
  [ "$mode" = digests ] && args="--hdr-digest --data-digest"
  if ! out=$(nvme connect --transport=tcp --traddr="$ADDR" --trsvcid="$NVMF_PORT" \
               --nqn="$NVMF_NQN" $args 2>&1); then
    echo "$out" | tail -n 5
    dmesg | tail -n 20
    fail "nvme connect ($mode) failed"
    continue
  fi
  ok "nvme connect ($mode)"
  # the namespace's block device: /dev/nvmeXnY of the controller with our subsystem NQN
  DEV=""
  i=0
  while [ -z "$DEV" ] && [ "$i" -lt 100 ]; do
    for c in /sys/class/nvme/nvme*; do
      [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NVMF_NQN" ] || continue
      for n in /sys/block/"${c##*/}"n*; do
        [ -e "$n/size" ] && DEV=/dev/${n##*/} && break
      done
    done
    [ -n "$DEV" ] && [ -b "$DEV" ] && break
    DEV=""
    i=$((i + 1)); sleep 0.1
  done
  if [ -z "$DEV" ]; then
    dmesg | tail -n 20
    fail "no namespace block device after connect ($mode)"
    nvme disconnect --nqn="$NVMF_NQN" >/dev/null 2>&1
    continue
  fi
  SYS=/sys/block/${DEV#/dev/}
  bytes=$(( $(cat "$SYS/size") * 512 ))
  note "$mode: $DEV size=$bytes lbs=$(cat "$SYS/queue/logical_block_size") queues=$(nqueues) write_cache='$(cat "$SYS/queue/write_cache")' max_sectors_kb=$(cat "$SYS/queue/max_sectors_kb")"
  if [ -n "${EXPECT_SIZE_BYTES:-}" ]; then
    if [ "$bytes" = "$EXPECT_SIZE_BYTES" ]; then ok "size $bytes"
    else fail "size: got $bytes bytes, expected $EXPECT_SIZE_BYTES"; fi
  fi
  common="--filename=$DEV --direct=1 --ioengine=$ENGINE --randrepeat=1 --verify=crc32c --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3"
  run_fio "$mode randwrite-4k-qd16+verify" --name=rw4k $common --rw=randwrite --bs=4k \
    --iodepth=16 --offset=0 --size=${MB}M --do_verify=1
  run_fio "$mode write-128k-qd4+verify" --name=w128k $common --rw=write --bs=128k \
    --iodepth=4 --offset=${MB}M --size=${MB}M --do_verify=1
  run_fio "$mode randrw-mixed-qd8+verify" --name=mixed $common --rw=randwrite \
    --bsrange=512-64k --bs_unaligned=0 --blockalign=4k --iodepth=8 --offset=$((MB * 2))M \
    --size=${MB}M --do_verify=1
  if [ "${NVMF_LIVE_NS:-0}" = 1 ] && [ -z "${live_done:-}" ]; then
    live_done=1
    base=${DEV%n*}
    NS2=${base}n2
    echo "LEAP-NVMF: WANT-NS2"
    i=0
    while [ ! -e "/sys/block/${NS2#/dev/}/size" ] && [ "$i" -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
    if [ -e "/sys/block/${NS2#/dev/}/size" ]; then
      ok "namespace 2 appeared while connected ($NS2, after $((i / 10)) s)"
      b2=$(( $(cat "/sys/block/${NS2#/dev/}/size") * 512 ))
      if [ "$b2" = "${NVMF_NS2_BYTES:-$b2}" ]; then ok "namespace 2 size $b2"
      else fail "namespace 2 size: got $b2, expected $NVMF_NS2_BYTES"; fi
      run_fio "$mode namespace-2 randwrite-4k+verify" --name=ns2 --filename="$NS2" --direct=1 \
        --ioengine="$ENGINE" --randrepeat=1 --verify=crc32c --verify_fatal=1 --rw=randwrite \
        --bs=4k --iodepth=8 --size=4M --do_verify=1 --output-format=terse --terse-version=3
    else
      dmesg | tail -n 20
      fail "namespace 2 never appeared (no Namespace Attribute Changed rescan?)"
    fi
    echo "LEAP-NVMF: NS2-DONE"
    i=0
    while [ -e "/sys/block/${NS2#/dev/}" ] && [ "$i" -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
    if [ -e "/sys/block/${NS2#/dev/}" ]; then fail "namespace 2 still there after the host detached it"
    else ok "namespace 2 went away when the host detached it"; fi
    run_fio "$mode namespace-1 after the detach+verify" --name=ns1 --filename="$DEV" --direct=1 \
      --ioengine="$ENGINE" --randrepeat=1 --verify=crc32c --verify_fatal=1 --rw=randwrite \
      --bs=4k --iodepth=8 --offset=$((MB * 3))M --size=4M --do_verify=1 --output-format=terse \
      --terse-version=3
  fi
  # flush and discard reach the target too
  sync
  if blkdiscard -o 0 -l 1048576 "$DEV" 2>/dev/null; then ok "$mode discard"; else note "$mode discard not supported"; fi
  if nvme disconnect --nqn="$NVMF_NQN" >/dev/null 2>&1; then ok "nvme disconnect ($mode)"
  else fail "nvme disconnect ($mode) failed"; fi
  sleep 0.5
done
dmesg | grep -iE "nvme|tcp" | tail -n 30 | sed 's/^/  dmesg: /'
