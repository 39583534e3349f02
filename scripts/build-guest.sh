#!/usr/bin/env bash
# Build the test guest: $VMSNAP_CACHE/guest/vmlinuz and initrd.img.
#
# The guest is Debian bookworm's cloud kernel with a busybox initramfs
# holding guest/init, the vmsnap-agent workload (built here, static) and
# qemu-ga.  The .debs are pinned by version and sha256 in
# guest/packages.lock and are only unpacked, never installed.  qemu-ga's
# shared libraries come from this (bookworm) host.
#
# Nothing is rebuilt when the inputs (lock file, guest sources, this
# script, the compiler, the copied host libraries) are unchanged.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"

out=$VMSNAP_CACHE/guest
debs=$out/debs
lock=$here/guest/packages.lock
agent_src=$here/guest/agent/vmsnap-agent.c
init=$here/guest/init
# Modules the guest loads; their dependencies are added.  Anything
# built into the kernel is skipped, so ext4 costs nothing if built in.
MODULES=(virtio_pci virtio_blk virtio_console ext4)

for tool in apt-get dpkg-deb gcc cpio gzip modinfo ldd sha256sum; do
  command -v "$tool" >/dev/null ||
    die "$tool is missing; run scripts/setup-host.sh"
done
mkdir -p "$debs"

# --- is the last build current? -------------------------------------------
# libs.list names the host libraries the last build copied; if any of
# them changed (a host upgrade), so does the key.
inputs_key() {
  {
    sha256sum "$lock" "$agent_src" "$init" "$here/scripts/build-guest.sh"
    gcc --version | head -1
    sha256sum "$(gcc -print-file-name=libc.a)"
    if [ -f "$out/libs.list" ]; then
      xargs -r sha256sum < "$out/libs.list" 2>&1
    else
      echo "no libs.list"
    fi
  } | sed "s|$here/||" | sha256sum | cut -d' ' -f1
}
key=$(inputs_key)
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] &&
   [ "$(cat "$out/stamp" 2>/dev/null)" = "$key" ]; then
  note "guest is up to date in $out"
  exit 0
fi

# --- fetch and verify the pinned packages ---------------------------------
apt_opts=()
[ "$(id -u)" = 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

deb_path() { echo "$debs/${1}_${2//:/%3a}_amd64.deb"; }

while read -r name version sha rest; do
  case "$name" in ''|'#'*) continue ;; esac
  [ -n "$sha" ] && [ -z "$rest" ] || die "bad line in $lock: $name $version"
  f=$(deb_path "$name" "$version")
  if [ -f "$f" ] && echo "$sha  $f" | sha256sum -c --quiet 2>/dev/null; then
    continue
  fi
  rm -f "$f"
  note "downloading $name=$version"
  dl=$(mktemp -d "$debs/dl.XXXXXX")
  if ! (cd "$dl" && apt-get download -q "${apt_opts[@]}" \
          "$name=$version" >/dev/null); then
    rm -rf "$dl"
    die "cannot download $name=$version (pinned in guest/packages.lock).
  Try 'apt-get update' first.  If the Debian archive no longer has that
  version, pick the current bookworm main one ('apt-cache policy $name'),
  download it with 'apt-get download $name=VERSION', and put VERSION and
  its sha256sum into guest/packages.lock (for the kernel, the package
  name changes with its ABI too)."
  fi
  mv "$dl"/*.deb "$f"
  rm -rf "$dl"
  got=$(sha256sum "$f" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    rm -f "$f"
    die "$name=$version has sha256 $got, guest/packages.lock says $sha"
  fi
done < "$lock"

# --- assemble ----------------------------------------------------------------
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
pkgs=$work/pkgs
root=$work/root
mkdir -p "$pkgs" "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,dev,proc,sys,run,tmp,mnt/data,etc}

while read -r name version sha rest; do
  case "$name" in ''|'#'*) continue ;; esac
  dpkg-deb -x "$(deb_path "$name" "$version")" "$pkgs"
done < "$lock"

note "building vmsnap-agent"
gcc -static -O2 -pthread -Wall -Wextra -o "$work/vmsnap-agent" "$agent_src"
strip "$work/vmsnap-agent"
install -m 755 "$work/vmsnap-agent" "$root/bin/vmsnap-agent"

install -m 755 "$pkgs/bin/busybox" "$root/bin/busybox"
for app in $("$pkgs/bin/busybox" --list-full); do
  [ "$app" = bin/busybox ] || ln -sf /bin/busybox "$root/$app"
done
install -m 755 "$init" "$root/init"

# qemu-ga and the libraries it links, including the dynamic loader, at
# the paths ldd names (the loader's own path is baked into the binary).
qga=$pkgs/usr/sbin/qemu-ga
install -m 755 "$qga" "$root/usr/sbin/qemu-ga"
ldd_out=$(ldd "$qga") || die "ldd $qga failed"
if grep -q 'not found' <<<"$ldd_out"; then
  die "qemu-ga needs libraries this host lacks (run scripts/setup-host.sh):
$ldd_out"
fi
: > "$work/libs.list"
for lib in $(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' \
               <<<"$ldd_out"); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  readlink -f "$lib" >> "$work/libs.list"
done

# Kernel modules, dependencies first.  busybox insmod cannot unpack
# compressed modules, so they go in plain.
kdirs=("$pkgs"/lib/modules/*)
[ ${#kdirs[@]} = 1 ] || die "expected one kernel in the packages: ${kdirs[*]}"
moddir=${kdirs[0]}
declare -A mod_done=()
load_order=()
add_module() {
  local name=${1//-/_} f dep
  [ -z "${mod_done[$name]:-}" ] || return 0
  mod_done[$name]=1
  if sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$moddir/modules.builtin" |
       grep -qx "$name"; then
    return 0
  fi
  f=$(find "$moddir/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) |
      head -1)
  [ -n "$f" ] || die "kernel module $name not found in $moddir"
  case "$f" in
  *.ko)     cp "$f" "$work/$name.ko" ;;
  *.ko.xz)  xz -dc "$f" > "$work/$name.ko" ;;
  *.ko.zst) zstd -qdc "$f" > "$work/$name.ko" ;;
  *.ko.gz)  gzip -dc "$f" > "$work/$name.ko" ;;
  *)        die "unknown module format: $f" ;;
  esac
  for dep in $(modinfo -F depends "$work/$name.ko" | tr , ' '); do
    add_module "$dep"
  done
  mv "$work/$name.ko" "$root/lib/modules/$name.ko"
  load_order+=("$name")
}
for m in "${MODULES[@]}"; do
  add_module "$m"
done
printf '%s\n' "${load_order[@]}" > "$root/lib/modules/load-order"
note "modules: ${load_order[*]}"

# The kernel opens /dev/console for init before devtmpfs is mounted.
if [ "$(id -u)" = 0 ]; then
  mknod -m 600 "$root/dev/console" c 5 1
fi
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"

# Sorted and with fixed owners, so equal inputs give an equal archive
# (up to file times).
(cd "$root" && find . | LC_ALL=C sort |
   cpio -o -H newc -R 0:0 --quiet) | gzip -9 -n > "$work/initrd.img"
cp "$pkgs"/boot/vmlinuz-* "$work/vmlinuz"

mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
mv "$work/vmsnap-agent" "$out/vmsnap-agent"
mv "$work/libs.list" "$out/libs.list"
inputs_key > "$out/stamp"
note "guest built: $out/vmlinuz ($(du -h "$out/vmlinuz" | cut -f1)," \
     "$(basename "$moddir")), $out/initrd.img ($(du -h "$out/initrd.img" | cut -f1))"
