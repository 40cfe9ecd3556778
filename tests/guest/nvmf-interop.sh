#!/usr/bin/env bash
# NVMe/TCP interoperability with Linux, one guest boot per direction:
#   host-initiator  Linux's initiator (nvme discover / nvme connect in a guest) against a
#                   [[target]] of `leapd serve --config` on the host's loopback: discovery log,
#                   size, fio crc32c verify, with and without header/data digests; while the
#                   guest is connected `leapctl target ns-add` attaches namespace 2 (the kernel
#                   finds it through the Namespace Attribute Changed event, fio verifies it) and
#                   `leapctl target ns-remove` detaches it (its block device goes).
#   leap-to-nvmet   Linux's target (nvmet-tcp in guest A, a file on tmpfs) exported to
#                   `leapd serve --disk nvme-tcp://...` on the host; guest B runs the verify job
#                   on that vhost-user disk (guest B → leapd → NVMe/TCP → nvmet → tmpfs).
#   leap-to-leap    `leapd target` (file) → `leapd serve --disk nvme-tcp://...` (with digests)
#                   → guest running the verify job, 2 queues.
#   overload        as leap-to-leap without digests, but the target admits only 4 commands per
#                   queue and 6 in all: it must reject (retryable, with a retry delay) while the
#                   guest's verify job still sees no error.
#
#   tests/guest/nvmf-interop.sh [CASE...]     (default: all four)
# Env: LEAPD (default target/release/leapd), LEAP_REQUIRE_GUEST=1 or CI=true: missing tools fail
# instead of skipping.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
leapd=${LEAPD:-$root/target/release/leapd}
leapctl=$(dirname "$leapd")/leapctl
if [ $# -gt 0 ]; then cases=("$@"); else cases=(host-initiator leap-to-leap leap-to-nvmet overload); fi

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
guest_deps_or_skip nvmf-interop python3
[ -x "$leapd" ] || { echo "nvmf-interop: $leapd not built (cargo build --release -p leap-soc)" >&2; exit 1; }

work=$(mktemp -d "$root/target/nvmf-interop.XXXXXX")
pids=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# free_port: a loopback TCP port nobody listens on
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_target LOG ARGS...: runs leapd target in the background, waits until it listens
start_target() {
  local log=$1; shift
  RUST_LOG=${RUST_LOG:-info} "$leapd" target "$@" >"$log" 2>&1 &
  pids+=($!)
  local i
  for ((i = 0; i < 100; i++)); do
    grep -q "NVMe/TCP target" "$log" && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  cat "$log" >&2
  return 1
}

# start_serve LOG SOCK ARGS...: runs leapd serve in the background, waits for its socket
start_serve() {
  local log=$1 sock=$2; shift 2
  RUST_LOG=${RUST_LOG:-info} "$leapd" serve --socket "$sock" "$@" >"$log" 2>&1 &
  pids+=($!)
  local i
  for ((i = 0; i < 300; i++)); do
    [ -S "$sock" ] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  cat "$log" >&2
  return 1
}

# stop_serve LOG: SIGTERM to the newest background leapd serve, which must exit 0
stop_serve() {
  local log=$1 p=${pids[-1]} rc=0
  kill -TERM "$p"
  wait "$p" || rc=$?
  unset 'pids[-1]'
  grep -E "nvme-tcp|totals" "$log" | tail -n 5 || true
  if [ "$rc" != 0 ]; then echo "nvmf-interop: leapd serve exited with $rc" >&2; tail -n 30 "$log" >&2; return 1; fi
}

# stop_last LOG: SIGTERM to the newest background leapd, which must exit 0 with no fatal errors
stop_last() {
  local log=$1 p=${pids[-1]} rc=0
  kill -TERM "$p"
  wait "$p" || rc=$?
  unset 'pids[-1]'
  if [ "$rc" != 0 ]; then echo "nvmf-interop: leapd exited with $rc" >&2; tail -n 30 "$log" >&2; return 1; fi
  grep -E "target totals|event=target_removed" "$log" || true
  if grep -q "fatal_errors=[1-9]" "$log"; then
    echo "nvmf-interop: the target saw protocol errors:" >&2
    grep -iE "protocol error|WARN|ERROR" "$log" | tail -n 20 >&2
    return 1
  fi
}

nqn=nqn.2026-12.io.leap:interop
for c in "${cases[@]}"; do
  case "$c" in
    host-initiator)
      port=$(free_port); dport=$(free_port)
      size=$((256 << 20)) ns2=$((32 << 20))
      tlog=$work/target.log glog=$work/host-guest.log rpc=$work/leapd.rpc
      printf '[pollers]\ncount = 1\n\n[[target]]\nname = "interop"\nlisten = "127.0.0.1:%s"\ndiscovery_port = %s\nnqn = "%s"\n\n[[target.namespace]]\ndisk = "%s,size=%s"\n' \
        "$port" "$dport" "$nqn" "$work/ns1.img" "$size" > "$work/target.toml"
      RUST_LOG=${RUST_LOG:-info} "$leapd" serve --config "$work/target.toml" --rpc-socket "$rpc" \
        >"$tlog" 2>&1 &
      pids+=($!)
      for ((i = 0; i < 100; i++)); do
        grep -q "NVMe/TCP target" "$tlog" && break
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.1
      done
      grep -q "NVMe/TCP target" "$tlog" || { cat "$tlog" >&2; echo "nvmf-interop: leapd serve did not start" >&2; exit 1; }
      rc=0
      "$here/run-guest.sh" --job nvmf-host --net --timeout 480 --log "$glog" \
        --env NVMF_PORT="$port" --env NVMF_DISC_PORT="$dport" --env NVMF_NQN="$nqn" \
        --env NVMF_MODES="plain digests" --env EXPECT_SIZE_BYTES="$size" \
        --env VERIFY_SIZE_MB=16 --env NVMF_LIVE_NS=1 --env NVMF_NS2_BYTES="$ns2" \
        >"$work/host-run.out" 2>&1 &
      gpid=$!
      pids+=("$gpid")
      # The guest asks for namespace 2 and says when it is done with it (console lines).
      live=add
      while kill -0 "$gpid" 2>/dev/null; do
        if [ "$live" = add ] && grep -q "LEAP-NVMF: WANT-NS2" "$glog" 2>/dev/null; then
          "$leapctl" -s "$rpc" target ns-add interop --disk "ram,size=$ns2" || rc=1
          live=remove
        elif [ "$live" = remove ] && grep -q "LEAP-NVMF: NS2-DONE" "$glog" 2>/dev/null; then
          "$leapctl" -s "$rpc" target ns-remove interop 2 || rc=1
          "$leapctl" -s "$rpc" target list || true
          live=done
        fi
        sleep 0.2
      done
      wait "$gpid" || rc=$?
      unset 'pids[-1]'
      cat "$work/host-run.out"
      grep "LEAP-CHECK" "$glog" | sed 's/^/  guest: /' || true
      [ "$live" = done ] || { echo "nvmf-interop: the guest never asked for / finished with namespace 2" >&2; rc=1; }
      if [ "$live" = done ] && ! grep -q "event=namespace_removed target=interop nsid=2 drained=true" "$tlog"; then
        echo "nvmf-interop: namespace 2's commands did not drain at its removal" >&2; rc=1
      fi
      stop_last "$tlog" || rc=1
      if [ "$rc" != 0 ]; then
        echo "---- leapd serve log (last 40 lines) ----" >&2; tail -n 40 "$tlog" >&2
        echo "nvmf-interop: FAIL host-initiator" >&2; exit 1
      fi
      echo "nvmf-interop: PASS host-initiator (Linux nvme-tcp → leapd serve [[target]], namespace attached and detached live)"
      ;;
    leap-to-leap)
      port=$(free_port)
      size=$((256 << 20))
      tlog=$work/l2l-target.log slog=$work/l2l-serve.log sock=$work/l2l.sock
      start_target "$tlog" --listen "127.0.0.1:$port" --discovery-port 0 --nqn "$nqn" \
        --disk "$work/l2l.img,size=$size" --pollers 1
      start_serve "$slog" "$sock" --queues 2 --pollers 1 \
        --disk "nvme-tcp://127.0.0.1:$port/$nqn,queues=2,digest=on,timeout=30s"
      rc=0
      "$here/run-guest.sh" --socket "$sock" --job verify --queues 2 --expect-queues 2 \
        --expect-size-bytes "$size" --expect-discard 1 --expect-write-cache "write back" \
        --verify-size-mb 16 --timeout 300 || rc=$?
      stop_serve "$slog" || rc=1
      stop_last "$tlog" || rc=1
      if [ "$rc" != 0 ]; then
        echo "---- leapd serve log ----" >&2; tail -n 30 "$slog" >&2
        echo "---- leapd target log ----" >&2; tail -n 30 "$tlog" >&2
        echo "nvmf-interop: FAIL leap-to-leap" >&2; exit 1
      fi
      echo "nvmf-interop: PASS leap-to-leap (guest → leapd serve → NVMe/TCP → leapd target)"
      ;;
    overload)
      port=$(free_port)
      size=$((256 << 20))
      tlog=$work/ol-target.log slog=$work/ol-serve.log sock=$work/ol.sock
      start_target "$tlog" --listen "127.0.0.1:$port" --discovery-port 0 --nqn "$nqn" \
        --disk "$work/ol.img,size=$size" --pollers 1 --queue-inflight 4 --max-inflight 6 \
        --reserve-pct 34
      start_serve "$slog" "$sock" --queues 2 --pollers 1 \
        --disk "nvme-tcp://127.0.0.1:$port/$nqn,queues=2,timeout=60s"
      rc=0
      "$here/run-guest.sh" --socket "$sock" --job verify --queues 2 --expect-queues 2 \
        --expect-size-bytes "$size" --expect-discard 1 --expect-write-cache "write back" \
        --verify-size-mb 8 --timeout 420 || rc=$?
      stop_serve "$slog" || rc=1
      stop_last "$tlog" || rc=1
      rejects=$(sed -n 's/.*target totals:.* rejects=\([0-9]*\).*/\1/p' "$tlog" | tail -1)
      if [ "${rejects:-0}" -eq 0 ]; then
        echo "nvmf-interop: overload: the target rejected nothing (the case did not overload it)" >&2; rc=1
      fi
      if grep -q "totals:.* errors=[1-9]" "$slog"; then
        echo "nvmf-interop: overload: commands failed at leapd serve" >&2; rc=1
      fi
      if [ "$rc" != 0 ]; then
        echo "---- leapd serve log ----" >&2; tail -n 30 "$slog" >&2
        echo "---- leapd target log ----" >&2; tail -n 30 "$tlog" >&2
        echo "nvmf-interop: FAIL overload" >&2; exit 1
      fi
      echo "nvmf-interop: PASS overload ($rejects rejects retried by leapd; the guest saw no error)"
      ;;
    leap-to-nvmet)
      hport=$(free_port); dport=$(free_port)
      tnqn=nqn.2026-12.io.leap:nvmet
      alog=$work/nvmet-guest.log slog=$work/l2n-serve.log sock=$work/l2n.sock
      "$here/run-guest.sh" --job nvmf-target --net --timeout 600 --log "$alog" \
        --hostfwd "tcp:127.0.0.1:$hport-:4420" --hostfwd "tcp:127.0.0.1:$dport-:9999" \
        --env NVMF_NQN="$tnqn" --env NVMF_SIZE_MB=128 >"$work/nvmet-run.out" 2>&1 &
      apid=$!
      pids+=("$apid")
      ready=0
      for ((i = 0; i < 1200; i++)); do
        if grep -q "LEAP-NVMF: READY" "$alog" 2>/dev/null; then ready=1; break; fi
        kill -0 "$apid" 2>/dev/null || break
        sleep 0.1
      done
      if [ "$ready" != 1 ]; then
        cat "$work/nvmet-run.out" >&2; tail -n 40 "$alog" >&2
        echo "nvmf-interop: FAIL leap-to-nvmet (the nvmet guest never became ready)" >&2; exit 1
      fi
      rc=0
      start_serve "$slog" "$sock" --queues 1 --pollers 1 \
        --disk "nvme-tcp://127.0.0.1:$hport/$tnqn,queues=1,timeout=60s" || rc=1
      if [ "$rc" = 0 ]; then
        "$here/run-guest.sh" --socket "$sock" --job verify --queues 1 \
          --expect-size-bytes $((128 << 20)) --expect-discard 1 --expect-write-cache "" \
          --verify-size-mb 8 --timeout 420 || rc=$?
        stop_serve "$slog" || rc=1
      fi
      # tell the nvmet guest to finish, then collect its verdict
      msg=done; [ "$rc" = 0 ] || msg=failed
      python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5); s.sendall((sys.argv[2]+"\n").encode()); s.close()' "$dport" "$msg" || true
      wait "$apid" || rc=1
      unset 'pids[-1]'
      cat "$work/nvmet-run.out"
      if [ "$rc" != 0 ]; then
        echo "---- leapd serve log ----" >&2; tail -n 30 "$slog" >&2
        echo "---- nvmet guest log ----" >&2; tail -n 30 "$alog" >&2
        echo "nvmf-interop: FAIL leap-to-nvmet" >&2; exit 1
      fi
      echo "nvmf-interop: PASS leap-to-nvmet (guest → leapd serve → NVMe/TCP → Linux nvmet in a guest)"
      ;;
    *) echo "nvmf-interop: unknown case $c" >&2; exit 2 ;;
  esac
done
