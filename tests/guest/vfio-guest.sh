#!/usr/bin/env bash
# Leap's userspace NVMe driver over VFIO (disk spec vfio:BDF[/NSID]) on real hardware, emulated:
# QEMU's NVMe controller behind its Intel IOMMU in a TCG guest, vfio-pci bound in the guest
# (run-guest.sh --nvme, jobs/vfio.sh). One guest boot per case:
#   driver   the driver's integration tests (`cargo test -p leap-runtime --test vfio`, built
#            static) run in the guest with LEAP_VFIO_DEVICE=<BDF>; then hot-remove: the test's
#            own (reads in flight when the kernel takes the device back), and leapd serve with
#            the controller and a RAM disk as two namespaces of one NVMe/TCP target, used by the
#            guest's kernel initiator: the controller is removed under fio, namespace 2's
#            verify must pass, leapd must keep running and stop cleanly
#   bench    `leapd bench --backend vfio:<BDF>` against fio on the kernel's nvme driver, same
#            controller, 4 KiB random reads at QD32; prints the guest's GUEST-BENCH lines (both
#            results and their ratio)
#   chain    tenant VM → vhost-user → leapd serve (host) → NVMe/TCP → leapd target in guest A →
#            VFIO → emulated NVMe: guest A serves its controller with `leapd target --disk vfio:`,
#            the host's leapd serve attaches it as nvme-tcp://, and a tenant guest runs the
#            verify job (fio crc32c verify) on that disk; then guest A's target is stopped with
#            SIGTERM and must exit 0
#
#   tests/guest/vfio-guest.sh [CASE...]       (default: driver bench chain)
#
# Binaries (static: the guest has no libraries for them), built unless given:
#   LEAPD_STATIC   leapd:  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/static
#                  cargo build --release --target x86_64-unknown-linux-gnu -p leap-soc
#   VFIO_TEST_BIN  the test: the same with cargo test -p leap-runtime --test vfio --no-run
#   LEAPD          the host's leapd serve in chain (default: LEAPD_STATIC's binary)
# The NVMe image is a sparse file of LEAP_VFIO_IMG_MB MiB (default 256) under
# target/vfio-guest/, made anew per case (bench fills it with data first) and deleted at the end
# (LEAP_VFIO_KEEP=1 keeps it). Guest logs: target/guest/logs/vfio-<case>-*.log.
# Passed to the guest job when set (jobs/vfio.sh says what they do): VFIO_NSID, VFIO_HUGEPAGES,
# VFIO_TEST_ARGS, VFIO_TEST_TIMEOUT, VFIO_BENCH_RW, VFIO_BENCH_BS, VFIO_BENCH_QD,
# VFIO_BENCH_SECONDS, VFIO_BENCH_ARGS, VFIO_TARGET_ARGS, RUST_LOG.
# Other env: LEAP_VFIO_NVME_ARGS (run-guest.sh --nvme-args, e.g. max_ioqpairs=4),
# LEAP_VFIO_TIMEOUT (s per guest, default 600), VFIO_CHAIN_DISK_OPTS (appended to the host's
# nvme-tcp disk spec, e.g. ,digest=on), VFIO_CHAIN_EXPECT_DISCARD (0|1, default 0: not checked),
# VFIO_CHAIN_EXPECT_WRITE_CACHE (default "": not checked), VFIO_CHAIN_QUEUES (default 2).
# Missing QEMU/kernel/fio/busybox/python3: a loud skip (exit 0), or a failure with CI=true or
# LEAP_REQUIRE_GUEST=1.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
root=$GUEST_ROOT
if [ $# -gt 0 ]; then cases=("$@"); else cases=(driver bench chain); fi
for c in "${cases[@]}"; do
  case "$c" in driver|bench|chain) ;; -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "vfio-guest: unknown case '$c' (driver, bench, chain)" >&2; exit 2 ;; esac
done

guest_deps_or_skip vfio-guest python3

log() { echo "vfio-guest: $*" >&2; }
die() { echo "vfio-guest: FAIL: $*" >&2; exit 1; }
triple=x86_64-unknown-linux-gnu
static_dir=$root/target/static
static_env=(env RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$static_dir")

# is_static BIN: the guest can run it (no interpreter, no shared libraries)
is_static() {
  local out
  out=$(LC_ALL=C ldd "$1" 2>&1 || true)
  case "$out" in *"not a dynamic executable"*|*"statically linked"*) return 0 ;; esac
  return 1
}

leapd_static() {
  local bin=${LEAPD_STATIC:-}
  if [ -z "$bin" ]; then
    log "building a static leapd (cargo build --release --target $triple -p leap-soc, target dir $static_dir)"
    (cd "$root" && "${static_env[@]}" cargo build --release --target "$triple" -p leap-soc >&2) \
      || { log "the static build of leapd failed"; return 1; }
    bin=$static_dir/$triple/release/leapd
  fi
  [ -x "$bin" ] || { log "$bin is not an executable"; return 1; }
  is_static "$bin" || { log "$bin is not statically linked (the guest has no libraries for it)"; return 1; }
  echo "$bin"
}

vfio_test_bin() {
  local bin=${VFIO_TEST_BIN:-}
  if [ -z "$bin" ]; then
    log "building the vfio test (cargo test --release --target $triple -p leap-runtime --test vfio --no-run, static)"
    # cargo prints one JSON message per line on stdout (diagnostics rendered on stderr as usual);
    # the test's compiler-artifact message names the executable
    bin=$(cd "$root" && "${static_env[@]}" cargo test --release --target "$triple" -p leap-runtime \
            --test vfio --no-run --message-format=json-render-diagnostics \
          | python3 -c '
import json, sys
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if m.get("reason") == "compiler-artifact" and t.get("name") == "vfio" \
            and "test" in t.get("kind", []) and m.get("executable"):
        exe = m["executable"]
if not exe:
    sys.exit("vfio-guest: no executable of the vfio test in cargo'"'"'s messages")
print(exe)') || { log "building the vfio test failed"; return 1; }
  fi
  [ -x "$bin" ] || { log "$bin is not an executable"; return 1; }
  is_static "$bin" || { log "$bin is not statically linked (the guest has no libraries for it)"; return 1; }
  echo "$bin"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

mkdir -p "$root/target/vfio-guest" "$root/target/guest/logs"
work=$(mktemp -d "$root/target/vfio-guest/run.XXXXXX")
img=$work/nvme.img
img_mb=${LEAP_VFIO_IMG_MB:-256}
stamp=$(date +%Y%m%d-%H%M%S)-$$
pids=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local p
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
  if [ "${LEAP_VFIO_KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# new_image [fill]: a fresh sparse image (filled with data for reads that reach the file)
new_image() {
  rm -f "$img"
  if [ "${1:-}" = fill ]; then
    dd if=/dev/urandom of="$img" bs=1M count="$img_mb" status=none
  else
    truncate -s "${img_mb}M" "$img"
  fi
}

# guest_env: --env arguments for the job variables set here
guest_env=()
for v in VFIO_NSID VFIO_HUGEPAGES VFIO_TEST_ARGS VFIO_TEST_TIMEOUT VFIO_BENCH_RW VFIO_BENCH_BS \
         VFIO_BENCH_QD VFIO_BENCH_SECONDS VFIO_BENCH_ARGS VFIO_TARGET_ARGS RUST_LOG; do
  [ -z "${!v:-}" ] || guest_env+=(--env "$v=${!v}")
done
nvme_opts=(--nvme "$img")
[ -z "${LEAP_VFIO_NVME_ARGS:-}" ] || nvme_opts+=(--nvme-args "$LEAP_VFIO_NVME_ARGS")
gtimeout=${LEAP_VFIO_TIMEOUT:-600}

# guest_checks LOG: the guest's check lines, indented
guest_checks() { grep -E "^LEAP-CHECK|^test result:|^test .* \.\.\. " "$1" | sed 's/^/  guest: /' || true; }

# the binaries each case needs, built once
need_leapd=0 need_test=0
for c in "${cases[@]}"; do
  case "$c" in driver) need_test=1; need_leapd=1 ;; bench|chain) need_leapd=1 ;; esac
done
leapd=""
testbin=""
[ "$need_leapd" = 0 ] || leapd=$(leapd_static) || die "no static leapd"
[ "$need_test" = 0 ] || testbin=$(vfio_test_bin) || die "no static vfio test binary"
[ -z "$leapd" ] || log "leapd (guest): $leapd"
[ -z "$testbin" ] || log "vfio test (guest): $testbin"

nqn=nqn.2026-12.io.leap:vfio
for c in "${cases[@]}"; do
  glog=$root/target/guest/logs/vfio-$c-$stamp.log
  case "$c" in
    driver)
      new_image
      rc=0
      "$here/run-guest.sh" --job vfio "${nvme_opts[@]}" --timeout "$gtimeout" --log "$glog" \
        --file "$testbin:/job/bin/vfio-tests" --env VFIO_TEST_BIN=/job/bin/vfio-tests \
        --file "$leapd:/job/bin/leapd" --env VFIO_HOTREMOVE=1 \
        ${guest_env[@]+"${guest_env[@]}"} || rc=$?
      guest_checks "$glog"
      [ "$rc" = 0 ] || die "driver: the guest run failed (log $glog)"
      echo "vfio-guest: PASS driver ($(grep -m1 '^LEAP-CHECK: ok vfio tests' "$glog" | sed 's/^LEAP-CHECK: ok vfio tests: //'))"
      ;;
    bench)
      new_image fill
      rc=0
      out=$("$here/run-guest.sh" --job vfio "${nvme_opts[@]}" --timeout "$gtimeout" --log "$glog" \
              --file "$leapd:/job/bin/leapd" --env VFIO_BENCH=1 \
              ${guest_env[@]+"${guest_env[@]}"}) || rc=$?
      echo "$out"
      guest_checks "$glog"
      [ "$rc" = 0 ] || die "bench: the guest run failed (log $glog)"
      for k in vfio kernel ratio; do
        grep -q "^GUEST-BENCH $k " <<< "$out" || die "bench: no 'GUEST-BENCH $k' line (log $glog)"
      done
      echo "vfio-guest: PASS bench ($(grep '^GUEST-BENCH ratio' <<< "$out" | sed 's/^GUEST-BENCH ratio //'))"
      ;;
    chain)
      new_image
      size=$((img_mb << 20))
      port=$(free_port); stopport=$(free_port)
      alog=$root/target/guest/logs/vfio-chain-target-$stamp.log
      slog=$root/target/guest/logs/vfio-chain-serve-$stamp.log
      sock=$work/chain.sock
      if [ ${#sock} -gt 100 ]; then sock=$(mktemp -u /tmp/leap-vfio.XXXXXX.sock); fi
      host_leapd=${LEAPD:-$leapd}
      [ -x "$host_leapd" ] || die "chain: host leapd $host_leapd is not an executable"
      # guest A: the target on VFIO
      "$here/run-guest.sh" --job vfio "${nvme_opts[@]}" --net --timeout $((gtimeout + 300)) \
        --log "$alog" --hostfwd "tcp:127.0.0.1:$port-:4420" --hostfwd "tcp:127.0.0.1:$stopport-:9999" \
        --file "$leapd:/job/bin/leapd" --env VFIO_TARGET=1 --env VFIO_TARGET_NQN="$nqn" \
        ${guest_env[@]+"${guest_env[@]}"} >"$work/target-run.out" 2>&1 &
      apid=$!
      pids+=("$apid")
      ready=0
      for ((i = 0; i < 2400; i++)); do  # 240 s: a boot, perhaps a second one after a TCG stall
        if grep -q "^LEAP-GUEST: TARGET-READY" "$alog" 2>/dev/null; then ready=1; break; fi
        grep -q "^LEAP-GUEST: \(FAIL\|END\)" "$alog" 2>/dev/null && break
        kill -0 "$apid" 2>/dev/null || break
        sleep 0.1
      done
      if [ "$ready" != 1 ]; then
        kill -TERM "$apid" 2>/dev/null || true
        wait "$apid" 2>/dev/null || true
        unset 'pids[-1]'
        cat "$work/target-run.out" >&2; tail -n 40 "$alog" >&2
        die "chain: guest A's leapd target never became ready (log $alog)"
      fi
      log "chain: guest A serves $nqn on 127.0.0.1:$port (after $((i / 10)) s)"
      rc=0
      # the host's leapd serve: the initiator, serving the tenant over vhost-user
      rm -f "$sock"
      RUST_LOG=${RUST_LOG:-info} "$host_leapd" serve --socket "$sock" --no-rpc \
        --queues "${VFIO_CHAIN_QUEUES:-2}" --pollers 1 \
        --disk "nvme-tcp://127.0.0.1:$port/$nqn,queues=${VFIO_CHAIN_QUEUES:-2},timeout=60s${VFIO_CHAIN_DISK_OPTS:-}" \
        >"$slog" 2>&1 &
      spid=$!
      pids+=("$spid")
      for ((i = 0; i < 600; i++)); do
        [ -S "$sock" ] && break
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.1
      done
      if [ ! -S "$sock" ]; then
        tail -n 30 "$slog" >&2
        log "chain: leapd serve did not create $sock (log $slog)"
        rc=1
      else
        # the tenant
        "$here/run-guest.sh" --socket "$sock" --job verify --queues "${VFIO_CHAIN_QUEUES:-2}" \
          --expect-queues "${VFIO_CHAIN_QUEUES:-2}" --expect-size-bytes "$size" \
          --expect-discard "${VFIO_CHAIN_EXPECT_DISCARD:-0}" \
          --expect-write-cache "${VFIO_CHAIN_EXPECT_WRITE_CACHE:-}" \
          --verify-size-mb 16 --timeout "$gtimeout" --log "$glog" || rc=$?
      fi
      # stop leapd serve (it must exit 0)
      if kill -0 "$spid" 2>/dev/null; then
        kill -TERM "$spid"
        src=0; wait "$spid" || src=$?
        [ "$src" = 0 ] || { log "chain: leapd serve exited with $src after SIGTERM"; rc=1; }
      else
        src=0; wait "$spid" || src=$?
        log "chain: leapd serve died (status $src)"; rc=1
      fi
      unset 'pids[-1]'
      grep -E "nvme-tcp|totals" "$slog" | tail -n 5 | sed 's/^/  serve: /' || true
      # tell guest A how it went; it stops its target (SIGTERM, must exit 0) and powers off
      msg="done"; [ "$rc" = 0 ] || msg=failed
      python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1", int(sys.argv[1])), 10); s.sendall((sys.argv[2]+"\n").encode()); s.close()' \
        "$stopport" "$msg" || { log "chain: could not reach guest A's stop port"; rc=1; }
      arc=0; wait "$apid" || arc=$?
      unset 'pids[-1]'
      cat "$work/target-run.out"
      guest_checks "$alog"
      [ "$arc" = 0 ] || { log "chain: guest A (the target) failed (log $alog)"; rc=1; }
      if [ "$rc" != 0 ]; then
        echo "---- leapd serve log (last 30 lines) ----" >&2; tail -n 30 "$slog" >&2
        die "chain (tenant log $glog, target guest log $alog, serve log $slog)"
      fi
      echo "vfio-guest: PASS chain (tenant → vhost-user → leapd serve → NVMe/TCP → leapd target in a guest → VFIO → NVMe)"
      ;;
  esac
done
