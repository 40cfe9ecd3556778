#!/usr/bin/env bash
# Installs the system packages Leap's tests need (QEMU and qemu-storage-daemon from
# bookworm-backports, a guest kernel, busybox, fio, nvme-cli, prometheus for the metrics test, the aarch64 cross toolchain). Idempotent and
# quick when everything is there; needs root (skips otherwise). Prints what it does.
# LEAP_INSTALL_ARM64=0 skips the aarch64 cross toolchain; LEAP_INSTALL_SOC=1 adds what the
# emulated SoC machines need (scripts/soc-demo.sh): qemu-system-aarch64 (the arm64 16 KiB-page
# kernel and busybox are fetched with `apt-get download` when the SoC initramfs is built).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: not root; skipping system package installation" >&2
  exit 0
fi

want_arm64=${LEAP_INSTALL_ARM64:-1}
apt_opts=(-y -o DPkg::Lock::Timeout=300 --no-install-recommends)
export DEBIAN_FRONTEND=noninteractive

missing=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || missing+=("$1"); }

if [ ! -f /etc/apt/sources.list.d/backports.sources ]; then
  echo "install-deps: enabling bookworm-backports (derived from the machine's own Debian source)"
  sed -n '1,/^$/p' /etc/apt/sources.list.d/debian.sources \
    | sed 's/^Suites:.*/Suites: bookworm-backports/' > /etc/apt/sources.list.d/backports.sources
  updated=0
else
  updated=1
fi
if [ "$want_arm64" = 1 ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  updated=0
fi

for p in qemu-system-x86 qemu-utils linux-image-amd64 busybox-static fio cpio kmod util-linux gzip nvme-cli prometheus; do need "$p"; done
if [ "${LEAP_INSTALL_SOC:-0}" = 1 ]; then
  for p in qemu-system-arm binutils; do need "$p"; done
fi
if [ "$want_arm64" = 1 ]; then
  for p in rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static; do need "$p"; done
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all system packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
if [ "$updated" = 0 ]; then
  echo "install-deps: apt sources changed: apt-get update"
fi
apt-get update -o DPkg::Lock::Timeout=300
pkgs=()
for p in "${missing[@]}"; do
  case "$p" in
    qemu-system-x86) pkgs+=(qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports
                           qemu-system-data/bookworm-backports seabios/bookworm-backports
                           qemu-utils/bookworm-backports qemu-block-extra/bookworm-backports) ;;
    qemu-utils) pkgs+=(qemu-utils/bookworm-backports) ;;   # qemu-storage-daemon (peer anchor)
    qemu-system-arm) pkgs+=(qemu-system-arm/bookworm-backports) ;;   # same version as qemu-system-x86
    qemu-user-static) pkgs+=(qemu-user-static/bookworm-backports) ;;
    *) pkgs+=("$p") ;;
  esac
done
apt-get install "${apt_opts[@]}" "${pkgs[@]}"
