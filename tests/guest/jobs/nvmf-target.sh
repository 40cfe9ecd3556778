# Guest job "nvmf-target": Linux's own NVMe/TCP target (nvmet-tcp, configured through configfs)
# exporting a RAM-backed namespace on port 4420, for an initiator on the host (reached through a QEMU
# hostfwd). The namespace is a file on tmpfs. Prints "LEAP-NVMF: READY" when it listens, then waits until the host connects to
# port 9999 and sends a line, and reports what nvmet saw. Env:
#   NVMF_NQN          subsystem NQN
#   NVMF_SIZE_MB      namespace size (default 128)
# shellcheck shell=sh source=/dev/null
. /job/lib.sh

NQN=${NVMF_NQN:-nqn.2026-12.io.leap:nvmet}
net_up || die "cannot bring eth0 up"
load_ondemand configfs nvmet nvmet_tcp
# The namespace is a file in RAM (tmpfs): nvmet's file back end.
img=/tmp/ns.img
truncate -s "${NVMF_SIZE_MB:-128}M" "$img" || die "cannot create $img"
mount -t configfs none /sys/kernel/config 2>/dev/null
cfg=/sys/kernel/config/nvmet
[ -d "$cfg" ] || die "no $cfg (nvmet not loaded?)"
mkdir "$cfg/subsystems/$NQN" || die "cannot create subsystem"
echo 1 > "$cfg/subsystems/$NQN/attr_allow_any_host"
mkdir "$cfg/subsystems/$NQN/namespaces/1"
echo -n "$img" > "$cfg/subsystems/$NQN/namespaces/1/device_path"
# tmpfs has no O_DIRECT: nvmet must use the page cache
echo 1 > "$cfg/subsystems/$NQN/namespaces/1/buffered_io"
echo 1 > "$cfg/subsystems/$NQN/namespaces/1/enable" || die "cannot enable the namespace"
mkdir "$cfg/ports/1"
echo tcp > "$cfg/ports/1/addr_trtype"
echo ipv4 > "$cfg/ports/1/addr_adrfam"
echo 0.0.0.0 > "$cfg/ports/1/addr_traddr"
echo 4420 > "$cfg/ports/1/addr_trsvcid"
ln -s "$cfg/subsystems/$NQN" "$cfg/ports/1/subsystems/$NQN" || die "cannot link the subsystem to the port"
ok "nvmet-tcp exports $img (${NVMF_SIZE_MB:-128} MiB) as $NQN on port 4420"
echo "LEAP-NVMF: READY"
# Wait for the host to say it is done (a line on port 9999).
nc -l -p 9999 > /tmp/done 2>/dev/null
note "host says: $(cat /tmp/done)"
grep -q '^done' /tmp/done || fail "host did not finish cleanly: $(cat /tmp/done)"
dmesg | grep -iE "nvmet" | tail -n 20 | sed 's/^/  dmesg: /'
