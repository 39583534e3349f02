# Pinned inputs of the build, sourced by the other scripts.
# Changing a version here means changing its checksum too.

QEMU_VERSION=10.2.2
QEMU_UPSTREAM_GIT=https://gitlab.com/qemu-project/qemu.git
QEMU_UPSTREAM_TAG=v$QEMU_VERSION
# Debian's "+ds" orig tarball is upstream QEMU minus some firmware blobs.
# It is fetched with "apt-get source" from the Debian suite that carries
# this version, through the archive this machine's apt is configured for.
QEMU_DEBIAN_VERSION=1:${QEMU_VERSION}+ds-1
QEMU_DEBIAN_SUITE=sid
QEMU_TARBALL=qemu_${QEMU_VERSION}+ds.orig.tar.xz
QEMU_TARBALL_SHA256=be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb
# The release commit fetch-qemu.sh makes from that tarball, which the
# qemu submodule's gitlink pins.
QEMU_PRISTINE_COMMIT=ab4178868b656f95ad67ac528ffc9e57eae23fd7

# "git commit -a" (and "git add qemu") stage qemu/'s HEAD, the patched
# tree, in place of the pin: refuse to go on with such a gitlink.
check_qemu_gitlink() {
  local link
  link=$(git -C "$here" ls-files -s qemu | awk '$1 == "160000" { print $2 }')
  [ -z "$link" ] || [ "$link" = "$QEMU_PRISTINE_COMMIT" ] || die \
"the qemu gitlink is $link, not the pinned release $QEMU_PRISTINE_COMMIT
(git commit -a stages qemu/'s HEAD).  Restore it with:
  git update-index --cacheinfo 160000,$QEMU_PRISTINE_COMMIT,qemu"
}

# How QEMU is configured, by scripts/build-qemu.sh and, for each prefix of
# the series, scripts/check-series.sh: the same options, so that ccache
# serves the prefix builds from the main build.  zstd and FUSE exports
# are on so that the iotests that need them run, rbd so that VM states
# can be saved into Ceph images (scripts/check-rbd.sh).
QEMU_CONFIGURE_ARGS=(--target-list=x86_64-softmmu --disable-docs
  --disable-rust --disable-user --enable-tools --disable-werror
  --disable-install-blobs --disable-download --enable-zstd --enable-fuse
  --enable-rbd)

# Ceph from Debian, for QEMU's rbd driver (librbd-dev, librados-dev) and
# the one-node cluster of the rbd tests (scripts/ceph-cluster.sh):
# on this Debian release, setup-host.sh installs exactly this version of
# CEPH_PACKAGES (their dependencies come at the same version); another
# release gets its own version, and says so.
CEPH_DEBIAN_CODENAME=bookworm
CEPH_DEBIAN_VERSION=16.2.15+ds-0+deb12u2
CEPH_PACKAGES=(ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev librados-dev)

# The firmware the x86 machine loads, which the "+ds" tarball lacks:
# from Debian's seabios, qemu-system-data and ipxe-qemu (the NIC option
# ROMs: virtio-net-pci and the other NICs fail to start without their
# romfile).  build-qemu.sh links these files into its bundle and
# install.sh copies them into the installed data directory.
FIRMWARE_DIRS=(/usr/share/seabios /usr/share/qemu /usr/lib/ipxe/qemu)

# One "NAME FILE" line per firmware file: the name QEMU looks up and the
# file behind it, symlinks resolved.  A name in a later directory of
# FIRMWARE_DIRS comes later and wins (bios-microvm.bin is qboot.rom).
firmware_files() {
  local dir f
  for dir in "${FIRMWARE_DIRS[@]}"; do
    for f in "$dir"/*.bin "$dir"/*.rom; do
      [ -e "$f" ] || continue
      echo "$(basename "$f") $(readlink -f "$f")"
    done
  done
}

# Everything downloaded or built outside the repository lives here.
VMSNAP_CACHE=${VMSNAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmsnap}

# Identity used for the pristine commit of a tarball-populated qemu/.
QEMU_PRISTINE_AUTHOR="QEMU $QEMU_VERSION release <qemu-devel@nongnu.org>"

die() { echo "error: $*" >&2; exit 1; }
note() { echo "==> $*" >&2; }
