#!/usr/bin/env bash
# Builds the kernel and initramfs of the emulated SoC VM (scripts/soc-demo.sh): busybox, leapd
# with the libraries it links, the modules a SoC needs (NVMe for its local SSD, virtio-net for the
# control channel to the host agent), tests/guest/init and the SoC job (tests/guest/jobs/soc.sh).
#
#   tests/guest/build-soc-initramfs.sh --arch x86_64|aarch64 --leapd PATH [OUTDIR]
#
# x86_64 (SoCvm): the host's guest kernel (/boot, /lib/modules) and busybox-static.
# aarch64 (ARM SoC): Debian's 16 KiB-page arm64 kernel (linux-image-*-arm64-16k-unsigned, from
#   bookworm-backports) and busybox-static:arm64, fetched with `apt-get download` into
#   OUTDIR/debs and unpacked there; leapd's libraries come from the cross sysroot
#   (/usr/aarch64-linux-gnu, libc6-arm64-cross).
# Outputs OUTDIR/ARCH/vmlinuz and OUTDIR/ARCH/soc.cpio.gz (default OUTDIR: target/soc); prints
# the directory. Env: LEAP_SOC_ARM64_KERNEL=<package> picks the arm64 kernel package.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
log() { echo "build-soc-initramfs: $*" >&2; }
die() { echo "build-soc-initramfs: ERROR: $*" >&2; exit 1; }

arch="" leapd="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=$2; shift 2 ;;
    --leapd) leapd=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) out=$1; shift ;;
  esac
done
case "$arch" in x86_64|aarch64) ;; *) die "--arch must be x86_64 or aarch64" ;; esac
[ -x "$leapd" ] || die "--leapd $leapd is not an executable"
out=${out:-$root/target/soc}
dir=$out/$arch
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
for t in cpio gzip readelf depmod; do command -v "$t" >/dev/null || die "'$t' not found"; done

stage=$(mktemp -d "$dir/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,job,etc,root,lib/modules/leap}

# --- kernel, modules, busybox, library search path ------------------------------------------
if [ "$arch" = x86_64 ]; then
  kver=""
  for k in $(for f in /boot/vmlinuz-*; do [ -e "$f" ] && echo "${f#/boot/vmlinuz-}"; done | sort -V -r); do
    if [ -f "/lib/modules/$k/modules.dep" ]; then kver=$k; break; fi
  done
  [ -n "$kver" ] || die "no /boot/vmlinuz-* with modules (apt-get install linux-image-amd64)"
  kernel=/boot/vmlinuz-$kver
  modroot=""
  busybox=$(command -v busybox || true)
  [ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
  libroots=(/)
else
  debs=$out/debs
  mkdir -p "$debs"
  pkg=${LEAP_SOC_ARM64_KERNEL:-}
  if [ -z "$pkg" ]; then
    pkg=$(apt-cache search --names-only '^linux-image-[0-9.]+.*-arm64-16k-unsigned$' 2>/dev/null \
            | awk '{print $1}' | sort -V | tail -1)
  fi
  [ -n "$pkg" ] || die "no linux-image-*-arm64-16k-unsigned package known to apt (enable bookworm-backports: scripts/install-deps.sh)"
  fetch() { # package -> unpacked directory
    local p=$1 d=$debs/${1//[:\/]/_}
    if [ ! -f "$d/.done" ]; then
      log "fetching $p"
      rm -rf "$d" && mkdir -p "$d"
      (cd "$debs" && rm -f ./*.deb && apt-get download "$p" >&2) || die "apt-get download $p failed"
      dpkg-deb -x "$(ls "$debs"/*.deb | head -1)" "$d"
      rm -f "$debs"/*.deb
      touch "$d/.done"
    fi
    echo "$d"
  }
  kroot=$(fetch "$pkg")
  kver=$(ls "$kroot/lib/modules" | head -1)
  kernel=$kroot/boot/vmlinuz-$kver
  [ -f "$kernel" ] || die "$pkg has no /boot/vmlinuz-$kver"
  [ -f "$kroot/lib/modules/$kver/modules.dep" ] || depmod -b "$kroot" "$kver"
  modroot=$kroot
  bbroot=$(fetch busybox-static:arm64)
  busybox=$bbroot/bin/busybox
  [ -x "$busybox" ] || die "busybox-static:arm64 has no /bin/busybox"
  [ -d /usr/aarch64-linux-gnu/lib ] || die "/usr/aarch64-linux-gnu/lib missing (apt-get install libc6-dev-arm64-cross)"
  libroots=(/usr/aarch64-linux-gnu)
fi
moddir=$modroot/lib/modules/$kver
cp "$kernel" "$dir/vmlinuz"
echo "$kver" > "$dir/kernel-version"

cp "$busybox" "$stage/bin/busybox"
# the applet list of the host's busybox (an arm64 one cannot run here; the lists are the same
# package version's)
for a in $( (command -v busybox >/dev/null && busybox --list) || echo sh); do
  [ "$a" = busybox ] || ln -sf busybox "$stage/bin/$a"
done

# --- leapd and the libraries it links (resolved in the target's library roots) --------------
cp "$leapd" "$stage/usr/bin/leapd"
interp=$(LC_ALL=C readelf -l "$leapd" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
needed=$(LC_ALL=C readelf -d "$leapd" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
mkdir -p "$stage/lib/leap"
for lib in $needed; do
  found=""
  for r in "${libroots[@]}"; do
    for d in lib lib64 "lib/$arch-linux-gnu" "usr/lib/$arch-linux-gnu"; do
      if [ -e "$r/$d/$lib" ]; then found=$r/$d/$lib; break 2; fi
    done
  done
  [ -n "$found" ] || die "library $lib (needed by leapd) not found under ${libroots[*]}"
  cp -L "$found" "$stage/lib/leap/$lib"
done
if [ -n "$interp" ]; then
  src=""
  for r in "${libroots[@]}"; do
    for c in "$r$interp" "$r/lib/$(basename "$interp")"; do [ -e "$c" ] && { src=$c; break 2; }; done
  done
  [ -n "$src" ] || die "leapd's loader $interp not found"
  mkdir -p "$(dirname "$stage$interp")"
  cp -L "$src" "$stage$interp"
fi
echo /lib/leap > "$stage/etc/leap-ldpath"

# --- modules, dependencies first (modules.dep lists each module's whole closure) --------------
want=(virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci nvme_core nvme failover net_failover virtio_net)
declare -A added=()
order=()
relpath() {
  awk -F: -v n="$1" '{ f=$1; sub(/.*\//, "", f); sub(/\.ko(\.(xz|zst|gz))?$/, "", f); gsub(/-/, "_", f);
                       if (f == n) { print $1; exit } }' "$moddir/modules.dep"
}
add() {
  local rel=$1 deps=() i
  [ -n "${added[$rel]:-}" ] && return 0
  added[$rel]=1
  read -r -a deps <<< "$(awk -F: -v p="$rel" '$1 == p { print $2; exit }' "$moddir/modules.dep")"
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add "${deps[$i]}"; done
  order+=("$rel")
}
for m in "${want[@]}"; do
  if grep -qE "/$m\.ko" "$moddir/modules.builtin" 2>/dev/null; then continue; fi
  rel=$(relpath "$m")
  [ -n "$rel" ] || die "module $m not in $moddir/modules.dep"
  add "$rel"
done
: > "$stage/etc/leap-modules"
for rel in "${order[@]}"; do
  name=$(basename "$rel")
  case "$name" in
    *.ko.xz)  xz -dc "$moddir/$rel" > "$stage/lib/modules/leap/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$moddir/$rel" > "$stage/lib/modules/leap/${name%.zst}"; name=${name%.zst} ;;
    *.ko.gz)  gzip -dc "$moddir/$rel" > "$stage/lib/modules/leap/${name%.gz}"; name=${name%.gz} ;;
    *)        cp "$moddir/$rel" "$stage/lib/modules/leap/$name" ;;
  esac
  echo "$name" >> "$stage/etc/leap-modules"
done

cp "$here/init" "$stage/init"
chmod 755 "$stage/init"
cp "$here/jobs/soc.sh" "$stage/job/run.sh"
cp "$here/jobs/lib.sh" "$stage/job/lib.sh"
echo "root:x:0:0:root:/root:/bin/sh" > "$stage/etc/passwd"
echo "root:x:0:" > "$stage/etc/group"
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true
(cd "$stage" && find . -print0 | LC_ALL=C sort -z \
   | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 -n) > "$dir/soc.cpio.gz.tmp"
mv "$dir/soc.cpio.gz.tmp" "$dir/soc.cpio.gz"
log "$arch: kernel $kver, modules: $(paste -sd' ' "$stage/etc/leap-modules"), leapd libraries: $needed"
echo "$dir"
