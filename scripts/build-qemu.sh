#!/usr/bin/env bash
# Configure (once) and build the patched QEMU in qemu/build: the x86_64
# system emulator, the tools the iotests need, and the firmware links that
# the "+ds" source tarball lacks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
venv=$VMSNAP_CACHE/venv
[ -x "$venv/bin/meson" ] || die "no meson in $venv; run scripts/setup-host.sh"
[ -d "$here/qemu/.git" ] || die "qemu/ is not populated; run scripts/fetch-qemu.sh"

export PATH=$venv/bin:$PATH
export CCACHE_DIR=${CCACHE_DIR:-$VMSNAP_CACHE/ccache}
# Paths relative to the tree, so that clones elsewhere (CI) hit the cache.
export CCACHE_BASEDIR=$here/qemu CCACHE_NOHASHDIR=1
build=$here/qemu/build

# The +ds tarball has no pc-bios/edk2-*.fd.bz2, and meson unpacks them
# whenever bzip2 exists.  Give it empty stand-ins, kept out of git: the
# x86 machine boots SeaBIOS here and never reads them.
for fd in $(sed -n "s/^ *'\(edk2-[a-z0-9_-]*\.fd\)',\$/\1/p" \
              "$here/qemu/pc-bios/meson.build"); do
  f=$here/qemu/pc-bios/$fd.bz2
  if [ ! -e "$f" ]; then
    bzip2 -c </dev/null > "$f"
    echo "/pc-bios/$fd.bz2" >> "$here/qemu/.git/info/exclude"
  fi
done

# Configure again (ccache keeps that cheap) when the options changed.
args_file=$build/vmsnap-configure-args
if [ ! -f "$build/build.ninja" ] ||
   [ "$(cat "$args_file" 2>/dev/null)" != "${QEMU_CONFIGURE_ARGS[*]}" ]; then
  rm -rf "$build"
  mkdir -p "$build"
  (cd "$build" && ../configure --python="$venv/bin/python3" \
     --cc="ccache gcc" --cxx="ccache g++" "${QEMU_CONFIGURE_ARGS[@]}")
  echo "${QEMU_CONFIGURE_ARGS[*]}" > "$args_file"
fi

ninja -C "$build" qemu-system-x86_64 qemu-img qemu-io qemu-nbd \
  storage-daemon/qemu-storage-daemon

# Firmware from Debian's seabios, qemu-system-data and ipxe-qemu
# (firmware_files in pins.sh), where the build's own -L directory looks
# for it.
data=$build/qemu-bundle/usr/local/share/qemu
mkdir -p "$data"
while read -r name file; do
  ln -sf "$file" "$data/$name"
done < <(firmware_files)
[ -e "$data/bios-256k.bin" ] ||
  die "bios-256k.bin is missing; install Debian's seabios (scripts/setup-host.sh)"
