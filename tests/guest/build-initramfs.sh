#!/usr/bin/env bash
# Builds the base initramfs for Leap's QEMU guest tests: busybox, fio with every library ldd lists,
# the virtio modules of the host's guest kernel (/boot + /lib/modules) and tests/guest/init.
#
#   tests/guest/build-initramfs.sh [OUTDIR]          (default: target/guest)
#
# Outputs OUTDIR/vmlinuz and OUTDIR/base-<key>.cpio.gz, where <key> hashes the kernel version, this
# script, the init and the fio/busybox binaries: an existing image with the same key is reused.
# Prints the path of the base image on stdout (everything else goes to stderr).
# Per-run job scripts are NOT in this image: run-guest.sh appends a small cpio.gz holding /job/.
#
# Environment: LEAP_GUEST_KVER=<version> picks a kernel (default: newest /boot/vmlinuz-* that has
# /lib/modules/<version>/modules.dep). LEAP_GUEST_GZIP_LEVEL (default 1; the guest decompresses
# faster than it would gain from a smaller image).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

log() { echo "build-initramfs: $*" >&2; }
die() { echo "build-initramfs: ERROR: $*" >&2; exit 1; }

# --- tools -----------------------------------------------------------------------------------
for t in cpio gzip ldd sha256sum; do command -v "$t" >/dev/null || die "'$t' not found"; done
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
file_out=$(LC_ALL=C ldd "$busybox" 2>&1 || true)
case "$file_out" in
  *"not a dynamic executable"*|*"statically linked"*) ;;
  *) die "$busybox is not static (install busybox-static)" ;;
esac
fio=$(command -v fio || true)
[ -n "$fio" ] || die "fio not found (apt-get install fio)"
nvme=$(command -v nvme || true)
[ -n "$nvme" ] || die "nvme not found (apt-get install nvme-cli)"

# --- kernel ----------------------------------------------------------------------------------
kver=${LEAP_GUEST_KVER:-}
if [ -z "$kver" ]; then
  for k in $(for f in /boot/vmlinuz-*; do [ -e "$f" ] && echo "${f#/boot/vmlinuz-}"; done | sort -V -r); do
    if [ -f "/lib/modules/$k/modules.dep" ]; then kver=$k; break; fi
  done
fi
[ -n "$kver" ] || die "no /boot/vmlinuz-* with /lib/modules/<ver>/modules.dep (apt-get install linux-image-amd64)"
kernel=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver
[ -r "$kernel" ] || die "$kernel not readable"
[ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep missing"

want_modules=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
              failover net_failover virtio_net nvme_core nvme_fabrics nvme_tcp)
# crypto the NVMe/TCP modules ask for at run time (request_module, which a busybox initramfs cannot
# answer): loaded first when the kernel has them as modules
optional_modules=(crc32c_generic crc32c_intel crc64_rocksoft_generic crct10dif_generic)
# loaded by jobs that need them (jobs/lib.sh load_ondemand): Linux's NVMe/TCP target, VFIO for a
# userspace driver of the emulated NVMe controller (run-guest.sh --nvme), and the kernel's own PCI
# NVMe driver for comparison. None loads at boot, so nothing binds that controller until a job
# says which driver gets it. /etc/leap-modules-ondemand lists them in dependency order;
# /etc/leap-modules-ondemand-deps has one line per name here: "NAME FILE.ko..." with the module's
# files (its dependencies first, itself last; modules loaded at boot included) in load order.
ondemand_modules=(configfs nvmet nvmet_tcp vfio_pci vfio_iommu_type1 nvme)

# --- cache key ---------------------------------------------------------------------------------
init_src=$here/init
[ -f "$init_src" ] || die "$init_src missing"
key=$( {
  echo "kver=$kver"
  sha256sum "${BASH_SOURCE[0]}" "$init_src" "$fio" "$busybox" "$kernel" | awk '{print $1}'
  echo "modules=${want_modules[*]} ${optional_modules[*]} ${ondemand_modules[*]}"
  command -v nvme 2>/dev/null | xargs -r sha256sum | awk '{print $1}'
  echo "gzip=${LEAP_GUEST_GZIP_LEVEL:-1}"
} | sha256sum | cut -c1-16)
base=$out/base-$key.cpio.gz

if ! cmp -s "$kernel" "$out/vmlinuz" 2>/dev/null; then
  cp "$kernel" "$out/vmlinuz.tmp.$$" && mv "$out/vmlinuz.tmp.$$" "$out/vmlinuz"
fi
echo "$kver" > "$out/kernel-version"

if [ -s "$base" ]; then
  log "reusing $base"
  echo "$base"
  exit 0
fi

log "building base initramfs for kernel $kver (key $key)"
start=$(date +%s)
stage=$(mktemp -d "$out/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,job,etc,root,lib/modules/leap,lib64}

# busybox + applet links
cp "$busybox" "$stage/bin/busybox"
for a in $("$busybox" --list); do
  [ "$a" = busybox ] && continue
  ln -sf busybox "$stage/bin/$a"
done

# fio + every library ldd lists (+ the dynamic loader), at the paths ldd reports
cp "$fio" "$stage/usr/bin/fio"
# util-linux blkdiscard (busybox's has no -z for WRITE ZEROES); optional
ul_blkdiscard=""
for c in /usr/sbin/blkdiscard /sbin/blkdiscard; do
  if [ -x "$c" ] && ! "$c" --version 2>&1 | grep -qi busybox; then ul_blkdiscard=$c; break; fi
done
bins=("$fio" "$nvme")
cp "$nvme" "$stage/usr/sbin/nvme"
if [ -n "$ul_blkdiscard" ]; then
  cp "$ul_blkdiscard" "$stage/usr/sbin/ul-blkdiscard"
  bins+=("$ul_blkdiscard")
fi
liblist=$(for b in "${bins[@]}"; do
            LC_ALL=C ldd "$b" | awk '
              /not found/ { print "MISSING:" $1; next }
              /=>/ { if ($3 ~ /^\//) print $3; next }
              $1 ~ /^\// { print $1 }'
          done | sort -u)
if grep -q '^MISSING:' <<< "$liblist"; then
  die "ldd reports missing libraries: $(grep '^MISSING:' <<< "$liblist" | cut -d: -f2 | paste -sd' ')"
fi
declare -A libdirs=()
nlibs=0
while read -r lib; do
  [ -n "$lib" ] || continue
  [ -e "$lib" ] || die "library $lib (from ldd) does not exist"
  dest=$stage$lib
  mkdir -p "$(dirname "$dest")"
  if [ ! -e "$dest" ]; then cp -L "$lib" "$dest"; nlibs=$((nlibs + 1)); fi
  libdirs[$(dirname "$lib")]=1
done <<< "$liblist"
# the loader must also be reachable at the PT_INTERP path
interp=$(LC_ALL=C readelf -l "$fio" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p' || true)
interp=${interp:-/lib64/ld-linux-x86-64.so.2}
if [ ! -e "$stage$interp" ]; then
  mkdir -p "$(dirname "$stage$interp")"
  cp -L "$interp" "$stage$interp"
fi
printf '%s\n' "${!libdirs[@]}" | sort | paste -sd: > "$stage/etc/leap-ldpath"

# kernel modules, dependency-ordered from modules.dep
declare -A loaded=()
order=()
modpath() { # module name -> path relative to $moddir
  local n=$1 p
  p=$(awk -F: -v n="$n" '{ f=$1; sub(/.*\//, "", f); sub(/\.ko(\.(xz|zst|gz))?$/, "", f); gsub(/-/, "_", f);
                           if (f == n) { print $1; exit } }' "$moddir/modules.dep")
  [ -n "$p" ] || die "module $n not in $moddir/modules.dep (built in? check /boot/config-$kver)"
  echo "$p"
}
moddeps() { # relative path -> its deps (relative paths)
  awk -F: -v p="$1" '$1 == p { print $2; exit }' "$moddir/modules.dep"
}
add_module() { # relative path; deps first (modules.dep lists the full closure, last = innermost)
  local rel=$1 deps=()
  [ -n "${loaded[$rel]:-}" ] && return 0
  loaded[$rel]=1
  read -r -a deps <<< "$(moddeps "$rel")"
  local i
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add_module "${deps[$i]}"; done
  order+=("$rel")
}
builtin() { grep -qE "/${1}\.ko" "$moddir/modules.builtin" 2>/dev/null; }
for m in "${optional_modules[@]}"; do
  builtin "$m" && continue
  p=$(awk -F: -v n="$m" '{ f=$1; sub(/.*\//, "", f); sub(/\.ko(\.(xz|zst|gz))?$/, "", f); gsub(/-/, "_", f);
                          if (f == n) { print $1; exit } }' "$moddir/modules.dep")
  [ -n "$p" ] && add_module "$p"
done
for m in "${want_modules[@]}"; do
  if builtin "$m"; then
    log "module $m is built in"; continue
  fi
  add_module "$(modpath "$m")"
done
boot_count=${#order[@]}
declare -A ondemand_files=()
for m in "${ondemand_modules[@]}"; do
  if builtin "$m"; then ondemand_files[$m]=""; log "module $m is built in"; continue; fi
  rel=$(modpath "$m")
  add_module "$rel"
  # modules.dep lists the whole closure, innermost last: loading it back to front is modprobe's order
  read -r -a deps <<< "$(moddeps "$rel")"
  files=()
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do files+=("$(basename "${deps[$i]}")"); done
  files+=("$(basename "$rel")")
  ondemand_files[$m]="${files[*]}"
done
: > "$stage/etc/leap-modules"
: > "$stage/etc/leap-modules-ondemand"
k=0
for rel in "${order[@]}"; do
  k=$((k + 1))
  list=$stage/etc/leap-modules
  [ "$k" -le "$boot_count" ] || list=$stage/etc/leap-modules-ondemand
  name=$(basename "$rel")
  case "$name" in
    *.ko.xz)  xz -dc "$moddir/$rel" > "$stage/lib/modules/leap/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$moddir/$rel" > "$stage/lib/modules/leap/${name%.zst}"; name=${name%.zst} ;;
    *.ko.gz)  gzip -dc "$moddir/$rel" > "$stage/lib/modules/leap/${name%.gz}"; name=${name%.gz} ;;
    *)        cp "$moddir/$rel" "$stage/lib/modules/leap/$name" ;;
  esac
  echo "$name" >> "$list"
done
# the files as the image holds them: decompressed, .ko
for m in "${ondemand_modules[@]}"; do
  line=$m
  for f in ${ondemand_files[$m]}; do line="$line ${f%.ko*}.ko"; done
  echo "$line"
done > "$stage/etc/leap-modules-ondemand-deps"
# shellcheck disable=SC2013  # file names are words
for f in $(cut -d' ' -f2- "$stage/etc/leap-modules-ondemand-deps"); do
  [ -e "$stage/lib/modules/leap/$f" ] || die "on-demand module file $f is not in the image"
done
log "modules (load order): $(paste -sd' ' "$stage/etc/leap-modules"); on demand: $(paste -sd' ' "$stage/etc/leap-modules-ondemand")"

cp "$init_src" "$stage/init"
chmod 755 "$stage/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$stage/etc/passwd"
echo "root:x:0:" > "$stage/etc/group"
echo "$kver" > "$stage/etc/leap-kernel-version"
# /dev/console lets the kernel give init a console before devtmpfs is mounted (init also
# redirects itself to /dev/console after mounting devtmpfs, so this is best effort).
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true

usize=$(du -sk "$stage" | awk '{print $1}')
tmp=$base.tmp.$$
(cd "$stage" && find . -print0 | LC_ALL=C sort -z \
   | cpio --null -o -H newc -R 0:0 --quiet | gzip "-${LEAP_GUEST_GZIP_LEVEL:-1}" -n) > "$tmp"
mv "$tmp" "$base"
# keep only the newest base image
for old in "$out"/base-*.cpio.gz; do [ "$old" = "$base" ] || rm -f "$old"; done
csize=$(du -k "$base" | awk '{print $1}')
log "built $base: $nlibs libraries, ${usize} KiB unpacked, ${csize} KiB compressed, $(( $(date +%s) - start )) s"
echo "$base"
