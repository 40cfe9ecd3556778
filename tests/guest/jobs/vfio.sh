# Guest job "vfio" (busybox sh; run by /init with /job/env sourced): Leap's userspace NVMe driver
# (disk spec vfio:BDF[/NSID]) on QEMU's emulated NVMe controller behind the emulated Intel IOMMU
# (run-guest.sh --nvme IMG; binaries with run-guest.sh --file SRC:/job/bin/NAME, static). Steps,
# in this order, each when asked for:
#   always          find the controller (PCI class 0x010802), bind it to vfio-pci:
#                   "LEAP-CHECK: ok vfio bound BDF group N"
#   VFIO_TEST_BIN   path (in the guest) of the driver's integration-test binary: run with
#                   LEAP_VFIO_DEVICE=BDF (LEAP_VFIO_NSID=VFIO_NSID when set), --test-threads=1
#                   --nocapture and VFIO_TEST_ARGS (e.g. a test name filter), at most
#                   VFIO_TEST_TIMEOUT s (default: the job's time less 60 s). It must exit 0 and
#                   run at least one test.
#   VFIO_BENCH=1    `leapd bench --backend vfio:BDF` (VFIO_BENCH_RW, default randread; VFIO_BENCH_BS
#                   bytes, default 4096; VFIO_BENCH_QD, default 32; VFIO_BENCH_SECONDS, default 5;
#                   VFIO_BENCH_ARGS appended), then the kernel's nvme driver on the same controller
#                   with fio (io_uring, else libaio; direct=1, same pattern, 1 s ramp). Prints
#                     GUEST-BENCH vfio iops=N cpu_per_io_ns=N mean_us=X p99_us=X
#                     GUEST-BENCH kernel iops=N cpu_per_io_ns=N mean_us=X engine=E usr_pct=X sys_pct=X
#                     GUEST-BENCH ratio iops_vfio_over_kernel=X cpu_per_io_vfio_over_kernel=X
#                   vfio's CPU per I/O is what leapd bench reports: its poller thread's CPU time
#                   (the in-process vhost-user driver standing in for the guest is not counted);
#                   the kernel's is fio's usr+sys CPU (submission, completion and the driver's
#                   work in the process's context; interrupts that land elsewhere are not counted).
#                   Afterwards the controller stays with the kernel's driver (a later step binds
#                   it back to vfio-pci).
#   VFIO_TARGET=1   needs run-guest.sh --net and --hostfwd tcp:127.0.0.1:P-:4420 (the NVMe/TCP
#                   port, VFIO_TARGET_PORT) and tcp:127.0.0.1:Q-:9999 (the stop port,
#                   VFIO_TARGET_STOP_PORT). Runs `leapd target --listen 10.0.2.15:4420
#                   --discovery-port 0 --nqn VFIO_TARGET_NQN --disk vfio:BDF[/NSID] --pollers 1
#                   VFIO_TARGET_ARGS` in the background and prints "LEAP-GUEST: TARGET-READY"
#                   once it listens. It then serves until the host connects to the stop port and
#                   sends a line: "done" (the host's side passed) or anything else (it failed:
#                   this job fails too). Then SIGTERM: leapd must exit 0 with fatal_errors=0.
#                   VFIO_TARGET_SECONDS: a timed run instead, which ends normally after that
#                   many seconds unless the host says otherwise first. Without it, no word from
#                   the host within the job's time (less 60 s) fails the job. Why a stop port: a
#                   host that dies leaves the guest to its own deadline, and one that finishes
#                   says so at once (the guest has no other channel to the host).
#   VFIO_HOTREMOVE=1  last: (with VFIO_TEST_BIN) the test binary's hot_remove_fails_commands_cleanly
#                   alone, then a PCI rescan and vfio-pci again; then `leapd serve` with one
#                   NVMe/TCP target on 127.0.0.1:4420 whose namespace 1 is the controller and
#                   namespace 2 a RAM disk, connected by the guest's own kernel initiator; the
#                   controller is removed (echo 1 > .../remove) while fio runs on both:
#                   namespace 1's fio must fail, namespace 2's verify must pass, the removal
#                   must finish (leapd lets the device go), leapd must log "controller failed",
#                   keep running, and exit 0 on SIGTERM
# Other env: NVME_BDF (default: found by class), VFIO_NSID, VFIO_HUGEPAGES (2 MiB pages to reserve
# first), LEAPD (default /job/bin/leapd), RUST_LOG (default info).
# shellcheck shell=sh source=/dev/null
# shellcheck disable=SC2086  # the *_ARGS variables are split on purpose
. /job/lib.sh

LEAPD=${LEAPD:-/job/bin/leapd}
t_job=$(uptime_s)
budget=$((${GUEST_TIMEOUT:-200} - 60))
[ "$budget" -ge 30 ] || budget=30
export RUST_LOG=${RUST_LOG:-info} RUST_LOG_STYLE=never RUST_BACKTRACE=1
# shellcheck disable=SC3045  # busybox sh has ulimit -l
ulimit -l unlimited 2>/dev/null || true
if [ -n "${VFIO_HUGEPAGES:-}" ]; then
  echo "$VFIO_HUGEPAGES" > /proc/sys/vm/nr_hugepages
  note "hugepages: $(cat /proc/sys/vm/nr_hugepages) of $VFIO_HUGEPAGES reserved"
fi

# --- find the controller and give it to vfio-pci ----------------------------------------------
BDF=${NVME_BDF:-$(nvme_pci_bdf)} || die "no NVMe controller (PCI class 0x010802): run-guest.sh --nvme IMG adds one"
[ -n "$BDF" ] || die "no NVMe controller (PCI class 0x010802)"
note "NVMe controller $BDF: vendor $(cat /sys/bus/pci/devices/"$BDF"/vendor) device $(cat /sys/bus/pci/devices/"$BDF"/device) driver '$(pci_driver "$BDF")' (nothing may bind it at boot)"
[ -z "$(pci_driver "$BDF")" ] || fail "$BDF was bound to '$(pci_driver "$BDF")' at boot"
note "IOMMU: $(dmesg | grep -E 'DMAR: IOMMU enabled|DMAR-IR: Enabled|DMAR: Intel\(R\) Virtualization' | sed 's/^\[[^]]*\] //' | tr '\n' ';')"
# A user's first mistake: the controller is not bound to vfio-pci. leapd must say so, and how.
if [ -x "$LEAPD" ]; then
  if "$LEAPD" bench --backend "vfio:$BDF" --seconds 1 > /tmp/unbound.out 2>&1; then
    fail "leapd used $BDF although it is bound to no driver"
  elif grep -q "bound to no driver; bind it with" /tmp/unbound.out; then
    ok "unbound controller refused: $(grep -o 'vfio:[^;]*' /tmp/unbound.out | head -n 1)"
  else
    tail -n 3 /tmp/unbound.out
    fail "leapd's error for an unbound controller does not say how to bind it"
  fi
fi
t0=$(uptime_s)
bind_vfio "$BDF" || exit 1
ok "vfio bound $BDF group $VFIO_GROUP"
note "bind took $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN{printf "%.2f", b-a}') s; /dev/vfio: $(echo /dev/vfio/*)"
SPEC=vfio:$BDF${VFIO_NSID:+/$VFIO_NSID}

# ensure_vfio: the controller back on vfio-pci (after the kernel driver had it)
ensure_vfio() {
  [ "$(pci_driver "$BDF")" = vfio-pci ] && return 0
  bind_vfio "$BDF" && note "rebound $BDF to vfio-pci (group $VFIO_GROUP)"
}

# --- the driver's integration tests -------------------------------------------------------------
if [ -n "${VFIO_TEST_BIN:-}" ]; then
  if [ ! -x "$VFIO_TEST_BIN" ]; then
    fail "VFIO_TEST_BIN=$VFIO_TEST_BIN is not an executable in the guest (run-guest.sh --file SRC:$VFIO_TEST_BIN)"
  else
    note "running $VFIO_TEST_BIN with LEAP_VFIO_DEVICE=$BDF"
    rm -f /tmp/vfio-tests.rc
    # output goes to the console as it comes (a hang or crash still shows how far it got)
    brc=0
    run_bounded "${VFIO_TEST_TIMEOUT:-$budget}" "the vfio tests" sh -c \
      '{ "$@" 2>&1; echo $? > /tmp/vfio-tests.rc; } | tee /tmp/vfio-tests.out' _ \
      env LEAP_VFIO_DEVICE="$BDF" ${VFIO_NSID:+LEAP_VFIO_NSID=$VFIO_NSID} \
      "$VFIO_TEST_BIN" --test-threads=1 --nocapture ${VFIO_TEST_ARGS:-} || brc=$?
    rc=$(cat /tmp/vfio-tests.rc 2>/dev/null || echo "none (killed)")
    summary=$(grep '^test result:' /tmp/vfio-tests.out | tail -n 1)
    if [ "$brc" = 124 ]; then
      :  # run_bounded reported it
    elif [ "$rc" != 0 ]; then
      fail "the vfio tests failed (status $rc): ${summary:-no summary}"
    elif grep -q '^running 0 tests' /tmp/vfio-tests.out && ! grep -q '^running [1-9]' /tmp/vfio-tests.out; then
      fail "the vfio test binary ran no tests (filter '${VFIO_TEST_ARGS:-}'?)"
    else
      ok "vfio tests: $summary"
    fi
  fi
fi

# --- leapd bench on vfio against fio on the kernel's driver -------------------------------------
if [ "${VFIO_BENCH:-0}" = 1 ]; then
  RW=${VFIO_BENCH_RW:-randread} BS=${VFIO_BENCH_BS:-4096} QD=${VFIO_BENCH_QD:-32} S=${VFIO_BENCH_SECONDS:-5}
  [ -x "$LEAPD" ] || die "$LEAPD is not an executable in the guest (run-guest.sh --file SRC:$LEAPD)"
  ensure_vfio || exit 1
  note "leapd bench --backend $SPEC --rw $RW --bs $BS --iodepth $QD --seconds $S ${VFIO_BENCH_ARGS:-}"
  if run_bounded $((S * 4 + 60)) "leapd bench" sh -c '"$@" > /tmp/bench.out 2> /tmp/bench.err' _ \
       "$LEAPD" bench --backend "$SPEC" --rw "$RW" --bs "$BS" --iodepth "$QD" --seconds "$S" \
       ${VFIO_BENCH_ARGS:-}; then
    line=$(grep '^bench backend=' /tmp/bench.out | tail -n 1)
    echo "  leapd: $line"
  else
    line=""
    tr '\r' '\n' < /tmp/bench.err | grep -v '^ *$' | tail -n 20
    cat /tmp/bench.out
    fail "leapd bench --backend $SPEC failed"
  fi
  field() { echo "$1" | sed -n "s/.* $2=\([^ ]*\).*/\1/p"; }
  v_iops=$(field "$line" iops) v_cpu=$(field "$line" cpu_ns_per_io)
  [ -z "$line" ] || echo "GUEST-BENCH vfio iops=$v_iops cpu_per_io_ns=$v_cpu mean_us=$(field "$line" mean_us) p99_us=$(field "$line" p99_us) rw=$RW bs=$BS qd=$QD"

  # the same pattern through the kernel's driver
  k_iops=""
  if bind_kernel_nvme "$BDF"; then
    qc=$(cat /sys/bus/pci/devices/"$BDF"/nvme/nvme*/queue_count 2>/dev/null | head -n 1)
    note "kernel nvme: $BDF is $NVME_DEV ($(cat "/sys/block/${NVME_DEV#/dev/}/size") sectors, $((${qc:-1} - 1)) I/O queues)"
    if fio --enghelp 2>/dev/null | grep -qw io_uring; then ENGINE=io_uring; else ENGINE=$(fio_engine); fi
    if out=$(fio --name=kernel-nvme --filename="$NVME_DEV" --direct=1 --ioengine="$ENGINE" \
               --rw="$RW" --bs="$BS" --iodepth="$QD" --numjobs=1 --time_based --runtime="$S" \
               --ramp_time=1 --norandommap --randrepeat=0 --group_reporting \
               --output-format=terse --terse-version=3 2>&1); then
      # terse v3: read iops 8, lat mean 40 (us); write iops 49, lat mean 81; usr 88, sys 89 (%)
      # shellcheck disable=SC2046  # split into the positional parameters on purpose
      set -- $(echo "$out" | grep '^3;' | tail -n 1 | awk -F';' '{
        iops = $8 + $49; lat = ($8 > 0 ? $40 : $81); usr = $88; sys = $89
        sub(/%/, "", usr); sub(/%/, "", sys)
        cpu = (iops > 0 ? (usr + sys) / 100 * 1e9 / iops : 0)
        printf "%d %.0f %.1f %.1f %.1f\n", iops, cpu, lat, usr, sys }')
      k_iops=$1
      echo "GUEST-BENCH kernel iops=$1 cpu_per_io_ns=$2 mean_us=$3 engine=$ENGINE usr_pct=$4 sys_pct=$5 rw=$RW bs=$BS qd=$QD"
      if [ -n "$v_iops" ] && [ "${k_iops:-0}" -gt 0 ] && [ "${2:-0}" != 0 ]; then
        echo "GUEST-BENCH ratio $(awk -v vi="$v_iops" -v ki="$k_iops" -v vc="$v_cpu" -v kc="$2" \
          'BEGIN { printf "iops_vfio_over_kernel=%.2f cpu_per_io_vfio_over_kernel=%.2f", vi / ki, vc / kc }')"
      fi
    else
      echo "$out" | tail -n 20
      fail "fio on $NVME_DEV (kernel nvme, $ENGINE) failed"
    fi
  fi
fi

# --- leapd target on vfio, for an initiator on the host ----------------------------------------
if [ "${VFIO_TARGET:-0}" = 1 ]; then
  [ -x "$LEAPD" ] || die "$LEAPD is not an executable in the guest (run-guest.sh --file SRC:$LEAPD)"
  ensure_vfio || exit 1
  net_up || die "cannot bring eth0 up (run-guest.sh --net)"
  PORT=${VFIO_TARGET_PORT:-4420} STOP_PORT=${VFIO_TARGET_STOP_PORT:-9999}
  NQN=${VFIO_TARGET_NQN:-nqn.2026-12.io.leap:vfio}
  note "leapd target --listen 10.0.2.15:$PORT --nqn $NQN --disk $SPEC ${VFIO_TARGET_ARGS:-}"
  "$LEAPD" target --listen "10.0.2.15:$PORT" --discovery-port 0 --nqn "$NQN" --disk "$SPEC" \
    --pollers 1 ${VFIO_TARGET_ARGS:-} > /tmp/target.log 2>&1 &
  tpid=$!
  tail -f /tmp/target.log &
  tailpid=$!
  i=0
  while ! grep -q "NVMe/TCP target" /tmp/target.log; do
    kill -0 "$tpid" 2>/dev/null || break
    i=$((i + 1)); [ "$i" -gt 1200 ] && break
    sleep 0.1
  done
  if ! grep -q "NVMe/TCP target" /tmp/target.log; then
    kill_tree "$tailpid" KILL
    if kill -0 "$tpid" 2>/dev/null; then
      kill_tree "$tpid" KILL
      die "leapd target did not listen within 120 s"
    fi
    wait "$tpid"
    die "leapd target exited with status $? before listening"
  fi
  echo "LEAP-GUEST: TARGET-READY"
  ok "leapd target serves $SPEC as $NQN on 10.0.2.15:$PORT (pid $tpid)"

  # serve until the host's word on the stop port, the target's death or the deadline
  nc -l -p "$STOP_PORT" > /tmp/stop 2>/dev/null &
  ncpid=$!
  limit=${VFIO_TARGET_SECONDS:-$((${t_job%.*} + budget - $(cut -d. -f1 /proc/uptime)))}
  [ "$limit" -ge 10 ] || limit=10
  deadline=$(($(cut -d. -f1 /proc/uptime) + limit))
  why=""
  while :; do
    if ! kill -0 "$ncpid" 2>/dev/null; then why=host; break; fi
    if ! kill -0 "$tpid" 2>/dev/null; then why=died; break; fi
    if [ "$(cut -d. -f1 /proc/uptime)" -ge "$deadline" ]; then why=deadline; break; fi
    sleep 0.5
  done
  case "$why" in
    host)
      msg=$(head -n 1 /tmp/stop)
      note "host says: '$msg'"
      [ "$msg" = "done" ] || fail "the host's side failed (it said '$msg')"
      ;;
    died)
      kill_tree "$ncpid" KILL
      ;;
    deadline)
      kill_tree "$ncpid" KILL
      if [ -n "${VFIO_TARGET_SECONDS:-}" ]; then note "timed run of ${VFIO_TARGET_SECONDS}s over"
      else fail "no word from the host on port $STOP_PORT within ${limit}s"; fi
      ;;
  esac
  if [ "$why" = died ]; then
    wait "$tpid"; trc=$?
    fail "leapd target exited by itself (status $trc) while serving"
  else
    kill -TERM "$tpid"
    i=0
    while kill -0 "$tpid" 2>/dev/null && [ "$i" -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
    if kill -0 "$tpid" 2>/dev/null; then
      fail "leapd target ignored SIGTERM for 30 s"
      kill_tree "$tpid" KILL
    fi
    wait "$tpid"; trc=$?
    if [ "$trc" = 0 ]; then ok "leapd target exited 0 after SIGTERM"
    else fail "leapd target exited with status $trc after SIGTERM"; fi
  fi
  sleep 0.3
  kill_tree "$tailpid" KILL
  totals=$(grep "target totals" /tmp/target.log | tail -n 1)
  note "${totals:-no target totals line}"
  case "$totals" in *fatal_errors=0*) ;; *fatal_errors=*) fail "the target saw protocol errors: $totals" ;; esac
fi

# --- hot-remove: the driver's test, then leapd serving two namespaces while one goes ------------
if [ "${VFIO_HOTREMOVE:-0}" = 1 ]; then
  ensure_vfio || exit 1
  # 1. The driver alone: reads in flight when the kernel takes the device back.
  if [ -n "${VFIO_TEST_BIN:-}" ]; then
    note "hot-remove: $VFIO_TEST_BIN hot_remove_fails_commands_cleanly"
    if run_bounded 120 "the hot-remove test" sh -c '"$@" > /tmp/hr-test.out 2>&1' _ \
         env LEAP_VFIO_DEVICE="$BDF" LEAP_VFIO_HOTREMOVE=1 "$VFIO_TEST_BIN" --test-threads=1 \
         --nocapture --exact hot_remove_fails_commands_cleanly \
       && grep -q '^test result: ok. 1 passed' /tmp/hr-test.out; then
      ok "hot-remove test: $(grep -o 'vfio: hot-remove.*' /tmp/hr-test.out)"
    else
      tail -n 30 /tmp/hr-test.out
      fail "the hot-remove test failed"
    fi
    # The device comes back as a new one (no driver_override): give it to vfio-pci again.
    echo 1 > /sys/bus/pci/rescan
    i=0
    while [ ! -e "/sys/bus/pci/devices/$BDF" ] && [ "$i" -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    bind_vfio "$BDF" || exit 1
    note "rescanned: $BDF back on vfio-pci (group $VFIO_GROUP)"
  fi
  # 2. leapd: one NVMe/TCP target with the controller as namespace 1 and a RAM disk as
  # namespace 2, used by the guest's own kernel initiator over loopback. The controller goes
  # while fio runs on both: namespace 1's I/O fails, namespace 2's verify job must pass, leapd
  # must log the failure, keep running and still stop cleanly.
  [ -x "$LEAPD" ] || die "$LEAPD is not an executable in the guest (run-guest.sh --file SRC:$LEAPD)"
  HR_NQN=nqn.2026-12.io.leap:hotremove
  {
    echo '[[target]]'
    echo 'name = "hr"'
    echo 'listen = "127.0.0.1:4420"'
    echo "nqn = \"$HR_NQN\""
    echo '[[target.namespace]]'
    echo "disk = \"$SPEC\""
    echo '[[target.namespace]]'
    echo 'disk = "ram,size=64M"'
  } > /tmp/hr.toml
  ip link set lo up
  "$LEAPD" serve --config /tmp/hr.toml --no-rpc > /tmp/hr.log 2>&1 &
  lpid=$!
  i=0
  while ! grep -q "connect with" /tmp/hr.log && kill -0 "$lpid" 2>/dev/null && [ "$i" -lt 300 ]; do
    i=$((i + 1)); sleep 0.1
  done
  grep -q "connect with" /tmp/hr.log || { cat /tmp/hr.log; die "leapd serve did not start its target"; }
  mkdir -p /etc/nvme
  echo "nqn.2014-08.org.nvmexpress:uuid:6c5b0a3e-1d2f-4c8b-9f0e-1eafe5700002" > /etc/nvme/hostnqn
  if ! out=$(nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$HR_NQN" 2>&1); then
    echo "$out"; cat /tmp/hr.log; die "nvme connect to leapd's target failed"
  fi
  # the two namespaces' block devices (the subsystem's heads, by NSID)
  N1="" N2=""
  i=0
  while { [ -z "$N1" ] || [ -z "$N2" ]; } && [ "$i" -lt 100 ]; do
    for n in /sys/block/nvme*n*; do
      case "${n##*/}" in *c*n*) continue ;; esac
      # a multipath head's device is its subsystem, a plain namespace's its controller: both
      # have the subsystem NQN
      [ "$(cat "$n/device/subsysnqn" 2>/dev/null)" = "$HR_NQN" ] || continue
      case "$(cat "$n/nsid" 2>/dev/null)" in 1) N1=/dev/${n##*/} ;; 2) N2=/dev/${n##*/} ;; esac
    done
    i=$((i + 1)); sleep 0.1
  done
  if [ ! -b "$N1" ] || [ ! -b "$N2" ]; then
    for n in /sys/block/nvme*; do echo "  $n: nsid=$(cat "$n/nsid" 2>/dev/null) nqn=$(cat "$n/device/subsysnqn" 2>/dev/null)"; done
    dmesg | grep -i nvme | tail -n 10
    die "no block devices for namespaces 1 and 2 of $HR_NQN"
  fi
  note "hot-remove: namespace 1 (vfio) is $N1, namespace 2 (ram) is $N2"
  ENGINE=$(fio_engine)
  vcommon="--direct=1 --ioengine=$ENGINE --randrepeat=1 --verify=crc32c --verify_fatal=1 --output-format=terse --terse-version=3"
  run_fio "namespace 1 (vfio) before the removal" --name=n1 --filename="$N1" $vcommon \
    --rw=randwrite --bs=4k --iodepth=8 --size=8M --do_verify=1
  # namespace 2 keeps a verify job going through the removal; namespace 1 reads
  fio --name=n2 --filename="$N2" $vcommon --rw=randwrite --bs=4k --iodepth=8 --size=16M \
    --do_verify=1 --loops=3 > /tmp/n2.out 2>&1 &
  f2=$!
  fio --name=n1b --filename="$N1" --direct=1 --ioengine="$ENGINE" --rw=randread --bs=4k \
    --iodepth=8 --size=8M --time_based --runtime=30 > /tmp/n1.out 2>&1 &
  f1=$!
  sleep 1
  t0=$(uptime_s)
  if run_bounded 60 "the removal of $BDF" sh -c "echo 1 > /sys/bus/pci/devices/$BDF/remove"; then
    ok "hot-remove: $BDF removed in $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN{printf "%.2f", b-a}') s while leapd used it"
  else
    fail "removing $BDF under leapd did not finish (leapd did not let go of the device)"
  fi
  if wait "$f1"; then fail "fio on namespace 1 saw no error after its controller went"
  else ok "namespace 1's I/O failed after the removal"; fi
  if wait "$f2"; then ok "namespace 2 (ram) kept serving: fio verify passed through the removal"
  else tail -n 5 /tmp/n2.out; fail "namespace 2's fio verify failed during namespace 1's removal"; fi
  if grep -q "controller failed" /tmp/hr.log; then
    ok "leapd logged: $(grep -o 'controller failed:.*' /tmp/hr.log | head -n 1)"
  else
    fail "leapd did not log the controller's failure"
  fi
  if kill -0 "$lpid" 2>/dev/null; then ok "leapd still runs"; else fail "leapd died"; fi
  nvme disconnect -n "$HR_NQN" >/dev/null 2>&1
  kill -TERM "$lpid"
  i=0
  while kill -0 "$lpid" 2>/dev/null && [ "$i" -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
  wait "$lpid"; lrc=$?
  if [ "$lrc" = 0 ]; then ok "leapd stopped cleanly (status 0)"
  else tail -n 20 /tmp/hr.log; fail "leapd exited with status $lrc"; fi
  grep -E "WARN|ERROR" /tmp/hr.log | head -n 10 | sed 's/^/  leapd: /'
fi

# --- the IOMMU's view ---------------------------------------------------------------------------
n=$(dmar_faults)
note "DMAR faults logged: $n"
[ "$n" = 0 ] || dmesg | grep -iE "DMAR" | tail -n 10 | sed 's/^/  dmesg: /'
dmesg | grep -iE "vfio|nvme" | tail -n 10 | sed 's/^/  dmesg: /'
note "vfio job took $(awk -v a="$t_job" -v b="$(uptime_s)" 'BEGIN{printf "%.1f", b-a}') s"
